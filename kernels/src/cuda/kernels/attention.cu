// Attention that never holds an S x S matrix: one warp per (batch, head, query row) streams the
// keys 32 at a time (one key per lane) with an online softmax, f32 statistics. Q, K, V are
// strided views like the CPU backend's AttnView (a fused [B, S, 3d] QKV, or a K/V buffer read in
// place; a subset of query rows against a full K/V buffer), with an optional additive key bias
// [B, Sk] (-inf removes a key: PipeFusion's W = 0 mask, PixArt's caption mask) and an optional
// log-sum-exp output [B, Sq, heads] (Ring attention's merge). Head dim <= 128 (4 per lane).
// Output [B, Sq, heads * head_dim], contiguous.
#include "common.cuh"

struct View {
    long batch_stride, row_stride, col_offset;
};

template <typename T>
__device__ void attention_impl(float* lse, T* out, const T* q, View qv, const T* k, View kv,
                               const T* v, View vv, const float* bias, int batch, int heads,
                               int head_dim, long sq, long sk, float scale) {
    extern __shared__ float smem[];  // head_dim floats per warp: this warp's query row
    const int lane = threadIdx.x & 31, warp_in_block = threadIdx.x >> 5;
    const long warp = (blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5;
    if (warp >= (long)batch * heads * sq) return;
    const long row = warp % sq, bh = warp / sq;
    const int h = bh % heads, b = bh / heads;
    float* qs = smem + warp_in_block * head_dim;
    const T* qr = q + b * qv.batch_stride + row * qv.row_stride + qv.col_offset + h * head_dim;
    for (int d = lane; d < head_dim; d += 32) qs[d] = to_f32(qr[d]) * scale;
    __syncwarp();
    const T* kb = k + b * kv.batch_stride + kv.col_offset + h * head_dim;
    const T* vb = v + b * vv.batch_stride + vv.col_offset + h * head_dim;
    float m = NEG_INF, l = 0.0f, acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (long k0 = 0; k0 < sk; k0 += 32) {
        const long key = k0 + lane;
        float s = NEG_INF;
        if (key < sk) {
            const T* kr = kb + key * kv.row_stride;
            s = 0.0f;
            for (int d = 0; d < head_dim; ++d) s += qs[d] * to_f32(kr[d]);
            if (bias) s += bias[b * sk + key];
        }
        const float correction = online_softmax_rescale(&m, &l, warp_max(s));
        if (m == NEG_INF) continue;  // every key so far masked
        const float p = key < sk ? expf(s - m) : 0.0f;
        l += warp_sum(p);
        for (int j = 0; j < 4; ++j) acc[j] *= correction;
        const long n = sk - k0 < 32 ? sk - k0 : 32;
        for (int i = 0; i < n; ++i) {
            const float pi = __shfl_sync(0xffffffffu, p, i);
            const T* vr = vb + (k0 + i) * vv.row_stride;
            for (int j = 0; j < 4; ++j) {
                const int d = lane + 32 * j;
                if (d < head_dim) acc[j] += pi * to_f32(vr[d]);
            }
        }
    }
    T* o = out + ((long)b * sq + row) * heads * head_dim + h * head_dim;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int j = 0; j < 4; ++j) {
        const int d = lane + 32 * j;
        if (d < head_dim) o[d] = from_f32<T>(acc[j] * inv);
    }
    if (lse && lane == 0) lse[((long)b * sq + row) * heads + h] = l > 0.0f ? m + logf(l) : NEG_INF;
}

// Ring attention's merge: acc = wa acc + wp part per (batch, query row, head), one thread per
// row of head_dim values; acc_lse becomes the merged log-sum-exp (f32).
template <typename T>
__device__ void merge_attention_impl(T* acc, float* acc_lse, const T* part, const float* part_lse,
                                     long rows, int head_dim) {
    for (long r = blockIdx.x * (long)blockDim.x + threadIdx.x; r < rows; r += (long)gridDim.x * blockDim.x) {
        float wa, wp;
        const float lse = merge_lse_weights(acc_lse[r], part_lse[r], &wa, &wp);
        T* a = acc + r * head_dim;
        const T* p = part + r * head_dim;
        for (int j = 0; j < head_dim; ++j) a[j] = from_f32<T>(wa * to_f32(a[j]) + wp * to_f32(p[j]));
        acc_lse[r] = lse;
    }
}

#define ATTENTION(SUFFIX, T)                                                                    \
    extern "C" __global__ void attention_##SUFFIX(                                              \
        float* lse, T* out, const T* q, View qv, const T* k, View kv, const T* v, View vv,      \
        const float* bias, int batch, int heads, int head_dim, long sq, long sk, float scale) { \
        attention_impl(lse, out, q, qv, k, kv, v, vv, bias, batch, heads, head_dim, sq, sk,     \
                       scale);                                                                  \
    }                                                                                           \
    extern "C" __global__ void merge_attention_##SUFFIX(T* acc, float* acc_lse, const T* part,  \
                                                         const float* part_lse, long rows,      \
                                                         int head_dim) {                        \
        merge_attention_impl(acc, acc_lse, part, part_lse, rows, head_dim);                    \
    }

ATTENTION(f32, float)
ATTENTION(bf16, __nv_bfloat16)
ATTENTION(f16, __half)
