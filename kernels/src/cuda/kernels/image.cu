// The VAE decoder's image ops, f32 arithmetic: GroupNorm (one block per (batch, group), whose
// channels and positions are one contiguous run of [B, C, ...]), nearest-neighbour 2x
// upsampling and the last-two-dimensions transpose (grid-stride, one thread per output
// element), and im2col for stride-1 convolution as a GEMM: row p = (oy, ox) of the output holds
// the C_in x kh x kw input values under the kernel there (zeros in the padding), in the weight's
// [O, C_in, kh, kw] order, so conv = im2col [P, K] . W[O, K]^T, then a transpose to [O, P].
#include "common.cuh"

template <typename T>
__device__ void group_norm_impl(T* y, const T* x, const T* gamma, const T* beta, int channels,
                                int groups, long spatial, float eps) {
    const long bg = blockIdx.x;  // batch * groups + group
    const int g = bg % groups, per_group = channels / groups;
    const long len = per_group * spatial;
    const T* xg = x + bg * len;
    T* yg = y + bg * len;
    float mean, inv;
    row_stats(xg, len, eps, &mean, &inv);
    for (long i = threadIdx.x; i < len; i += blockDim.x) {
        const int ch = g * per_group + (int)(i / spatial);
        float n = (to_f32(xg[i]) - mean) * inv;
        if (gamma) n *= to_f32(gamma[ch]);
        if (beta) n += to_f32(beta[ch]);
        yg[i] = from_f32<T>(n);
    }
}

// y [planes, 2h, 2w] from x [planes, h, w].
template <typename T>
__device__ void upsample_nearest2x_impl(T* y, const T* x, long planes, int h, int w) {
    const long n = planes * 4 * h * w;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const long ox = i % (2 * w), oy = (i / (2 * w)) % (2 * h), p = i / (4L * h * w);
        y[i] = x[(p * h + oy / 2) * w + ox / 2];
    }
}

// y [batch, c, r] from x [batch, r, c].
template <typename T>
__device__ void transpose_last2_impl(T* y, const T* x, long batch, int r, int c) {
    const long n = batch * r * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const long col = i % r, row = (i / r) % c, b = i / ((long)r * c);  // y[b, row, col]
        y[i] = x[(b * r + col) * c + row];
    }
}

// cols [h_out * w_out, c_in * kh * kw] of one image x [c_in, h, w].
template <typename T>
__device__ void im2col_impl(T* cols, const T* x, int c_in, int h, int w, int kh, int kw, int pad,
                            int h_out, int w_out) {
    const long n = (long)h_out * w_out * c_in * kh * kw;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const long src = im2col_source(i, c_in, h, w, kh, kw, pad, w_out);
        cols[i] = src >= 0 ? x[src] : from_f32<T>(0.0f);
    }
}

#define IMAGE(SUFFIX, T)                                                                        \
    extern "C" __global__ void group_norm_##SUFFIX(T* y, const T* x, const T* gamma,             \
                                                    const T* beta, int channels, int groups,     \
                                                    long spatial, float eps) {                   \
        group_norm_impl(y, x, gamma, beta, channels, groups, spatial, eps);                     \
    }                                                                                           \
    extern "C" __global__ void upsample_nearest2x_##SUFFIX(T* y, const T* x, long planes, int h, \
                                                            int w) {                             \
        upsample_nearest2x_impl(y, x, planes, h, w);                                            \
    }                                                                                           \
    extern "C" __global__ void transpose_last2_##SUFFIX(T* y, const T* x, long batch, int r,     \
                                                         int c) {                                \
        transpose_last2_impl(y, x, batch, r, c);                                                \
    }                                                                                           \
    extern "C" __global__ void im2col_##SUFFIX(T* cols, const T* x, int c_in, int h, int w,      \
                                                int kh, int kw, int pad, int h_out, int w_out) { \
        im2col_impl(cols, x, c_in, h, w, kh, kw, pad, h_out, w_out);                            \
    }

IMAGE(f32, float)
IMAGE(bf16, __nv_bfloat16)
IMAGE(f16, __half)
