//! Every NVRTC kernel but the tensor-core one (`cuda_flash_emulated.rs`) run from its own source
//! under the CUDA emulator (`common/cuda_emu.rs`: host threads per CUDA thread, real barriers
//! and shuffles), with the launches the CUDA ops make (`kernels::cuda::plan`: the entry, the
//! parameter values in order, the grid), against the CPU backend's ops: grid-stride loops, one
//! block per row with block reductions, one warp per row with warp reductions and dynamic
//! shared memory. f32 results agree to 1e-5 (relative L2); the bf16 entries to 1e-2 (their
//! inputs and outputs rounded). Without a GPU this is what checks the kernels and the values the
//! ops pass them before a GPU session runs them.
#![cfg(feature = "cuda")]

mod common;

use common::cuda_emu::Emu;
use common::rel_l2;
use kernels::cuda::launch::KernelView;
use kernels::cuda::plan;
use kernels::reference::ConvGeom;
use kernels::{AttnView, Device, Tensor};

const ELEMENTWISE: &str = include_str!("../src/cuda/kernels/elementwise.cu");
const NORM: &str = include_str!("../src/cuda/kernels/norm.cu");
const ATTENTION: &str = include_str!("../src/cuda/kernels/attention.cu");
const IMAGE: &str = include_str!("../src/cuda/kernels/image.cu");

/// Deterministic values in [-1.5, 1.5].
fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * seed).sin() * 1.5).collect()
}

fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape).unwrap()
}

fn close(what: &str, got: &[f32], want: &Tensor, tol: f64) {
    let want = want.as_f32().unwrap();
    assert_eq!(got.len(), want.len(), "{what}: length");
    let e = rel_l2(got, want);
    assert!(e <= tol, "{what}: relative L2 {e:.3e} > {tol:e}");
}

#[test]
fn emulated_elementwise_kernels_match_the_cpu_ops() {
    let cpu = Device::cpu(1).unwrap();
    let (b, n, c) = (2, 7, 100);
    let len = b * n * c;
    let (x, y, g) = (values(len, 0.37), values(len, 0.11), values(b * c, 0.53));
    let rows = values(n * c, 0.29);
    // Rotary tables for a fused QKV of 2 heads of 8 (keys: columns 16..32 of 48).
    let (pos, hd) = (n, 8);
    let qkv = values(b * pos * 48, 0.43);
    let (cos, sin) = (values(pos * hd, 0.21), values(pos * hd, 0.17));
    for (ty, tol) in [("float", 1e-5), ("__nv_bfloat16", 1e-2)] {
        let sfx = if ty == "float" { "f32" } else { "bf16" };
        let mut emu = Emu::new(ELEMENTWISE);
        emu.input("gelu", ty, &x)
            .input("silu", ty, &x)
            .input("silu1", ty, &x)
            .input("gated", ty, &x)
            .input("y", ty, &y)
            .input("gate", ty, &g)
            .input("cyclic", ty, &x)
            .input("rows", ty, &rows)
            .input("qkv", ty, &qkv)
            .input("cos", "float", &cos)
            .input("sin", "float", &sin);
        let a = |n: &str| emu.address(n);
        // One grid smaller than its elements: the grid-stride loop covers the rest.
        let mut one_block = plan::activation(true, a("silu1"), len);
        one_block.cfg.grid_dim.0 = 1;
        let launches = [
            plan::activation(false, a("gelu"), len),
            plan::activation(true, a("silu"), len),
            one_block,
            plan::add_gated(a("gated"), a("y"), a("gate"), len, (b, c)),
            plan::add_cyclic(a("cyclic"), a("rows"), len, rows.len()),
            plan::rope(
                a("qkv"),
                (a("cos"), a("sin")),
                b * pos,
                (48, pos, 16, 16),
                hd,
            ),
        ];
        for l in &launches {
            emu.launch_plan(l, sfx);
        }
        let got = emu.run(&format!("elementwise-{sfx}"));
        let shape = [b, n, c];
        let mut want = t(&x, &shape);
        cpu.gelu_tanh_(&mut want).unwrap();
        close("gelu_tanh", &got["gelu"], &want, tol);
        let want = cpu.silu(&t(&x, &shape)).unwrap();
        close("silu", &got["silu"], &want, tol);
        close("silu on one block", &got["silu1"], &want, tol);
        let mut want = t(&x, &shape);
        cpu.add_gated_(&mut want, &t(&y, &shape), Some(&t(&g, &[b, c])))
            .unwrap();
        close("add_gated", &got["gated"], &want, tol);
        let mut want = t(&x, &shape);
        cpu.add_broadcast_(&mut want, &t(&rows, &[n, c])).unwrap();
        close("add_cyclic", &got["cyclic"], &want, tol);
        let mut want = t(&qkv, &[b, pos, 48]);
        cpu.rope_(
            &mut want,
            16,
            16,
            &t(&cos, &[pos, hd]),
            &t(&sin, &[pos, hd]),
        )
        .unwrap();
        close("rope", &got["qkv"], &want, tol);
    }
}

#[test]
fn emulated_norm_kernels_match_the_cpu_ops() {
    let cpu = Device::cpu(1).unwrap();
    // 300 channels: more than a block's 256 threads, so each thread takes two.
    let (b, n, c) = (2, 3, 300);
    let x = values(b * n * c, 0.71);
    let (shift, scale) = (values(b * c, 0.13), values(b * c, 0.31));
    let (gamma, beta) = (values(c, 0.23), values(c, 0.19));
    // Per-head RMS norm of the keys of a fused QKV of 4 heads of 40 (columns 160..320 of 480).
    let qkv = values(b * n * 480, 0.41);
    let weight = values(40, 0.61);
    let mut emu = Emu::new(NORM);
    emu.input("x", "float", &x)
        .input("shift", "float", &shift)
        .input("scale", "float", &scale)
        .input("gamma", "float", &gamma)
        .input("beta", "float", &beta)
        .input("qkv", "float", &qkv)
        .input("weight", "float", &weight)
        .output("mod", "float", x.len())
        .output("ln", "float", x.len());
    let a = |n: &str| emu.address(n);
    let (rows, eps) = (b * n, 1e-6);
    let launches = [
        plan::layer_norm_modulate(
            (a("mod"), a("x")),
            (a("shift"), a("scale")),
            rows,
            (n, c),
            eps,
        ),
        plan::layer_norm((a("ln"), a("x")), (a("gamma"), a("beta")), rows, c, eps),
        plan::rms_norm_groups(a("qkv"), a("weight"), rows, (480, 160, 160), 40, eps),
    ];
    for l in &launches {
        emu.launch_plan(l, "f32");
    }
    let got = emu.run("norm");
    let xt = t(&x, &[b, n, c]);
    let want = cpu
        .layer_norm_modulate(&xt, &t(&shift, &[b, c]), &t(&scale, &[b, c]), 1e-6)
        .unwrap();
    close("layer_norm_modulate", &got["mod"], &want, 1e-5);
    let want = cpu
        .layer_norm(&xt, Some(&t(&gamma, &[c])), Some(&t(&beta, &[c])), 1e-6)
        .unwrap();
    close("layer_norm", &got["ln"], &want, 1e-5);
    let mut want = t(&qkv, &[b, n, 480]);
    cpu.rms_norm_groups_(&mut want, 160, 160, &t(&weight, &[40]), 1e-6)
        .unwrap();
    close("rms_norm_groups", &got["qkv"], &want, 1e-5);
}

/// The row attention kernel (f32, and bf16 / f16 before sm_80) on a query subset against a
/// longer K/V buffer with a key bias (removed keys, one batch element with none left).
#[test]
fn emulated_row_attention_matches_the_cpu_attention() {
    let (batch, sq, sk, heads, hd) = (2, 5, 70, 2, 24);
    let d = heads * hd;
    let q = values(batch * sq * d, 0.23);
    let kv = values(batch * sk * 2 * d, 0.71);
    let bias: Vec<f32> = (0..batch * sk)
        .map(|i| match (i / sk, i % 5) {
            (1, _) | (0, 2) => f32::NEG_INFINITY,
            _ => (i as f32 * 0.05).cos(),
        })
        .collect();
    let mut emu = Emu::new(ATTENTION);
    emu.input("q", "float", &q)
        .input("kv", "float", &kv)
        .input("bias", "float", &bias)
        .output("out", "float", batch * sq * d)
        .output("lse", "float", batch * sq * heads);
    let layout = |batch_stride: usize, row_stride: usize, col_offset: usize| KernelView {
        batch_stride: batch_stride as i64,
        row_stride: row_stride as i64,
        col_offset: col_offset as i64,
    };
    let args = plan::AttentionArgs {
        lse: emu.address("lse"),
        out: emu.address("out"),
        q: (emu.address("q"), layout(sq * d, d, 0)),
        k: (emu.address("kv"), layout(sk * 2 * d, 2 * d, 0)),
        v: (emu.address("kv"), layout(sk * 2 * d, 2 * d, d)),
        bias: emu.address("bias"),
        batch,
        heads,
        head_dim: hd,
        sq,
        sk,
    };
    // f32: the row kernel whatever the GPU.
    let l = plan::attention(&args, kernels::DType::F32, true);
    assert_eq!(l.entry.base, "attention");
    emu.launch_plan(&l, "f32");
    let got = emu.run("attention");
    let (want, wl) = common::cpu_buffer_attention(&q, &kv, Some(&bias), (batch, sq, sk, heads, hd));
    let want = t(&want, &[batch, sq, d]);
    close("attention", &got["out"], &want, 1e-5);
    let l = &got["lse"];
    let finite = sq * heads;
    assert!(rel_l2(&l[..finite], &wl[..finite]) <= 1e-5, "log-sum-exp");
    assert!(l[finite..].iter().all(|&x| x == f32::NEG_INFINITY));
    assert!(got["out"][sq * d..].iter().all(|&x| x == 0.0));
}

/// Ring attention's merge kernel: two key blocks attended separately (by the CPU) and merged by
/// the kernel equal the attention over all keys.
#[test]
fn emulated_merge_kernel_matches_the_whole_attention() {
    let cpu = Device::cpu(1).unwrap();
    let (batch, s, heads, hd) = (2, 9, 2, 16);
    let d = heads * hd;
    let qkv = t(&values(batch * s * 3 * d, 0.31), &[batch, s, 3 * d]);
    fn view(t: &Tensor, c: usize) -> AttnView<'_> {
        AttnView::of(t, c).unwrap()
    }
    let (whole, _) = cpu
        .attention_with_lse(
            view(&qkv, 0),
            view(&qkv, d),
            view(&qkv, 2 * d),
            None,
            batch,
            heads,
            hd,
        )
        .unwrap();
    let (a, b) = (
        qkv.narrow(1, 0, 4).unwrap(),
        qkv.narrow(1, 4, s - 4).unwrap(),
    );
    let attend = |kv: &Tensor| {
        cpu.attention_with_lse(
            view(&qkv, 0),
            view(kv, d),
            view(kv, 2 * d),
            None,
            batch,
            heads,
            hd,
        )
        .unwrap()
    };
    let ((acc, acc_lse), (part, part_lse)) = (attend(&a), attend(&b));
    let f = |t: &Tensor| t.as_f32().unwrap().to_vec();
    let rows = acc_lse.elem_count();
    let mut emu = Emu::new(ATTENTION);
    emu.input("acc", "float", &f(&acc))
        .input("acc_lse", "float", &f(&acc_lse))
        .input("part", "float", &f(&part))
        .input("part_lse", "float", &f(&part_lse));
    let a = |n: &str| emu.address(n);
    let l = plan::merge_attention(
        (a("acc"), a("acc_lse")),
        (a("part"), a("part_lse")),
        rows,
        hd,
    );
    emu.launch_plan(&l, "f32");
    let got = emu.run("merge");
    close("merged attention", &got["acc"], &whole, 1e-5);
}

#[test]
fn emulated_image_kernels_match_the_cpu_ops() {
    let cpu = Device::cpu(1).unwrap();
    let (b, c, h, w, groups) = (2, 6, 5, 7, 3);
    let x = values(b * c * h * w, 0.37);
    let (gamma, beta) = (values(c, 0.23), values(c, 0.19));
    // A 3x3 convolution with padding 1 of image 1 of the batch: im2col, then the GEMM in Rust.
    let (o, kk) = (4, 3);
    let wt = values(o * c * kk * kk, 0.11);
    let (p, k) = (h * w, c * kk * kk);
    let mut emu = Emu::new(IMAGE);
    emu.input("x", "float", &x)
        .input("gamma", "float", &gamma)
        .input("beta", "float", &beta)
        .output("gn", "float", x.len())
        .output("up", "float", x.len() * 4)
        .output("tr", "float", x.len())
        .output("cols", "float", p * k);
    let a = |n: &str| emu.address(n);
    let geom = ConvGeom {
        batch: b,
        c_in: c,
        h,
        w,
        c_out: o,
        kh: kk,
        kw: kk,
        pad: 1,
    };
    // Image 1 of the batch: its byte offset, as conv2d adds it.
    let image1 = a("x") + (c * h * w * 4) as u64;
    let launches = [
        plan::group_norm(
            (a("gn"), a("x")),
            (a("gamma"), a("beta")),
            (b, groups),
            (c, h * w),
            1e-6,
        ),
        plan::upsample_nearest2x((a("up"), a("x")), b * c, (h, w)),
        plan::transpose_last2((a("tr"), a("x")), (b * c, h, w)),
        plan::im2col(a("cols"), image1, &geom),
    ];
    for l in &launches {
        emu.launch_plan(l, "f32");
    }
    let got = emu.run("image");
    let xt = t(&x, &[b, c, h, w]);
    let want = cpu
        .group_norm(
            &xt,
            groups,
            Some(&t(&gamma, &[c])),
            Some(&t(&beta, &[c])),
            1e-6,
        )
        .unwrap();
    close("group_norm", &got["gn"], &want, 1e-5);
    close(
        "upsample",
        &got["up"],
        &cpu.upsample_nearest2x(&xt).unwrap(),
        0.0,
    );
    close(
        "transpose",
        &got["tr"],
        &cpu.transpose_last2(&t(&x, &[b * c, h, w])).unwrap(),
        0.0,
    );
    let conv = cpu.conv2d(&xt, &t(&wt, &[o, c, kk, kk]), None, 1).unwrap();
    let cols = &got["cols"];
    let mut y = vec![0f32; o * p];
    for pi in 0..p {
        for oi in 0..o {
            y[oi * p + pi] = (0..k).map(|q| cols[pi * k + q] * wt[oi * k + q]).sum();
        }
    }
    let want = conv.narrow(0, 1, 1).unwrap();
    close("im2col + GEMM", &y, &want, 1e-5);
}
