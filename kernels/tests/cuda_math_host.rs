//! The CUDA kernels' arithmetic (`src/cuda/kernels/math.cuh`: GELU, SiLU, adaLN modulation, the
//! online-softmax update) compiled as host C++ with this machine's C++ compiler agrees with the
//! CPU backend's references: the GPU's math is checked without a GPU (issue 11). The device
//! kernels include the same file. Needs a C++ compiler (`c++`, or `CXX`; the Rust toolchain's
//! linker setup has one); without it the test fails saying so.

mod common;

use std::process::Command;

use kernels::reference::{gelu_tanh_slow, silu_slow};

const MATH: &str = include_str!("../src/cuda/kernels/math.cuh");

/// Compiles and runs the host harness; its output lines.
fn run_harness(tag: &str, body: &str) -> Vec<Vec<f64>> {
    let dir = std::env::temp_dir().join(format!("pipefuse-cuda-math-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let program = format!(
        "#include <math.h>\n#include <stdio.h>\n#define PF_FN inline\n#define PF_NEG_INF (-INFINITY)\n\
         {}\nint main() {{\n{body}\nreturn 0;\n}}\n",
        MATH.replace("#pragma once", "")
    );
    let bin = common::build_cpp(&dir, &program, &["-O1", "-std=c++17"]);
    let run = Command::new(&bin).output().unwrap();
    assert!(run.status.success());
    std::fs::remove_dir_all(&dir).ok();
    String::from_utf8_lossy(&run.stdout)
        .lines()
        .map(|l| l.split_whitespace().map(|v| v.parse().unwrap()).collect())
        .collect()
}

#[test]
fn gelu_silu_and_modulation_match_the_cpu_references() {
    let rows = run_harness(
        "elementwise",
        "for (int i = -600; i <= 600; ++i) { float x = i / 60.0f; \
         printf(\"%.9g %.9g %.9g %.9g\\n\", x, gelu_tanh_f(x), silu_f(x), modulate_f(x, 0.25f, -0.5f)); }",
    );
    assert_eq!(rows.len(), 1201);
    let xs: Vec<f32> = rows.iter().map(|r| r[0] as f32).collect();
    let (gelu, silu) = (gelu_tanh_slow(&xs), silu_slow(&xs));
    for (i, r) in rows.iter().enumerate() {
        let close = |got: f64, want: f64, what: &str| {
            assert!(
                (got - want).abs() <= 2e-6 * want.abs().max(1.0),
                "{what}({}): device math {got}, CPU reference {want}",
                r[0]
            );
        };
        close(r[1], gelu[i] as f64, "gelu_tanh");
        close(r[2], silu[i] as f64, "silu");
        close(r[3], r[0] * 1.25 - 0.5, "modulate");
    }
}

/// The attention kernel's online-softmax update over blocks of scores (a fully masked block
/// first, then three blocks) ends with the log-sum-exp of all scores.
#[test]
fn online_softmax_update_gives_the_log_sum_exp() {
    let blocks: [&[f32]; 4] = [
        &[f32::NEG_INFINITY; 3],
        &[0.5, -1.0, 2.0],
        &[7.0, 3.0],
        &[-2.0, 6.5, 0.0, 1.0],
    ];
    let mut body = String::from("float m = PF_NEG_INF, l = 0.0f;\n");
    for b in &blocks {
        let vals: Vec<String> = b
            .iter()
            .map(|v| match v.is_finite() {
                true => format!("{v:?}f"),
                false => "PF_NEG_INF".into(),
            })
            .collect();
        body += &format!(
            "{{ float s[] = {{{}}}; float bm = PF_NEG_INF; for (float v : s) bm = fmaxf(bm, v);\n\
             online_softmax_rescale(&m, &l, bm); if (m != PF_NEG_INF) for (float v : s) l += expf(v - m); }}\n",
            vals.join(", ")
        );
    }
    body += "printf(\"%.9g %.9g\\n\", m, m + logf(l));";
    let out = run_harness("softmax", &body);
    let all: Vec<f64> = blocks
        .iter()
        .flat_map(|b| b.iter())
        .filter(|v| v.is_finite())
        .map(|&v| v as f64)
        .collect();
    let max = all.iter().cloned().fold(f64::MIN, f64::max);
    let lse = max + all.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
    assert_eq!(out[0][0], 7.0, "running maximum");
    assert!((out[0][1] - lse).abs() < 1e-5, "{} vs {lse}", out[0][1]);
}

/// Ring attention's merge weights (`merge_lse_weights`) against the CPU backend's merge of two
/// one-element partial results: with acc = 1 and part = 0 the merged value is the accumulator's
/// weight, and the merged log-sum-exp is the CPU's. Empty blocks (-inf) and NaN blocks included
/// (NaN on both sides where either log-sum-exp is NaN, except an empty part after a NaN
/// accumulator, which keeps it).
#[test]
fn merge_weights_match_the_cpu_merge() {
    let rows = run_harness(
        "merge",
        "float v[] = {-INFINITY, -30.0f, -2.5f, 0.0f, 0.75f, 4.0f, 60.0f, NAN};\n\
         for (float la : v) for (float lp : v) { float wa, wp; float l = merge_lse_weights(la, lp, &wa, &wp);\n\
         printf(\"%.9g %.9g %.9g %.9g %.9g\\n\", la, lp, wa, wp, l); }",
    );
    assert_eq!(rows.len(), 64);
    for r in &rows {
        let (la, lp) = (r[0] as f32, r[1] as f32);
        let (acc, lse) = kernels::reference::merge_partial_slow(&[1.0], &[la], &[0.0], &[lp], 1);
        if lp.is_nan() || (la.is_nan() && lp != f32::NEG_INFINITY) {
            assert!(
                lse[0].is_nan() && acc[0].is_nan(),
                "CPU merge of {la}, {lp}"
            );
        }
        let close = |got: f64, want: f64, what: &str| {
            let ok = (got == want)
                || (got.is_nan() && want.is_nan())
                || (got - want).abs() <= 2e-6 * want.abs().max(1.0);
            assert!(
                ok,
                "{what} for lse {la}, {lp}: device math {got}, CPU {want}"
            );
        };
        close(r[2], acc[0] as f64, "accumulator weight");
        if !lse[0].is_nan() {
            close(r[2] + r[3], 1.0, "weights' sum");
        }
        close(r[4], lse[0] as f64, "merged log-sum-exp");
    }
}

/// The GPU convolution's layout (`im2col_source` in math.cuh, then the column matrix times the
/// weight `[O, C_in kh kw]^T`, then a transpose to `[O, P]`, as `cuda/image_ops.rs` does) gives
/// the CPU reference convolution, padding included.
#[test]
fn im2col_layout_gives_the_reference_convolution() {
    use kernels::reference::{conv2d_slow, ConvGeom};
    let g = ConvGeom {
        batch: 1,
        c_in: 3,
        h: 5,
        w: 4,
        c_out: 2,
        kh: 3,
        kw: 3,
        pad: 1,
    };
    let (p, k) = (g.h_out() * g.w_out(), g.c_in * g.kh * g.kw);
    let rows = run_harness(
        "im2col",
        &format!(
            "for (long i = 0; i < {n}; ++i) printf(\"%ld\\n\", im2col_source(i, {}, {}, {}, {}, {}, {}, {}));",
            g.c_in, g.h, g.w, g.kh, g.kw, g.pad, g.w_out(), n = p * k
        ),
    );
    assert_eq!(rows.len(), p * k);
    let x: Vec<f32> = (0..g.c_in * g.h * g.w)
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    let w: Vec<f32> = (0..g.c_out * k).map(|i| (i as f32 * 0.11).cos()).collect();
    let bias = [0.5f32, -0.25];
    let cols: Vec<f32> = rows
        .iter()
        .map(|r| if r[0] < 0.0 { 0.0 } else { x[r[0] as usize] })
        .collect();
    // [P, K] . [O, K]^T + b -> [P, O], then [O, P].
    let mut y = vec![0f32; g.c_out * p];
    for pi in 0..p {
        for o in 0..g.c_out {
            let dot: f32 = (0..k).map(|q| cols[pi * k + q] * w[o * k + q]).sum();
            y[o * p + pi] = dot + bias[o];
        }
    }
    let want = conv2d_slow(&x, &w, Some(&bias), g);
    for (a, b) in y.iter().zip(&want) {
        assert!(
            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
            "{y:?}\nvs\n{want:?}"
        );
    }
}

/// The GPU rotary embedding (`rope_pair_index` and `rope_pair_f` in math.cuh, one thread per
/// channel pair as `rope` in elementwise.cu runs them) gives the CPU reference's rotation, on
/// the key columns of a fused QKV (an offset inside the row, two batch elements).
#[test]
fn rope_pairs_give_the_reference_rotation() {
    use kernels::reference::rope_slow;
    let (batch, positions, heads, hd) = (2usize, 5usize, 3usize, 8usize);
    let width = 3 * heads * hd;
    let (offset, cols) = (heads * hd, heads * hd);
    let x: Vec<f32> = (0..batch * positions * width)
        .map(|i| (i as f32 * 0.173).sin())
        .collect();
    let cos: Vec<f32> = (0..positions * hd)
        .map(|i| (i as f32 * 0.31).cos())
        .collect();
    let sin: Vec<f32> = (0..positions * hd)
        .map(|i| (i as f32 * 0.29).sin())
        .collect();
    let list = |v: &[f32]| {
        v.iter()
            .map(|f| format!("{f:.9e}f"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let pairs = batch * positions * cols / 2;
    let rows = run_harness(
        "rope",
        &format!(
            "float x[] = {{{}}}; const float c[] = {{{}}}; const float s[] = {{{}}};\n\
             for (long i = 0; i < {pairs}; ++i) {{ long t; long e = rope_pair_index(i, {width}, \
             {positions}, {offset}, {cols}, {hd}, &t); float a, b; rope_pair_f(x[e], x[e + 1], \
             c[t], s[t], c[t + 1], s[t + 1], &a, &b); x[e] = a; x[e + 1] = b; }}\n\
             for (long i = 0; i < {n}; ++i) printf(\"%.9g\\n\", x[i]);",
            list(&x),
            list(&cos),
            list(&sin),
            n = x.len()
        ),
    );
    let want = rope_slow(&x, width, positions, offset, cols, &cos, &sin);
    assert_eq!(rows.len(), want.len());
    for (i, (r, w)) in rows.iter().zip(&want).enumerate() {
        assert!(
            (r[0] - *w as f64).abs() <= 1e-6 * (1.0 + w.abs() as f64),
            "element {i}: device math {}, CPU reference {w}",
            r[0]
        );
    }
    // The queries' columns (before the offset) and the values' (after) are untouched.
    let touched = |i: usize| (offset..offset + cols).contains(&(i % width));
    assert!(want
        .iter()
        .zip(&x)
        .enumerate()
        .all(|(i, (w, x))| touched(i) || w == x));
}

/// The tensor-core attention's fragment layouts (`mma_frag_a/b/c` in math.cuh, the PTX ISA's
/// tables for mma.m16n8k16 with 16-bit inputs and f32 accumulators): each covers its matrix
/// exactly once over the warp, agrees with the ISA's formulas at spot lanes, and the score
/// accumulators of two n-tiles are the next product's A operand as `mma_p_source` says
/// (FlashAttention-2's register reuse of P).
#[test]
fn mma_fragment_layouts_cover_their_tiles_and_p_reuses_the_scores() {
    let rows = run_harness(
        "mma",
        "int r, c, tile, ci;\n\
         for (int lane = 0; lane < 32; ++lane) {\n\
           for (int i = 0; i < 8; ++i) { mma_frag_a(lane, i, &r, &c); printf(\"0 %d %d %d %d\\n\", lane, i, r, c); }\n\
           for (int i = 0; i < 4; ++i) { mma_frag_b(lane, i, &r, &c); printf(\"1 %d %d %d %d\\n\", lane, i, r, c); }\n\
           for (int i = 0; i < 4; ++i) { mma_frag_c(lane, i, &r, &c); printf(\"2 %d %d %d %d\\n\", lane, i, r, c); }\n\
           for (int i = 0; i < 8; ++i) { mma_p_source(i, &tile, &ci); mma_frag_c(lane, ci, &r, &c);\n\
             printf(\"3 %d %d %d %d\\n\", lane, i, r, c + 8 * tile); }\n\
         }",
    );
    let at = |kind: usize, lane: usize, i: usize| -> (usize, usize) {
        let r = rows
            .iter()
            .find(|r| r[0] as usize == kind && r[1] as usize == lane && r[2] as usize == i)
            .unwrap();
        (r[3] as usize, r[4] as usize)
    };
    // Coverage: A 16 x 16 (8 per lane), B 16 x 8 and C 16 x 8 (4 per lane), each element once.
    for (kind, per_lane, (h, w)) in [(0, 8, (16, 16)), (1, 4, (16, 8)), (2, 4, (16, 8))] {
        let mut seen = vec![0; h * w];
        for lane in 0..32 {
            for i in 0..per_lane {
                let (r, c) = at(kind, lane, i);
                assert!(
                    r < h && c < w,
                    "kind {kind} lane {lane} element {i}: ({r}, {c})"
                );
                seen[r * w + c] += 1;
            }
        }
        assert!(
            seen.iter().all(|&n| n == 1),
            "kind {kind} does not cover its tile once"
        );
    }
    // The ISA's formulas at lane 5 (groupID 1, threadID_in_group 1).
    let a: Vec<_> = (0..8).map(|i| at(0, 5, i)).collect();
    assert_eq!(
        a,
        [
            (1, 2),
            (1, 3),
            (9, 2),
            (9, 3),
            (1, 10),
            (1, 11),
            (9, 10),
            (9, 11)
        ]
    );
    let b: Vec<_> = (0..4).map(|i| at(1, 5, i)).collect();
    assert_eq!(b, [(2, 1), (3, 1), (10, 1), (11, 1)]);
    let c: Vec<_> = (0..4).map(|i| at(2, 5, i)).collect();
    assert_eq!(c, [(1, 2), (1, 3), (9, 2), (9, 3)]);
    // P: A element i of every lane is the score accumulator mma_p_source names.
    for lane in 0..32 {
        for i in 0..8 {
            assert_eq!(at(3, lane, i), at(0, lane, i), "lane {lane} element {i}");
        }
    }
}
