// A stand-in for the CUDA driver (libcuda.so.1) that runs on the host, so that the CUDA backend's
// Rust code (cudarc, contexts, streams, allocation, copies, staging, kernel launches, the
// cuBLASLt calls) runs end to end on a machine without a GPU. Built by tests/common/fake_gpu.rs
// together with every kernel source compiled as host C++ under the CUDA emulator
// (tests/common/cuda_emu.rs), whose launchers this file looks up by entry name.
//
// What it models: one device (compute capability 9.0, so the tensor-core attention runs under
// the emulator's mma), device memory as host memory handed out at 256-byte alignment and filled
// with NaN bytes (an element nothing wrote reads as NaN), one in-order queue of work (streams are
// tokens; an event is the queue position it was recorded at) that runs as late as CUDA allows:
// only when the host synchronises (a stream, the context, a synchronous copy, a copy to pageable
// memory, a free of page-locked memory: all of it; an event: the work issued before its record). So a host that reads a page-locked buffer before waiting for the copy into it, or
// rewrites one before the copy out of it has run, sees the wrong bytes, as it could on a GPU.
// Arguments are taken when the work is issued (kernel parameters, pageable sources, cuBLASLt
// descriptors), as the driver takes them. What it checks: every copy, memset and kernel pointer argument lies inside a live allocation (device
// or page-locked host), frees are of live allocations, launches are one-dimensional with the
// dynamic shared memory the emulator has. A violation prints `fake GPU: ...` to stderr and fails
// the call with CUDA_ERROR_INVALID_VALUE (1).
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

typedef int CUresult;
typedef uint64_t CUdeviceptr;
enum { OK = 0, INVALID_VALUE = 1, NOT_FOUND = 500, NOT_SUPPORTED = 801 };

// The emulated kernels of every source (fake_gpu.rs generates the tables).
struct FakeKernel {
    const char* name;
    // Queues the kernel on `grid` blocks of `block` threads with the parameters' values as they
    // are now; 1 (queueing nothing) if a pointer argument is not device memory.
    int (*launch)(unsigned grid, unsigned block, void** params);
};
extern "C" const FakeKernel* fake_kernels_elementwise(int* n);
extern "C" const FakeKernel* fake_kernels_norm(int* n);
extern "C" const FakeKernel* fake_kernels_attention(int* n);
extern "C" const FakeKernel* fake_kernels_flash_attention(int* n);
extern "C" const FakeKernel* fake_kernels_image(int* n);

static std::recursive_mutex& lock() {
    static std::recursive_mutex m;
    return m;
}
#define LOCKED std::lock_guard<std::recursive_mutex> guard_(lock())

// Work issued and not yet run, in issue order; how many jobs were issued and run so far.
static std::deque<std::function<void()>> pending;
static uint64_t issued = 0, ran = 0;

// Runs the queue up to (not past) the job numbered `seq`: what waiting on an event recorded
// after `seq` jobs lets through. A job never issues more work.
static void flush_to(uint64_t seq) {
    LOCKED;
    while (ran < seq && !pending.empty()) {
        std::function<void()> job = std::move(pending.front());
        pending.pop_front();
        ++ran;
        job();
    }
}

static void flush() {
    LOCKED;
    flush_to(issued);
}

static void enqueue(std::function<void()> job) {
    LOCKED;
    pending.push_back(std::move(job));
    ++issued;
}

// An event: the queue position it was recorded at (0: never recorded, complete).
struct FakeEvent {
    uint64_t seq;
};

// For the kernel launchers and the cuBLASLt stand-in: `run(arg)` joins the queue.
extern "C" void fake_gpu_enqueue(void (*run)(void*), void* arg) {
    enqueue([run, arg] { run(arg); });
}

// Live allocations: start -> bytes (device and page-locked host kept apart).
static std::map<uint64_t, size_t> device_allocs, host_allocs;
static size_t device_bytes = 0;

static CUresult fail(const char* what) {
    fprintf(stderr, "fake GPU: %s\n", what);
    return INVALID_VALUE;
}

static bool inside(const std::map<uint64_t, size_t>& allocs, uint64_t p, size_t n) {
    auto it = allocs.upper_bound(p);
    if (it == allocs.begin()) return false;
    --it;
    return p >= it->first && p + n <= it->first + it->second;
}

// Whether [p, p + n) is device memory (for the cuBLASLt stand-in and kernel arguments).
extern "C" int fake_gpu_is_device_range(uint64_t p, size_t n) {
    LOCKED;
    return inside(device_allocs, p, n);
}

static CUresult check_device(uint64_t p, size_t n, const char* op) {
    if (n == 0 || inside(device_allocs, p, n)) return OK;
    char msg[256];
    snprintf(msg, sizeof msg, "%s: [0x%llx, +%zu) is not inside a live device allocation", op,
             (unsigned long long)p, n);
    return fail(msg);
}

// Host memory: anything (pageable), but a page-locked buffer must be used inside its bounds.
static CUresult check_host(const void* p, size_t n, const char* op) {
    uint64_t a = (uint64_t)p;
    auto it = host_allocs.upper_bound(a);
    if (it != host_allocs.begin()) {
        --it;
        if (a >= it->first && a < it->first + it->second && a + n > it->first + it->second) {
            char msg[256];
            snprintf(msg, sizeof msg, "%s: %zu bytes run past a page-locked buffer", op, n);
            return fail(msg);
        }
    }
    return OK;
}

extern "C" {

CUresult cuInit(unsigned) { return OK; }
// NVRTC asks a loaded driver for its private tables; the stand-in has none.
CUresult cuGetExportTable(const void** table, const void*) {
    *table = nullptr;
    return NOT_FOUND;
}
CUresult cuDriverGetVersion(int* v) { *v = 13000; return OK; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return OK; }
CUresult cuDeviceGet(int* d, int ordinal) {
    if (ordinal != 0) return INVALID_VALUE;
    *d = 0;
    return OK;
}
CUresult cuDeviceGetName(char* name, int len, int) {
    snprintf(name, len, "pipefuse fake GPU (host emulator)");
    return OK;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, int) { *bytes = (size_t)16 << 30; return OK; }
CUresult cuDeviceGetAttribute(int* v, int attr, int) {
    switch (attr) {
        case 75: *v = 9; break;        // compute capability major
        case 76: *v = 0; break;        // minor
        case 115: *v = 1; break;       // memory pools supported
        case 16: *v = 132; break;      // multiprocessors
        case 1: *v = 1024; break;      // max threads per block
        case 8: *v = 49152; break;     // shared memory per block
        case 97: *v = 232448; break;   // shared memory per block, opt-in
        case 10: *v = 32; break;       // warp size
        default: *v = 0;
    }
    return OK;
}
static int the_context;
CUresult cuDevicePrimaryCtxRetain(void** ctx, int) { *ctx = &the_context; return OK; }
CUresult cuDevicePrimaryCtxRelease_v2(int) { return OK; }
CUresult cuCtxSetCurrent(void*) { return OK; }
CUresult cuCtxGetCurrent(void** ctx) { *ctx = &the_context; return OK; }
CUresult cuCtxPushCurrent_v2(void*) { return OK; }
CUresult cuCtxPopCurrent_v2(void** ctx) { if (ctx) *ctx = &the_context; return OK; }
CUresult cuCtxGetDevice(int* d) { *d = 0; return OK; }
CUresult cuCtxSynchronize() { flush(); return OK; }

// Streams and events: one queue; waiting for anything runs it.
CUresult cuStreamCreate(void** s, unsigned) { *s = new int(1); return OK; }
CUresult cuStreamCreateWithPriority(void** s, unsigned, int) { *s = new int(1); return OK; }
CUresult cuStreamDestroy_v2(void* s) { delete (int*)s; return OK; }
CUresult cuStreamSynchronize(void*) { flush(); return OK; }
CUresult cuStreamQuery(void*) { LOCKED; return pending.empty() ? OK : 600; }
CUresult cuStreamWaitEvent(void*, void* e, unsigned) { return e ? OK : INVALID_VALUE; }
CUresult cuEventCreate(void** e, unsigned) { *e = new FakeEvent{0}; return OK; }
CUresult cuEventRecord(void* e, void*) {
    LOCKED;
    if (!e) return INVALID_VALUE;
    ((FakeEvent*)e)->seq = issued;
    return OK;
}
CUresult cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
// Waits for the work issued before the event's record only, as a GPU does: a host that
// waits on an older event than it should sees the later work not done.
CUresult cuEventSynchronize(void* e) {
    if (!e) return INVALID_VALUE;
    flush_to(((FakeEvent*)e)->seq);
    return OK;
}
CUresult cuEventQuery(void* e) {
    LOCKED;
    if (!e) return INVALID_VALUE;
    return ran >= ((FakeEvent*)e)->seq ? OK : 600;  // 600: not ready
}
CUresult cuEventDestroy_v2(void* e) { delete (FakeEvent*)e; return OK; }
CUresult cuEventElapsedTime(float* ms, void*, void*) { *ms = 0; return OK; }
CUresult cuEventElapsedTime_v2(float* ms, void*, void*) { *ms = 0; return OK; }

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    LOCKED;
    if (n == 0) return fail("cuMemAlloc of 0 bytes");
    void* m = aligned_alloc(256, (n + 255) / 256 * 256);
    if (!m) return 2;  // out of memory
    memset(m, 0xff, n);  // NaN in f32, bf16 and f16
    *p = (CUdeviceptr)m;
    device_allocs[*p] = n;
    device_bytes += n;
    return OK;
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, void*) { return cuMemAlloc_v2(p, n); }
// A free ends the allocation for work issued after it; its memory goes when the queue reaches it.
CUresult cuMemFreeAsync(CUdeviceptr p, void*) {
    LOCKED;
    auto it = device_allocs.find(p);
    if (it == device_allocs.end()) return fail("free of a pointer that is not a live allocation");
    device_bytes -= it->second;
    device_allocs.erase(it);
    enqueue([p] { free((void*)p); });
    return OK;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    LOCKED;
    if (CUresult r = cuMemFreeAsync(p, nullptr)) return r;
    flush();
    return OK;
}
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    LOCKED;
    *total = (size_t)16 << 30;
    *free_bytes = *total - device_bytes;
    return OK;
}
CUresult cuMemHostAlloc(void** p, size_t n, unsigned) {
    LOCKED;
    *p = aligned_alloc(4096, (n + 4095) / 4096 * 4096);
    if (!*p) return 2;
    host_allocs[(uint64_t)*p] = n;
    return OK;
}
CUresult cuMemFreeHost(void* p) {
    LOCKED;
    flush();
    if (!host_allocs.erase((uint64_t)p)) return fail("cuMemFreeHost of an unknown pointer");
    free(p);
    return OK;
}

static bool is_pinned(const void* p, size_t n) { return n && inside(host_allocs, (uint64_t)p, n); }
static int the_pool;
CUresult cuDeviceGetDefaultMemPool(void** pool, int) { *pool = &the_pool; return OK; }
CUresult cuMemPoolSetAttribute(void* pool, int, void* value) {
    return pool == &the_pool && value ? OK : INVALID_VALUE;
}

CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, void*) {
    LOCKED;
    if (CUresult r = check_device(p, n, "memset")) return r;
    enqueue([p, v, n] { memset((void*)p, v, n); });
    return OK;
}
CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) {
    LOCKED;
    if (CUresult r = cuMemsetD8Async(p, v, n, nullptr)) return r;
    flush();
    return OK;
}
// From page-locked memory the copy reads the source when it runs; from pageable memory the
// driver stages the bytes before returning.
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void*) {
    LOCKED;
    if (CUresult r = check_device(dst, n, "host-to-device copy")) return r;
    if (CUresult r = check_host(src, n, "host-to-device copy")) return r;
    if (is_pinned(src, n)) {
        enqueue([dst, src, n] { memcpy((void*)dst, src, n); });
    } else {
        std::vector<char> staged((const char*)src, (const char*)src + n);
        enqueue([dst, staged = std::move(staged)] { memcpy((void*)dst, staged.data(), staged.size()); });
    }
    return OK;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    LOCKED;
    if (CUresult r = cuMemcpyHtoDAsync_v2(dst, src, n, nullptr)) return r;
    flush();
    return OK;
}
// Into page-locked memory the copy runs with the queue; into pageable memory it returns done.
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void*) {
    LOCKED;
    if (CUresult r = check_device(src, n, "device-to-host copy")) return r;
    if (CUresult r = check_host(dst, n, "device-to-host copy")) return r;
    enqueue([dst, src, n] { memcpy(dst, (const void*)src, n); });
    if (!is_pinned(dst, n)) flush();
    return OK;
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    LOCKED;
    if (CUresult r = cuMemcpyDtoHAsync_v2(dst, src, n, nullptr)) return r;
    flush();
    return OK;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void*) {
    LOCKED;
    if (CUresult r = check_device(src, n, "device-to-device copy (source)")) return r;
    if (CUresult r = check_device(dst, n, "device-to-device copy (destination)")) return r;
    enqueue([dst, src, n] { memmove((void*)dst, (const void*)src, n); });
    return OK;
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    LOCKED;
    if (CUresult r = cuMemcpyDtoDAsync_v2(dst, src, n, nullptr)) return r;
    flush();
    return OK;
}

// CUDA_MEMCPY2D as cuda.h lays it out (memory types: 1 host, 2 device).
struct Memcpy2D {
    size_t srcXInBytes, srcY;
    int srcMemoryType;
    const void* srcHost;
    CUdeviceptr srcDevice;
    void* srcArray;
    size_t srcPitch;
    size_t dstXInBytes, dstY;
    int dstMemoryType;
    void* dstHost;
    CUdeviceptr dstDevice;
    void* dstArray;
    size_t dstPitch;
    size_t WidthInBytes, Height;
};
CUresult cuMemcpy2DAsync_v2(const Memcpy2D* c, void*) {
    LOCKED;
    if (c->srcMemoryType != 2 || c->dstMemoryType != 2) return fail("2-D copy not device to device");
    if (c->srcXInBytes || c->srcY || c->dstXInBytes || c->dstY) return fail("2-D copy offsets");
    if (c->Height == 0 || c->WidthInBytes == 0) return OK;
    if (c->srcPitch < c->WidthInBytes || c->dstPitch < c->WidthInBytes)
        return fail("2-D copy pitch narrower than its width");
    size_t src_span = c->srcPitch * (c->Height - 1) + c->WidthInBytes;
    size_t dst_span = c->dstPitch * (c->Height - 1) + c->WidthInBytes;
    if (CUresult r = check_device(c->srcDevice, src_span, "2-D copy (source)")) return r;
    if (CUresult r = check_device(c->dstDevice, dst_span, "2-D copy (destination)")) return r;
    const Memcpy2D copy = *c;
    enqueue([copy] {
        for (size_t row = 0; row < copy.Height; ++row)
            memmove((char*)copy.dstDevice + row * copy.dstPitch,
                    (const char*)copy.srcDevice + row * copy.srcPitch, copy.WidthInBytes);
    });
    return OK;
}

// Modules: the PTX is accepted as is (NVRTC made it); functions are the emulated kernels.
CUresult cuModuleLoadData(void** m, const void* image) {
    if (!image || strncmp((const char*)image, "//", 2) != 0) return fail("module image is not PTX");
    *m = new int(3);
    return OK;
}
CUresult cuModuleUnload(void* m) { delete (int*)m; return OK; }
CUresult cuModuleGetFunction(const FakeKernel** f, void*, const char* name) {
    const FakeKernel* (*tables[])(int*) = {fake_kernels_elementwise, fake_kernels_norm,
                                           fake_kernels_attention, fake_kernels_flash_attention,
                                           fake_kernels_image};
    for (auto table : tables) {
        int n = 0;
        const FakeKernel* k = table(&n);
        for (int i = 0; i < n; ++i)
            if (strcmp(k[i].name, name) == 0) { *f = &k[i]; return OK; }
    }
    fprintf(stderr, "fake GPU: no kernel named %s\n", name);
    return NOT_FOUND;
}
CUresult cuFuncGetAttribute(int* v, int, const void*) { *v = 0; return OK; }
CUresult cuFuncSetAttribute(const void*, int, int) { return OK; }

// Kernel pointer arguments are checked by the launchers before the kernel runs.
extern "C" int fake_gpu_check_argument(const char* kernel, int index, const void* p) {
    if (p && !inside(device_allocs, (uint64_t)p, 1)) {
        fprintf(stderr, "fake GPU: %s argument %d (%p) is not device memory\n", kernel, index, p);
        return 0;
    }
    return 1;
}
CUresult cuLaunchKernel(const FakeKernel* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned shared, void*, void** params, void**) {
    LOCKED;
    if (gy != 1 || gz != 1 || by != 1 || bz != 1) return fail("launch is not one-dimensional");
    if (gx == 0 || bx == 0 || bx > 1024) return fail("launch shape");
    if (shared > (4u << 16)) return fail("more dynamic shared memory than the emulator has");
    return f->launch(gx, bx, params) == 0 ? OK : INVALID_VALUE;
}

CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = e == INVALID_VALUE ? "invalid argument (fake GPU: see stderr)" : "fake GPU error";
    return OK;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = e == INVALID_VALUE ? "CUDA_ERROR_INVALID_VALUE" : "CUDA_ERROR_UNKNOWN";
    return OK;
}

}  // extern "C"
