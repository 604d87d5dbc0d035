// Attention on tensor cores for bf16 / f16 (FlashAttention-2's scheme): a block of 4 warps takes
// 64 query rows of one (batch, head), 16 per warp, and streams the keys through shared memory 64
// at a time. Scores S = Q K^T and the output O += P V are mma.sync.m16n8k16 products with f32
// accumulators held in registers; the softmax is online (running row maximum and sum in f32,
// the accumulators rescaled as the maximum grows), P goes from S's accumulators to the next
// product's operand registers without shared memory. Same contract as attention.cu: strided
// views, an optional f32 key bias [B, Sk] (-inf removes a key), an optional f32 log-sum-exp
// [B, Sq, heads], output [B, Sq, heads * head_dim] contiguous; a query row whose keys are all
// removed gets zeros and -inf. The head dimension is padded with zeros to DP (a multiple of 16,
// one instantiation per DP). Fragment layouts: PTX ISA "Matrix Fragments for mma.m16n8k16"
// (mma_frag_* in math.cuh, checked on the host by kernels/tests/cuda_math_host.rs).
#include "common.cuh"

struct View {
    long batch_stride, row_stride, col_offset;
};

#define FLASH_WARPS 4
#define FLASH_QT (16 * FLASH_WARPS)  // query rows per block
#define FLASH_KT 64                  // keys per shared-memory tile

// Two values as one 32-bit operand register of T (the first in the low half).
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}
template <> __device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// PF_HOST_WARP: kernels/tests/cuda_flash_emulated.rs compiles this file as host C++ with a warp
// emulator that supplies its own mma16816.
#ifndef PF_HOST_WARP
// c += a . b for one 16x8x16 tile (a: 4 registers, b: 2, c: 4 f32).
template <typename T> __device__ __forceinline__ void mma16816(float* c, const unsigned* a, const unsigned* b);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma16816<__half>(float* c, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// Two consecutive T of shared memory (an even element index) as one operand register.
template <typename T> __device__ __forceinline__ unsigned shared_pair(const T* p) {
    return *reinterpret_cast<const unsigned*>(p);
}

template <typename T, int DP>
__device__ void flash_attention_impl(float* lse, T* out, const T* q, View qv, const T* k, View kv,
                                     const T* v, View vv, const float* bias, int heads,
                                     int head_dim, long sq, long sk, float scale) {
    constexpr int LDK = DP + 8;         // a key's row in ks (padded against bank conflicts)
    constexpr int LDV = FLASH_KT + 8;   // a dimension's row in vt (V transposed)
    __shared__ __align__(16) T ks[FLASH_KT * LDK];
    __shared__ __align__(16) T vt[DP * LDV];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;  // the fragment's groupID and threadID_in_group
    const long tiles = (sq + FLASH_QT - 1) / FLASH_QT;
    const long bh = blockIdx.x / tiles;
    const int h = bh % heads, b = bh / heads;
    const long row0 = (blockIdx.x % tiles) * FLASH_QT + warp * 16;

    // This warp's 16 query rows as A fragments of the DP / 16 products over the head dimension.
    unsigned qf[DP / 16][4];
    const T* qb = q + b * qv.batch_stride + qv.col_offset + h * head_dim;
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            int fr, fc;
            mma_frag_a(lane, 2 * r, &fr, &fc);
            const long row = row0 + fr;
            const int col = kk * 16 + fc;
            const T* qr = qb + row * qv.row_stride;
            const float lo = row < sq && col < head_dim ? to_f32(qr[col]) : 0.0f;
            const float hi = row < sq && col + 1 < head_dim ? to_f32(qr[col + 1]) : 0.0f;
            qf[kk][r] = pack2<T>(lo, hi);
        }
    }
    float o[DP / 8][4];
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    // Rows g and g + 8 of the warp: running maximum, and this thread's share of the running sum.
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    const T* kb = k + b * kv.batch_stride + kv.col_offset + h * head_dim;
    const T* vb = v + b * vv.batch_stride + vv.col_offset + h * head_dim;
    const float* bb = bias ? bias + b * sk : nullptr;
    const T zero = from_f32<T>(0.0f);

    for (long k0 = 0; k0 < sk; k0 += FLASH_KT) {
        __syncthreads();  // the previous tile is read by every warp
        for (int i = threadIdx.x; i < FLASH_KT * DP; i += blockDim.x) {
            const int key = i / DP, d = i % DP;
            const bool in = k0 + key < sk && d < head_dim;
            ks[key * LDK + d] = in ? kb[(k0 + key) * kv.row_stride + d] : zero;
            vt[d * LDV + key] = in ? vb[(k0 + key) * vv.row_stride + d] : zero;
        }
        __syncthreads();

        // S = Q K^T: n-tile j holds keys 8j..8j+7 (B fragment: K's rows, consecutive dims).
        float s[FLASH_KT / 8][4];
#pragma unroll
        for (int j = 0; j < FLASH_KT / 8; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < DP / 16; ++kk) {
                unsigned kf[2];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    int fk, fn;
                    mma_frag_b(lane, 2 * r, &fk, &fn);
                    kf[r] = shared_pair(ks + (8 * j + fn) * LDK + kk * 16 + fk);
                }
                mma16816<T>(s[j], qf[kk], kf);
            }
        }
        // Scale, key bias and the keys past the end; each row's maximum over the tile (a row's
        // values are spread over the 4 threads of a group).
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int j = 0; j < FLASH_KT / 8; ++j) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                int row, col;
                mma_frag_c(lane, c, &row, &col);
                const long key = k0 + 8 * j + col;
                const float x = key < sk ? s[j][c] * scale + (bb ? bb[key] : 0.0f) : NEG_INF;
                s[j][c] = x;
                mx[row >= 8] = fmaxf(mx[row >= 8], x);
            }
        }
        float factor[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            factor[r] = online_softmax_rescale(&m[r], &l[r], mx[r]);
        }
#pragma unroll
        for (int n = 0; n < DP / 8; ++n) {
            o[n][0] *= factor[0];
            o[n][1] *= factor[0];
            o[n][2] *= factor[1];
            o[n][3] *= factor[1];
        }
        // P = exp(S - m) (zero for removed keys and rows with no key yet).
#pragma unroll
        for (int j = 0; j < FLASH_KT / 8; ++j) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int r = c >> 1;
                const float p = m[r] == NEG_INF ? 0.0f : expf(s[j][c] - m[r]);
                s[j][c] = p;
                l[r] += p;
            }
        }
        // O += P V over 16 keys at a time: P's A fragment is S's n-tiles 2kc and 2kc + 1 as
        // they are (mma_frag_p_from_c), V's B fragment a row of V^T.
#pragma unroll
        for (int kc = 0; kc < FLASH_KT / 16; ++kc) {
            unsigned pf[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                int t0, c0, t1, c1;
                mma_p_source(2 * r, &t0, &c0);
                mma_p_source(2 * r + 1, &t1, &c1);
                pf[r] = pack2<T>(s[2 * kc + t0][c0], s[2 * kc + t1][c1]);
            }
#pragma unroll
            for (int n = 0; n < DP / 8; ++n) {
                unsigned vf[2];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    int fk, fn;
                    mma_frag_b(lane, 2 * r, &fk, &fn);
                    vf[r] = shared_pair(vt + (8 * n + fn) * LDV + 16 * kc + fk);
                }
                mma16816<T>(o[n], pf, vf);
            }
        }
    }

    // The row sums over the group's 4 threads; O / l; the log-sum-exp.
    const long width = (long)heads * head_dim;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        const long row = row0 + g + 8 * r;  // mma_frag_c: c0, c1 in row g; c2, c3 in g + 8
        if (row >= sq) continue;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        T* orow = out + ((long)b * sq + row) * width + h * head_dim;
#pragma unroll
        for (int n = 0; n < DP / 8; ++n) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int col = 8 * n + 2 * t + c;  // mma_frag_c's column
                if (col < head_dim) orow[col] = from_f32<T>(o[n][2 * r + c] * inv);
            }
        }
        if (lse && t == 0) lse[((long)b * sq + row) * heads + h] = l[r] > 0.0f ? m[r] + logf(l[r]) : NEG_INF;
    }
}

#define FLASH_ATTENTION(SUFFIX, T, DP)                                                           \
    extern "C" __global__ void __launch_bounds__(32 * FLASH_WARPS) flash_attention_d##DP##_##SUFFIX( \
        float* lse, T* out, const T* q, View qv, const T* k, View kv, const T* v, View vv,      \
        const float* bias, int heads, int head_dim, long sq, long sk, float scale) {            \
        flash_attention_impl<T, DP>(lse, out, q, qv, k, kv, v, vv, bias, heads, head_dim, sq,   \
                                    sk, scale);                                                 \
    }

#define FLASH_ATTENTION_DTYPES(DP)                 \
    FLASH_ATTENTION(bf16, __nv_bfloat16, DP)       \
    FLASH_ATTENTION(f16, __half, DP)

FLASH_ATTENTION_DTYPES(16)
FLASH_ATTENTION_DTYPES(32)
FLASH_ATTENTION_DTYPES(64)
FLASH_ATTENTION_DTYPES(80)
FLASH_ATTENTION_DTYPES(128)
