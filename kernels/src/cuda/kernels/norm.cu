// Norms, one block per token row, f32 statistics:
// - layer_norm_modulate: y = LN(x) * (1 + scale[b]) + shift[b] (no affine weights; adaLN-Zero /
//   adaLN-single / continuous adaLN), x [B, N, C], shift / scale [B, C];
// - rms_norm_groups: per head, v = v / sqrt(mean(v^2) + eps) * weight over `width` channels at
//   column `offset` of each row (MMDiT's q/k norm), in place.
#include "common.cuh"

template <typename T>
__device__ void layer_norm_modulate_impl(T* y, const T* x, const T* shift, const T* scale,
                                         long tokens, int channels, float eps) {
    const long row = blockIdx.x;
    const long b = row / tokens;
    const T* xr = x + row * channels;
    T* yr = y + row * channels;
    float mean, inv;
    row_stats(xr, channels, eps, &mean, &inv);
    for (int c = threadIdx.x; c < channels; c += blockDim.x) {
        const float n = (to_f32(xr[c]) - mean) * inv;
        const long j = b * channels + c;
        yr[c] = from_f32<T>(modulate_f(n, to_f32(scale[j]), to_f32(shift[j])));
    }
}

// LayerNorm over rows of `channels` with optional affine gamma / beta ([channels]; null: none).
template <typename T>
__device__ void layer_norm_impl(T* y, const T* x, const T* gamma, const T* beta, int channels,
                                float eps) {
    const long row = blockIdx.x;
    const T* xr = x + row * channels;
    T* yr = y + row * channels;
    float mean, inv;
    row_stats(xr, channels, eps, &mean, &inv);
    for (int c = threadIdx.x; c < channels; c += blockDim.x) {
        float n = (to_f32(xr[c]) - mean) * inv;
        if (gamma) n *= to_f32(gamma[c]);
        if (beta) n += to_f32(beta[c]);
        yr[c] = from_f32<T>(n);
    }
}

// One warp per (row, group): rows of `width` columns, groups of `group` channels from `offset`.
template <typename T>
__device__ void rms_norm_groups_impl(T* x, long rows, int width, int offset, int channels,
                                     int group, const T* weight, float eps) {
    const long warp = (blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31, groups = channels / group;
    if (warp >= rows * groups) return;
    T* v = x + (warp / groups) * width + offset + (warp % groups) * group;
    float s = 0.0f;
    for (int c = lane; c < group; c += 32) {
        const float e = to_f32(v[c]);
        s += e * e;
    }
    const float inv = rsqrtf(warp_sum(s) / group + eps);
    for (int c = lane; c < group; c += 32) v[c] = from_f32<T>(to_f32(v[c]) * inv * to_f32(weight[c]));
}

#define NORMS(SUFFIX, T)                                                                        \
    extern "C" __global__ void layer_norm_modulate_##SUFFIX(T* y, const T* x, const T* shift,    \
                                                             const T* scale, long tokens,        \
                                                             int channels, float eps) {          \
        layer_norm_modulate_impl(y, x, shift, scale, tokens, channels, eps);                    \
    }                                                                                           \
    extern "C" __global__ void layer_norm_##SUFFIX(T* y, const T* x, const T* gamma,             \
                                                    const T* beta, int channels, float eps) {    \
        layer_norm_impl(y, x, gamma, beta, channels, eps);                                      \
    }                                                                                           \
    extern "C" __global__ void rms_norm_groups_##SUFFIX(T* x, long rows, int width, int offset,  \
                                                         int channels, int group,                \
                                                         const T* weight, float eps) {           \
        rms_norm_groups_impl(x, rows, width, offset, channels, group, weight, eps);             \
    }

NORMS(f32, float)
NORMS(bf16, __nv_bfloat16)
NORMS(f16, __half)
