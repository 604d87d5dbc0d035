//! The tensor-core attention kernel (`src/cuda/kernels/flash_attention.cu`) run without a GPU:
//! its source is compiled as host C++ with a warp emulator (one host thread per CUDA thread, a
//! block barrier for `__syncthreads`, a warp barrier for the shuffles, and `mma.sync.m16n8k16`
//! computed from the fragments as the PTX ISA lays them out: `mma_frag_*` in math.cuh, checked
//! against the ISA in `cuda_math_host.rs`). Everything else is the kernel's own code: the query
//! and key tiling, the shared-memory tiles and their zero padding, scale, key bias and masks, the
//! online softmax and rescaling, P reused from the score registers, the strided views, the
//! output and log-sum-exp. Its bf16 results are compared with the CPU backend's f32 attention
//! on the same bf16-rounded inputs (relative L2 <= 5e-3; 1.8e-3 is seen: P is rounded to bf16
//! before P V, as on the GPU; a rescale applied to the wrong row gives 1e-2). Needs a C++20 compiler (`c++` or `CXX`).

mod common;

use std::process::Command;

use common::rel_l2;

use kernels::{AttnView, Device, Tensor};

const MATH: &str = include_str!("../src/cuda/kernels/math.cuh");
const FLASH: &str = include_str!("../src/cuda/kernels/flash_attention.cu");

/// The CUDA built-ins the kernel uses, on the host.
const SHIM: &str = r#"
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <barrier>
#include <memory>
#include <thread>
#include <vector>
#define PF_HOST_WARP 1
#define PF_FN inline
#define PF_NEG_INF (-INFINITY)
#define NEG_INF (-INFINITY)
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
struct Dim { unsigned x, y, z; };
static thread_local Dim threadIdx, blockIdx;
static Dim blockDim;

struct __nv_bfloat16 { uint16_t bits; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
struct __half { uint16_t bits; };
struct __half2 { __half x, y; };
static inline float to_f32(float v) { return v; }
static inline float to_f32(__nv_bfloat16 v) { uint32_t u = (uint32_t)v.bits << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float to_f32(__half v) { _Float16 h; memcpy(&h, &v.bits, 2); return (float)h; }
template <typename T> T from_f32(float v);
template <> float from_f32<float>(float v) { return v; }
template <> __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    uint32_t u; memcpy(&u, &v, 4); u += 0x7fffu + ((u >> 16) & 1u); return __nv_bfloat16{(uint16_t)(u >> 16)};
}
template <> __half from_f32<__half>(float v) { _Float16 h = (_Float16)v; __half r; memcpy(&r.bits, &h, 2); return r; }
static inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {from_f32<__nv_bfloat16>(a), from_f32<__nv_bfloat16>(b)}; }
static inline __half2 __floats2half2_rn(float a, float b) { return {from_f32<__half>(a), from_f32<__half>(b)}; }
"#;

/// The warp emulator: barriers, shuffles and the tensor-core product (after math.cuh).
const WARP: &str = r#"
struct Warp {
    std::unique_ptr<std::barrier<>> bar;
    float a[32][8], b[32][4], v[32];
};
static std::barrier<>* block_barrier;
static Warp warps[4];
static inline int lane_id() { return threadIdx.x & 31; }
static inline Warp& my_warp() { return warps[threadIdx.x >> 5]; }
static inline void __syncthreads() { block_barrier->arrive_and_wait(); }
static inline float __shfl_xor_sync(unsigned, float v, int mask) {
    Warp& w = my_warp();
    w.v[lane_id()] = v;
    w.bar->arrive_and_wait();
    const float r = w.v[lane_id() ^ mask];
    w.bar->arrive_and_wait();
    return r;
}
template <typename T> static float half_of(unsigned reg, int hi) {
    T h; uint16_t bits = hi ? (uint16_t)(reg >> 16) : (uint16_t)(reg & 0xffffu); memcpy(&h, &bits, 2); return to_f32(h);
}
// d = a . b + c with the fragments laid out as math.cuh's mma_frag_a / b / c say.
template <typename T> static void mma16816(float* c, const unsigned* a, const unsigned* b) {
    Warp& w = my_warp();
    const int lane = lane_id();
    for (int i = 0; i < 8; ++i) w.a[lane][i] = half_of<T>(a[i / 2], i & 1);
    for (int i = 0; i < 4; ++i) w.b[lane][i] = half_of<T>(b[i / 2], i & 1);
    w.bar->arrive_and_wait();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        int r, q;
        for (int i = 0; i < 8; ++i) { mma_frag_a(l, i, &r, &q); A[r][q] = w.a[l][i]; }
        for (int i = 0; i < 4; ++i) { mma_frag_b(l, i, &r, &q); B[r][q] = w.b[l][i]; }
    }
    float d[4];
    for (int i = 0; i < 4; ++i) {
        int r, q;
        mma_frag_c(lane, i, &r, &q);
        float acc = c[i];
        for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][q];
        d[i] = acc;
    }
    w.bar->arrive_and_wait();
    for (int i = 0; i < 4; ++i) c[i] = d[i];
}
"#;

/// Runs the kernel's bf16 entry `flash_attention_d{dp}_bf16` on f32 values (bf16-exact) and
/// returns (output, log-sum-exp).
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

fn run_emulated(tag: &str, c: &Case) -> (Vec<f32>, Vec<f32>) {
    let dir = std::env::temp_dir().join(format!("pipefuse-flash-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, v: &[f32]| {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    write("q.bin", c.q.0);
    write("k.bin", c.k.0);
    write("v.bin", c.v.0);
    write("bias.bin", c.bias.unwrap_or(&[]));
    let (out_n, lse_n) = (
        c.batch * c.sq * c.heads * c.head_dim,
        c.batch * c.sq * c.heads,
    );
    let main = format!(
        r#"
static std::vector<__nv_bfloat16> load(const char* path) {{
    FILE* f = fopen(path, "rb"); std::vector<__nv_bfloat16> v; float x;
    while (fread(&x, 4, 1, f) == 1) v.push_back(from_f32<__nv_bfloat16>(x));
    fclose(f); return v;
}}
int main() {{
    auto q = load("q.bin"), k = load("k.bin"), v = load("v.bin");
    std::vector<float> bias; {{ FILE* f = fopen("bias.bin", "rb"); float x; while (fread(&x, 4, 1, f) == 1) bias.push_back(x); fclose(f); }}
    std::vector<__nv_bfloat16> out({out_n});
    std::vector<float> lse({lse_n}, 12345.0f);
    const long sq = {sq}, sk = {sk};
    const int heads = {heads}, head_dim = {head_dim};
    View qv{{{qb}, {qr}, {qc}}}, kv{{{kb}, {kr}, {kc}}}, vv{{{vb}, {vr}, {vc}}};
    const long blocks = {batch} * heads * ((sq + FLASH_QT - 1) / FLASH_QT);
    blockDim = Dim{{32 * FLASH_WARPS, 1, 1}};
    for (long bi = 0; bi < blocks; ++bi) {{
        std::barrier<> block(32 * FLASH_WARPS);
        block_barrier = &block;
        for (auto& w : warps) w.bar = std::make_unique<std::barrier<>>(32);
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < 32 * FLASH_WARPS; ++t)
            threads.emplace_back([&, t] {{
                threadIdx = Dim{{t, 0, 0}};
                blockIdx = Dim{{(unsigned)bi, 0, 0}};
                flash_attention_d{dp}_bf16(lse.data(), out.data(), q.data(), qv, k.data(), kv, v.data(), vv,
                                          bias.empty() ? nullptr : bias.data(), heads, head_dim, sq, sk,
                                          1.0f / sqrtf((float)head_dim));
            }});
        for (auto& t : threads) t.join();
    }}
    FILE* f = fopen("out.bin", "wb");
    for (auto x : out) {{ float y = to_f32(x); fwrite(&y, 4, 1, f); }}
    fwrite(lse.data(), 4, lse.size(), f);
    fclose(f);
    return 0;
}}
"#,
        sq = c.sq,
        sk = c.sk,
        heads = c.heads,
        head_dim = c.head_dim,
        batch = c.batch,
        dp = c.dp,
        qb = c.q.1[0],
        qr = c.q.1[1],
        qc = c.q.1[2],
        kb = c.k.1[0],
        kr = c.k.1[1],
        kc = c.k.1[2],
        vb = c.v.1[0],
        vr = c.v.1[1],
        vc = c.v.1[2],
    );
    let kernel = FLASH.replace("#include \"common.cuh\"", "");
    let program = format!(
        "{SHIM}\n{}\n{WARP}\n{kernel}\n{main}",
        MATH.replace("#pragma once", "")
    );
    let bin = common::build_cpp(
        &dir,
        &program,
        &[
            "-O2",
            "-std=c++20",
            "-pthread",
            "-fno-strict-aliasing",
            "-w",
        ],
    );
    let run = Command::new(&bin).current_dir(&dir).output().unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let bytes = std::fs::read(dir.join("out.bin")).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let all: Vec<f32> = bytes
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(all.len(), out_n + lse_n);
    (all[..out_n].to_vec(), all[out_n..].to_vec())
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
    let (qt, kvt) = (
        Tensor::from_vec(q.clone(), &[batch, sq, d]).unwrap(),
        Tensor::from_vec(kv.clone(), &[batch, sk, 2 * d]).unwrap(),
    );
    let bt = Tensor::from_vec(bias.clone(), &[batch, sk]).unwrap();
    let cpu = Device::cpu(1).unwrap();
    let (want, want_lse) = cpu
        .attention_with_lse(
            AttnView::of(&qt, 0).unwrap(),
            AttnView::of(&kvt, 0).unwrap(),
            AttnView::of(&kvt, d).unwrap(),
            Some(&bt),
            batch,
            heads,
            hd,
        )
        .unwrap();
    let (want, want_lse) = (want.as_f32().unwrap(), want_lse.as_f32().unwrap());
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
