//! `pipefuse-fuzz [--seconds S] [--seed N] [TARGET ...]`: runs every target (or the named ones)
//! for S seconds each (default 10) and prints inputs, inputs per second, accepted inputs,
//! distinct refusals and findings; inputs that provoked a finding are written to
//! `fuzz/findings/` (exit status 1).

use pipefuse_fuzz::{targets, Budget, Campaign, GuardedAlloc};

#[global_allocator]
static ALLOC: GuardedAlloc = GuardedAlloc;

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut seconds, mut seed, mut only) = (10.0f64, 1u64, Vec::new());
    while let Some(a) = args.next() {
        let mut value = |what: &str| {
            args.next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{a} needs a number ({what})"))
        };
        match a.as_str() {
            "--seconds" => seconds = value("seconds per target"),
            "--seed" => seed = value("the mutator's seed") as u64,
            "-h" | "--help" => {
                println!(
                    "pipefuse-fuzz [--seconds S] [--seed N] [TARGET ...]\ntargets: {}",
                    targets::all()
                        .iter()
                        .map(|t| t.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                return;
            }
            name => only.push(name.to_string()),
        }
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    println!("pipefuse-fuzz: {seconds} s per target, seed {seed}, {cpu}, 1 thread");
    println!(
        "{:<14} {:>10} {:>10} {:>9} {:>8} {:>7} {:>9}",
        "target", "inputs", "inputs/s", "accepted", "reasons", "corpus", "findings"
    );
    let mut findings = Vec::new();
    for t in targets::all() {
        if !only.is_empty() && !only.iter().any(|o| o == t.name) {
            continue;
        }
        let r = Campaign::new(seed).run(
            &t,
            Budget::Time(std::time::Duration::from_secs_f64(seconds)),
        );
        println!(
            "{:<14} {:>10} {:>10.0} {:>9} {:>8} {:>7} {:>9}",
            r.target,
            r.inputs,
            r.rate(),
            r.accepted,
            r.reasons,
            r.corpus,
            r.findings.len()
        );
        findings.extend(r.findings);
    }
    if findings.is_empty() {
        return;
    }
    let dir = targets::root().join("fuzz/findings");
    let _ = std::fs::create_dir_all(&dir);
    for (i, f) in findings.iter().enumerate() {
        let path = dir.join(format!("{}-{i}.bin", f.target));
        let _ = std::fs::write(&path, &f.input);
        eprintln!(
            "finding in {}: {} (input: {})",
            f.target,
            f.what,
            path.display()
        );
    }
    std::process::exit(1);
}
