// Element-wise ops (one thread per element, grid-stride): tanh-GELU and SiLU in place, the
// gated residual x += gate * y (gate per row of a batch: [B, C], x and y [B, N, C]; no gate: 1),
// a periodic add x[i] += y[i % period] (position embeddings, modulation tables), and the rotary
// position embedding of query / key heads with f32 cos / sin tables (one thread per pair).
#include "common.cuh"

template <typename T>
__device__ void gelu_tanh_impl(T* x, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = from_f32<T>(gelu_tanh_f(to_f32(x[i])));
}

template <typename T>
__device__ void silu_impl(T* x, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = from_f32<T>(silu_f(to_f32(x[i])));
}

// x[b, t, c] += gate[b, c] * y[b, t, c] (gate may be null: 1).
template <typename T>
__device__ void add_gated_impl(T* x, const T* y, const T* gate, long batch, long tokens, long channels) {
    const long n = batch * tokens * channels;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const long c = i % channels, b = i / (tokens * channels);
        const float g = gate ? to_f32(gate[b * channels + c]) : 1.0f;
        x[i] = from_f32<T>(to_f32(x[i]) + g * to_f32(y[i]));
    }
}

// x[i] += y[i % period]: a [period] row (or [n, d] block) added to every repetition of it in x.
template <typename T>
__device__ void add_cyclic_impl(T* x, const T* y, long n, long period) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = from_f32<T>(to_f32(x[i]) + to_f32(y[i % period]));
}

// Rotary embedding, in place, of `pairs` channel pairs (see rope_pair_index in math.cuh).
template <typename T>
__device__ void rope_impl(T* x, const float* cos_t, const float* sin_t, long pairs, int width,
                          int rows, int offset, int cols, int hd) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < pairs; i += (long)gridDim.x * blockDim.x) {
        long t;
        const long e = rope_pair_index(i, width, rows, offset, cols, hd, &t);
        float ra, rb;
        rope_pair_f(to_f32(x[e]), to_f32(x[e + 1]), cos_t[t], sin_t[t], cos_t[t + 1], sin_t[t + 1], &ra, &rb);
        x[e] = from_f32<T>(ra);
        x[e + 1] = from_f32<T>(rb);
    }
}

#define ELEMENTWISE(SUFFIX, T)                                                                 \
    extern "C" __global__ void gelu_tanh_##SUFFIX(T* x, long n) { gelu_tanh_impl(x, n); }      \
    extern "C" __global__ void silu_##SUFFIX(T* x, long n) { silu_impl(x, n); }                \
    extern "C" __global__ void add_gated_##SUFFIX(T* x, const T* y, const T* gate, long b,      \
                                                   long t, long c) {                            \
        add_gated_impl(x, y, gate, b, t, c);                                                   \
    }                                                                                           \
    extern "C" __global__ void add_cyclic_##SUFFIX(T* x, const T* y, long n, long period) {     \
        add_cyclic_impl(x, y, n, period);                                                      \
    }                                                                                           \
    extern "C" __global__ void rope_##SUFFIX(T* x, const float* cos_t, const float* sin_t,          \
                                             long pairs, int width, int rows, int offset,       \
                                             int cols, int hd) {                                \
        rope_impl(x, cos_t, sin_t, pairs, width, rows, offset, cols, hd);                          \
    }

ELEMENTWISE(f32, float)
ELEMENTWISE(bf16, __nv_bfloat16)
ELEMENTWISE(f16, __half)
