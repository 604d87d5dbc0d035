//! Every decoder of outside bytes under a short, repeatable fuzz campaign (a fixed seed and
//! input count, so the test is the same on any machine): no panic and no allocation beyond
//! [`pipefuse_fuzz::alloc_limit`]. Longer campaigns: `cargo run --release -p pipefuse-fuzz`.

use pipefuse_fuzz::{targets, Budget, Campaign, GuardedAlloc};

#[global_allocator]
static ALLOC: GuardedAlloc = GuardedAlloc;

#[test]
fn no_decoder_panics_or_allocates_without_bound() {
    let mut failed = Vec::new();
    for t in targets::all() {
        let n = if t.name == "weights" { 300 } else { 3000 };
        let r = Campaign::new(7).run(&t, Budget::Inputs(n));
        eprintln!(
            "{:<13} {:>6} inputs, {:>5} accepted, {:>3} refusal kinds, {:.0} inputs/s",
            r.target,
            r.inputs,
            r.accepted,
            r.reasons,
            r.rate()
        );
        assert!(
            r.reasons > 1,
            "{}: mutations never reached a second kind of refusal",
            r.target
        );
        for f in r.findings {
            failed.push(format!(
                "{}: {} (input {:?}...)",
                f.target,
                f.what,
                &f.input[..f.input.len().min(64)]
            ));
        }
    }
    assert!(failed.is_empty(), "findings:\n{}", failed.join("\n"));
}

/// The harness finds what it is for: a decoder that panics on some inputs, and one that
/// allocates what a length field says.
#[test]
fn panics_and_unbounded_allocations_are_findings() {
    let t = pipefuse_fuzz::Target {
        name: "broken",
        seeds: vec![vec![1, 2, 3, 4, 5, 6, 7, 8]],
        text: false,
        focus: 0,
        run: Box::new(|b| {
            let n = u32::from_le_bytes(b.get(..4).ok_or("short")?.try_into().unwrap());
            if n == u32::MAX {
                panic!("length u32::MAX");
            }
            let v = vec![0u8; n as usize]; // trusts the length field
            std::hint::black_box(&v);
            Ok(())
        }),
    };
    let r = Campaign::new(3).run(&t, Budget::Inputs(2000));
    assert!(
        r.findings.iter().any(|f| f.what.contains("panicked")),
        "{:?}",
        r.findings.len()
    );
    assert!(
        r.findings.iter().any(|f| f.what.contains("allocated")),
        "{:?}",
        r.findings.len()
    );
}
