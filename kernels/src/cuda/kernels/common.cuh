// Shared device code of pipefuse's CUDA kernels: element loads and stores in f32 / bf16 / f16
// (f32 arithmetic everywhere), the math of the element-wise ops as small functions, and warp /
// block reductions. Every kernel file includes this first. Compiled at run time by NVRTC (no
// toolkit at build time); checked for errors and register spills for sm_80 and sm_90 by
// kernels/tests/nvrtc_kernels.rs.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

// -inf (NVRTC has no <cmath>, so no INFINITY).
#define NEG_INF (-CUDART_INF_F)
#define PF_NEG_INF NEG_INF

// Element types: T is float, __nv_bfloat16 or __half; arithmetic is f32.
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

#include "math.cuh"

// Sum over a warp (every lane gets it).
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Max over a warp (every lane gets it).
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024): every thread gets it.
// `scratch` holds 32 floats of shared memory; the block must reach this call together.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Mean and 1 / sqrt(variance + eps) of a run of `n` values (biased variance, two passes), by
// the whole block; every thread gets both (LayerNorm rows, GroupNorm groups).
template <typename T>
__device__ __forceinline__ void row_stats(const T* xr, long n, float eps, float* mean,
                                          float* inv) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (long c = threadIdx.x; c < n; c += blockDim.x) s += to_f32(xr[c]);
    const float m = block_sum(s, scratch) / n;
    float v = 0.0f;
    for (long c = threadIdx.x; c < n; c += blockDim.x) {
        const float d = to_f32(xr[c]) - m;
        v += d * d;
    }
    *mean = m;
    *inv = rsqrtf(block_sum(v, scratch) / n + eps);
}
