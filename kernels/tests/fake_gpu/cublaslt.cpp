// A stand-in for cuBLASLt (libcublasLt.so.13) beside the fake driver (driver.cpp): the matmul
// from cuBLASLt's documented definition, D = epilogue(alpha op(A) op(B) + beta C), on
// column-major layouts with their leading dimensions, in f32 / f16 / bf16 storage with the sum
// in double, the bias (one per row of D, D's type) and tanh GELU epilogues. A matmul joins the
// fake driver's queue with its descriptors' values as they are when it is called.
//
// What it checks, failing the call with CUBLAS_STATUS_INVALID_VALUE (7) and a `fake cuBLASLt:`
// line on stderr: f32 compute and scale; the layouts agree (op(A) m x k, op(B) k x n, D m x n,
// leading dimensions at least the stored rows); A, B, D and the bias lie inside live device
// allocations; the operands are as aligned as the preference promised when the algorithm was
// chosen (its alignment is kept in the algorithm), and the epilogue that asks for a bias has one.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <vector>

typedef int Status;
enum { SUCCESS = 0, INVALID_VALUE = 7 };
enum { R_32F = 0, R_16F = 2, R_16BF = 14 };
enum { COMPUTE_32F = 68 };
enum { EPI_DEFAULT = 1, EPI_BIAS = 4, EPI_GELU = 32, EPI_GELU_BIAS = 36 };

extern "C" int fake_gpu_is_device_range(uint64_t p, size_t n);
extern "C" void fake_gpu_enqueue(void (*run)(void*), void* arg);

struct Desc {
    int compute, scale;
    int transa = 0, transb = 0;
    uint32_t epilogue = EPI_DEFAULT;
    const void* bias = nullptr;
};
struct Layout {
    int type;
    uint64_t rows, cols;
    int64_t ld;
};
struct Pref {
    uint32_t align[4] = {256, 256, 256, 256};
};
struct Algo {
    uint64_t data[8];
};
struct HeuristicResult {
    Algo algo;
    size_t workspaceSize;
    Status state;
    float wavesCount;
    int reserved[4];
};

static Status fail(const char* what) {
    fprintf(stderr, "fake cuBLASLt: %s\n", what);
    return INVALID_VALUE;
}

static size_t type_size(int t) { return t == R_32F ? 4 : 2; }

static float load(const void* p, int type, size_t i) {
    if (type == R_32F) return ((const float*)p)[i];
    uint16_t bits = ((const uint16_t*)p)[i];
    if (type == R_16BF) {
        uint32_t u = (uint32_t)bits << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    _Float16 h;
    memcpy(&h, &bits, 2);
    return (float)h;
}

static void store(void* p, int type, size_t i, float v) {
    if (type == R_32F) {
        ((float*)p)[i] = v;
    } else if (type == R_16BF) {
        uint32_t u;
        memcpy(&u, &v, 4);
        u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even (NaN stays NaN here)
        ((uint16_t*)p)[i] = (uint16_t)(u >> 16);
    } else {
        _Float16 h = (_Float16)v;
        memcpy((uint16_t*)p + i, &h, 2);
    }
}

// Bytes a column-major matrix of `l` spans in memory.
static size_t span(const Layout* l) {
    return ((l->cols - 1) * (size_t)l->ld + l->rows) * type_size(l->type);
}

// D = epilogue(alpha op(A) op(B) + beta C) of job `j` (the fields of cublasLtMatmul's call).
template <typename Job> static void run(const Job& j) {
    const uint64_t m = j.m, n = j.n, k = j.k;
    std::vector<float> out(m * n);
    for (uint64_t col = 0; col < n; ++col)
        for (uint64_t i = 0; i < m; ++i) {
            double acc = 0;
            for (uint64_t p = 0; p < k; ++p) {
                size_t ai = j.d.transa ? p + i * j.la.ld : i + p * j.la.ld;
                size_t bi = j.d.transb ? col + p * j.lb.ld : p + col * j.lb.ld;
                acc += (double)load(j.A, j.la.type, ai) * load(j.B, j.lb.type, bi);
            }
            double v = j.alpha * acc;
            if (j.beta != 0) v += j.beta * load(j.C, j.lc.type, i + col * j.lc.ld);
            if (j.has_bias) v += load(j.d.bias, j.ld.type, i);
            if (j.gelu) v = 0.5 * v * (1 + tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
            out[i + col * m] = (float)v;
        }
    for (uint64_t col = 0; col < n; ++col)
        for (uint64_t i = 0; i < m; ++i) store(j.D, j.ld.type, i + col * j.ld.ld, out[i + col * m]);
}

extern "C" {

Status cublasLtCreate(void** h) { *h = new int(4); return SUCCESS; }
Status cublasLtDestroy(void* h) { delete (int*)h; return SUCCESS; }

Status cublasLtMatmulDescCreate(Desc** d, int compute, int scale) {
    *d = new Desc{compute, scale};
    return SUCCESS;
}
Status cublasLtMatmulDescDestroy(Desc* d) { delete d; return SUCCESS; }
Status cublasLtMatmulDescSetAttribute(Desc* d, int attr, const void* buf, size_t size) {
    switch (attr) {
        case 3: if (size != 4) return fail("TRANSA size"); memcpy(&d->transa, buf, 4); break;
        case 4: if (size != 4) return fail("TRANSB size"); memcpy(&d->transb, buf, 4); break;
        case 7: if (size != 4) return fail("EPILOGUE size"); memcpy(&d->epilogue, buf, 4); break;
        case 8: if (size != 8) return fail("BIAS_POINTER size"); memcpy(&d->bias, buf, 8); break;
        default: return fail("a matmul attribute the stand-in does not model");
    }
    return SUCCESS;
}

Status cublasLtMatrixLayoutCreate(Layout** l, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    if (type != R_32F && type != R_16F && type != R_16BF) return fail("layout type");
    if (rows == 0 || cols == 0 || ld < (int64_t)rows) return fail("layout rows / leading dimension");
    *l = new Layout{type, rows, cols, ld};
    return SUCCESS;
}
Status cublasLtMatrixLayoutDestroy(Layout* l) { delete l; return SUCCESS; }

Status cublasLtMatmulPreferenceCreate(Pref** p) { *p = new Pref; return SUCCESS; }
Status cublasLtMatmulPreferenceDestroy(Pref* p) { delete p; return SUCCESS; }
Status cublasLtMatmulPreferenceSetAttribute(Pref* p, int attr, const void* buf, size_t size) {
    if (attr == 1) return size == 8 ? SUCCESS : fail("MAX_WORKSPACE_BYTES size");
    if (attr >= 5 && attr <= 8) {
        uint32_t a;
        if (size != 4) return fail("MIN_ALIGNMENT size");
        memcpy(&a, buf, 4);
        if (a == 0 || (a & (a - 1)) || a > 256) return fail("MIN_ALIGNMENT not a power of two <= 256");
        p->align[attr - 5] = a;
        return SUCCESS;
    }
    return fail("a preference attribute the stand-in does not model");
}

Status cublasLtMatmulAlgoGetHeuristic(void*, Desc* d, Layout* a, Layout* b, Layout* c, Layout* dl,
                                      Pref* p, int requested, HeuristicResult* r, int* count) {
    if (requested < 1) return fail("no algorithm requested");
    if (!d || !a || !b || !c || !dl || !p) return fail("heuristic without descriptors");
    memset(r, 0, sizeof *r);
    // The algorithm remembers the alignment it may assume of A, B, C, D.
    for (int i = 0; i < 4; ++i) r->algo.data[i] = p->align[i];
    r->algo.data[7] = 0x5ca1ab1e;
    *count = 1;
    return SUCCESS;
}

Status cublasLtMatmul(void*, const Desc* d, const float* alpha, const void* A, const Layout* la,
                      const void* B, const Layout* lb, const float* beta, const void* C,
                      const Layout* lc, void* D, const Layout* ld, const Algo* algo, void*, size_t,
                      void*) {
    if (d->compute != COMPUTE_32F || d->scale != R_32F) return fail("compute or scale not f32");
    if (!algo || algo->data[7] != 0x5ca1ab1e) return fail("algorithm not from the heuristic");
    const uint64_t m = ld->rows, n = ld->cols;
    const uint64_t k = d->transa ? la->rows : la->cols;
    if ((d->transa ? la->cols : la->rows) != m) return fail("op(A) rows != D rows");
    if ((d->transb ? lb->rows : lb->cols) != n) return fail("op(B) columns != D columns");
    if ((d->transb ? lb->cols : lb->rows) != k) return fail("op(B) rows != op(A) columns");
    if (lc->rows != m || lc->cols != n) return fail("C layout != D layout");
    const void* ptrs[4] = {A, B, C, D};
    const Layout* lays[4] = {la, lb, lc, ld};
    for (int i = 0; i < 4; ++i) {
        if (!fake_gpu_is_device_range((uint64_t)ptrs[i], span(lays[i])))
            return fail("an operand is not inside a live device allocation");
        if ((uint64_t)ptrs[i] % algo->data[i]) return fail("an operand less aligned than the algorithm assumes");
    }
    const bool has_bias = d->epilogue == EPI_BIAS || d->epilogue == EPI_GELU_BIAS;
    const bool gelu = d->epilogue == EPI_GELU || d->epilogue == EPI_GELU_BIAS;
    if (d->epilogue != EPI_DEFAULT && !has_bias && !gelu) return fail("epilogue not modelled");
    if (has_bias && (!d->bias || !fake_gpu_is_device_range((uint64_t)d->bias, m * type_size(ld->type))))
        return fail("bias epilogue without a device bias of D's rows");
    struct Job {
        Desc d;
        Layout la, lb, lc, ld;
        float alpha, beta;
        const void *A, *B, *C;
        void* D;
        uint64_t m, n, k;
        bool has_bias, gelu;
    };
    auto* job = new Job{*d, *la, *lb, *lc, *ld, *alpha, *beta, A, B, C, D, m, n, k, has_bias, gelu};
    fake_gpu_enqueue(
        [](void* arg) {
            Job* j = (Job*)arg;
            run(*j);
            delete j;
        },
        job);
    return SUCCESS;
}

}  // extern "C"
