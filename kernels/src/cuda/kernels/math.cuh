// The arithmetic of pipefuse's CUDA kernels as small functions of floats, with no CUDA types:
// included by common.cuh on the GPU (PF_FN = __device__ __forceinline__), and compiled as host
// C++ by kernels/tests/cuda_math_host.rs (PF_FN = inline), which checks it against the CPU
// backend's references. f32 throughout.
#pragma once
#ifndef PF_FN
#define PF_FN __device__ __forceinline__
#endif
// -inf, defined by the includer (CUDART_INF_F on the GPU, INFINITY on the host).
#ifndef PF_NEG_INF
#error "define PF_NEG_INF before including math.cuh"
#endif

// tanh-approximated GELU, as PyTorch's gelu(approximate="tanh"):
// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
PF_FN float gelu_tanh_f(float x) {
    const float k = 0.7978845608028654f;
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

// SiLU: x sigmoid(x).
PF_FN float silu_f(float x) { return x / (1.0f + expf(-x)); }

// adaLN modulation of a normalised value: n (1 + scale) + shift.
PF_FN float modulate_f(float n, float scale, float shift) { return n * (1.0f + scale) + shift; }

// Online softmax: folds a block of scores whose maximum is `block_max` into the running maximum
// `m` and sum `l` (returns the factor the running accumulators are multiplied by). A block of
// only -inf scores with an empty running state leaves it empty (factor 1).
PF_FN float online_softmax_rescale(float* m, float* l, float block_max) {
    const float m_new = fmaxf(*m, block_max);
    if (m_new == PF_NEG_INF) return 1.0f;
    const float factor = expf(*m - m_new);
    *l *= factor;
    *m = m_new;
    return factor;
}

// Ring attention's merge of an accumulated partial attention (log-sum-exp `la`) with another key
// block's (`lp`): the weights of each (summing to 1) and the merged log-sum-exp. Both empty
// (-inf) keeps the accumulator as it is (weights 1 and 0, log-sum-exp -inf); a NaN block (a NaN
// score) makes both weights and the log-sum-exp NaN, also after an empty accumulator (fmaxf
// would ignore the NaN), as the CPU's merge_partial.
PF_FN float merge_lse_weights(float la, float lp, float* wa, float* wp) {
    const float m = isnan(lp) ? lp : fmaxf(la, lp);
    if (m == PF_NEG_INF) {  // an empty part: the accumulator as it is (-inf, or NaN)
        *wa = 1.0f;
        *wp = 0.0f;
        return la;
    }
    const float ea = expf(la - m), ep = expf(lp - m), z = ea + ep;
    *wa = ea / z;
    *wp = ep / z;
    return m + logf(z);
}

// im2col for a stride-1 convolution: element i of the [h_out * w_out, c_in * kh * kw] column
// matrix of one image [c_in, h, w] reads input element `return` (-1: zero padding). Row p is the
// output position (oy, ox); column q the weight's (ci, ky, kx) in [O, c_in, kh, kw] order.
PF_FN long im2col_source(long i, int c_in, int h, int w, int kh, int kw, int pad, int w_out) {
    const long k = (long)c_in * kh * kw;
    const long p = i / k, q = i % k;
    const int oy = (int)(p / w_out), ox = (int)(p % w_out);
    const int ci = (int)(q / (kh * kw)), ky = (int)((q / kw) % kh), kx = (int)(q % kw);
    const int iy = oy + ky - pad, ix = ox + kx - pad;
    return (iy >= 0 && iy < h && ix >= 0 && ix < w) ? ((long)ci * h + iy) * w + ix : -1;
}

// Rotary position embedding (Flux's interleaved channel pairs): pair `i` of a tensor of rows
// `width` wide whose columns offset..offset+cols hold heads of `hd` channels, `rows` positions
// per batch element (row r at position r % rows). Returns the element index of the pair's first
// channel and sets `table` to that channel's index in the [rows, hd] cos / sin tables.
PF_FN long rope_pair_index(long i, int width, int rows, int offset, int cols, int hd, long* table) {
    const long per_row = cols / 2;
    const long r = i / per_row, ch = 2 * (i % per_row);
    *table = (r % rows) * hd + ch % hd;
    return r * width + offset + ch;
}

// The rotation of one channel pair (a, b) with its channels' cos / sin: (a c0 - b s0, b c1 + a s1).
PF_FN void rope_pair_f(float a, float b, float c0, float s0, float c1, float s1, float* ra, float* rb) {
    *ra = a * c0 - b * s0;
    *rb = b * c1 + a * s1;
}

// Fragment layouts of mma.sync.m16n8k16 with 16-bit A / B and f32 C (PTX ISA, "Matrix Fragments
// for mma.m16n8k16 with floating point type"): which element of the matrix lane `lane` holds as
// its element `i`. groupID = lane >> 2, threadID_in_group = lane % 4. Registers pair elements
// (2r, 2r + 1), the first in the low half.
// A (16 x 16, row-major), i in 0..8.
PF_FN void mma_frag_a(int lane, int i, int* row, int* col) {
    *row = (lane >> 2) + (((i >> 1) & 1) ? 8 : 0);
    *col = (lane % 4) * 2 + (i & 1) + (i >= 4 ? 8 : 0);
}
// B (16 x 8, "col": element (k, n)), i in 0..4.
PF_FN void mma_frag_b(int lane, int i, int* k, int* n) {
    *k = (lane % 4) * 2 + (i & 1) + (i >= 2 ? 8 : 0);
    *n = lane >> 2;
}
// C / D (16 x 8, f32), i in 0..4.
PF_FN void mma_frag_c(int lane, int i, int* row, int* col) {
    *row = (lane >> 2) + (i >= 2 ? 8 : 0);
    *col = (lane % 4) * 2 + (i & 1);
}
// FlashAttention-2's reuse of the score accumulators as the next product's A operand: A element
// i of a 16-key step is element `c` of the step's n-tile `tile` (0: keys 0..8, 1: keys 8..16).
PF_FN void mma_p_source(int i, int* tile, int* c) {
    *tile = i >> 2;
    *c = ((i >> 1) & 1) * 2 + (i & 1);
}
