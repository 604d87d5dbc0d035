// Element-wise ops (one thread per element, grid-stride): tanh-GELU and SiLU in place, the
// gated residual x += gate * y (gate per row of a batch: [B, C], x and y [B, N, C]; no gate: 1),
// and a periodic add x[i] += y[i % period] (position embeddings, modulation tables).
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

#define ELEMENTWISE(SUFFIX, T)                                                                 \
    extern "C" __global__ void gelu_tanh_##SUFFIX(T* x, long n) { gelu_tanh_impl(x, n); }      \
    extern "C" __global__ void silu_##SUFFIX(T* x, long n) { silu_impl(x, n); }                \
    extern "C" __global__ void add_gated_##SUFFIX(T* x, const T* y, const T* gate, long b,      \
                                                   long t, long c) {                            \
        add_gated_impl(x, y, gate, b, t, c);                                                   \
    }                                                                                           \
    extern "C" __global__ void add_cyclic_##SUFFIX(T* x, const T* y, long n, long period) {     \
        add_cyclic_impl(x, y, n, period);                                                      \
    }

ELEMENTWISE(f32, float)
ELEMENTWISE(bf16, __nv_bfloat16)
ELEMENTWISE(f16, __half)
