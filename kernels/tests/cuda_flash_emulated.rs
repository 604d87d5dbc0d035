//! The tensor-core attention kernel (`src/cuda/kernels/flash_attention.cu`) run without a GPU:
//! its source is compiled as host C++ with a warp emulator (one host thread per CUDA thread, a
//! block barrier for `__syncthreads`, a warp barrier for the shuffles, and `mma.sync.m16n8k16`
//! computed from the fragments as the PTX ISA lays them out: `mma_frag_*` in math.cuh, checked
//! against the ISA in `cuda_math_host.rs`). Everything else is the kernel's own code: the query
//! and key tiling, the shared-memory tiles and their zero padding, scale, key bias and masks, the
//! online softmax and rescaling, P reused from the score registers, the strided views, the
//! output and log-sum-exp. Its bf16 results are compared with the CPU backend's f32 attention
//! on the same bf16-rounded inputs (relative L2 <= 5e-3; 1.8e-3 is seen: P is rounded to bf16
//! before P V, as on the GPU; a rescale applied to the wrong row gives 1e-2). The emulator is
//! `common/cuda_emu.rs`; it needs a C++20 compiler (`c++` or `CXX`).

#![cfg(feature = "cuda")]

mod common;

use common::cuda_emu::Emu;
use common::rel_l2;
use kernels::cuda::launch::KernelView;
use kernels::cuda::plan;
use kernels::{AttnView, DType, Device, Tensor};

const FLASH: &str = include_str!("../src/cuda/kernels/flash_attention.cu");

/// One bf16 attention, which the plan gives to `flash_attention_d{dp}_bf16`: views as
/// `[batch_stride, row_stride, col_offset]` of the q / k / v buffers.
struct Case<'a> {
    dp: usize,
    q: (&'a [f32], [usize; 3]),
    k: (&'a [f32], [usize; 3]),
    v: (&'a [f32], [usize; 3]),
    bias: Option<&'a [f32]>,
    batch: usize,
    heads: usize,
    head_dim: usize,
    sq: usize,
    sk: usize,
}

/// Runs the case under the emulator: (output, log-sum-exp).
fn run_emulated(tag: &str, c: &Case) -> (Vec<f32>, Vec<f32>) {
    let bf16 = "__nv_bfloat16";
    let mut emu = Emu::new(FLASH);
    emu.input("q", bf16, c.q.0)
        .input("k", bf16, c.k.0)
        .input("v", bf16, c.v.0)
        .input("bias", "float", c.bias.unwrap_or(&[0.0]))
        .output("out", bf16, c.batch * c.sq * c.heads * c.head_dim)
        .output("lse", "float", c.batch * c.sq * c.heads);
    let layout = |v: [usize; 3]| KernelView {
        batch_stride: v[0] as i64,
        row_stride: v[1] as i64,
        col_offset: v[2] as i64,
    };
    let args = plan::AttentionArgs {
        lse: emu.address("lse"),
        out: emu.address("out"),
        q: (emu.address("q"), layout(c.q.1)),
        k: (emu.address("k"), layout(c.k.1)),
        v: (emu.address("v"), layout(c.v.1)),
        bias: if c.bias.is_some() {
            emu.address("bias")
        } else {
            0
        },
        batch: c.batch,
        heads: c.heads,
        head_dim: c.head_dim,
        sq: c.sq,
        sk: c.sk,
    };
    // The launch `CudaDevice::attention` makes for bf16 on a GPU with tensor cores.
    let l = plan::attention(&args, DType::BF16, true);
    assert_eq!(l.entry.base, format!("flash_attention_d{}", c.dp));
    emu.launch_plan(&l, "bf16");
    let mut out = emu.run(tag);
    (out.remove("out").unwrap(), out.remove("lse").unwrap())
}

/// Deterministic values rounded to bf16 (what the kernel reads).
fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| kernels::bf16_to_f32(kernels::bf16_bits((i as f32 * seed).sin() * 1.5)))
        .collect()
}

/// A fused QKV `[B, S, 3d]` (the views a self-attention reads) with a ragged length: two query
/// tiles, two key tiles (the second partial), head_dim 24 padded to 32; no bias.
#[test]
fn emulated_flash_kernel_matches_the_cpu_attention_on_a_fused_qkv() {
    let (batch, s, heads, hd) = (2, 70, 2, 24);
    let d = heads * hd;
    let qkv = values(batch * s * 3 * d, 0.37);
    let strides = |col: usize| [s * 3 * d, 3 * d, col];
    let case = Case {
        dp: 32,
        q: (&qkv, strides(0)),
        k: (&qkv, strides(d)),
        v: (&qkv, strides(2 * d)),
        bias: None,
        batch,
        heads,
        head_dim: hd,
        sq: s,
        sk: s,
    };
    let (out, lse) = run_emulated("fused", &case);
    let t = Tensor::from_vec(qkv.clone(), &[batch, s, 3 * d]).unwrap();
    let cpu = Device::cpu(1).unwrap();
    let view = |c| AttnView::of(&t, c).unwrap();
    let (want, want_lse) = cpu
        .attention_with_lse(view(0), view(d), view(2 * d), None, batch, heads, hd)
        .unwrap();
    let e = rel_l2(&out, want.as_f32().unwrap());
    assert!(e <= 5e-3, "output relative L2 {e:.3e}");
    let e = rel_l2(&lse, want_lse.as_f32().unwrap());
    assert!(e <= 1e-3, "log-sum-exp relative L2 {e:.3e}");
}

/// PipeFusion's shape: a few query rows against a longer K/V buffer (three key tiles), a key
/// bias with removed keys, one batch element with every key removed (zeros and -inf), and
/// DiT-XL's head_dim 72 padded to 80.
#[test]
fn emulated_flash_kernel_handles_a_buffer_a_bias_and_removed_rows() {
    let (batch, sq, sk, heads, hd) = (2, 20, 130, 2, 72);
    let d = heads * hd;
    let q = values(batch * sq * d, 0.23);
    let kv = values(batch * sk * 2 * d, 0.71);
    let mut bias = vec![0f32; batch * sk];
    for (i, b) in bias.iter_mut().enumerate() {
        let (bi, key) = (i / sk, i % sk);
        *b = match (bi, key % 7) {
            (1, _) | (0, 3) => f32::NEG_INFINITY,
            _ => (key as f32 * 0.05).cos(),
        };
    }
    let case = Case {
        dp: 80,
        q: (&q, [sq * d, d, 0]),
        k: (&kv, [sk * 2 * d, 2 * d, 0]),
        v: (&kv, [sk * 2 * d, 2 * d, d]),
        bias: Some(&bias),
        batch,
        heads,
        head_dim: hd,
        sq,
        sk,
    };
    let (out, lse) = run_emulated("buffer", &case);
    let (want, want_lse) =
        common::cpu_buffer_attention(&q, &kv, Some(&bias), (batch, sq, sk, heads, hd));
    let half = sq * d;
    let e = rel_l2(&out[..half], &want[..half]);
    assert!(e <= 5e-3, "output relative L2 {e:.3e}");
    // Batch element 1 has no key: zeros and -inf, as the CPU gives.
    assert!(
        out[half..].iter().all(|&x| x == 0.0),
        "removed rows not zero"
    );
    assert!(lse[sq * heads..].iter().all(|&x| x == f32::NEG_INFINITY));
    assert!(want_lse[sq * heads..]
        .iter()
        .all(|&x| x == f32::NEG_INFINITY));
    let e = rel_l2(&lse[..sq * heads], &want_lse[..sq * heads]);
    assert!(e <= 1e-3, "log-sum-exp relative L2 {e:.3e}");
}
