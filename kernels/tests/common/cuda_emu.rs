//! A CUDA emulator for the kernels' own sources, so that their indexing, reductions, shuffles and
//! shared memory are checked without a GPU: a kernel source (with `common.cuh` and `math.cuh`) is
//! compiled as host C++20 after a shim that defines the CUDA built-ins. A launch runs the grid's
//! blocks one after another, each block's CUDA threads as fibers on one host thread (ucontext),
//! each run until it reaches a barrier or returns; `__syncthreads` is a block barrier,
//! `__syncwarp` and the shuffles a warp barrier (a thread that returns drops out of both, as an
//! exited CUDA thread does; threads waiting at barriers that can never be released abort the
//! run), `__shared__` variables are statics (one block runs at a time), dynamic shared memory is one static buffer, and `mma.sync.m16n8k16` is computed from
//! the fragments as `math.cuh`'s `mma_frag_*` lay them out (checked against the PTX ISA in
//! `cuda_math_host.rs`). bf16 / f16 round to nearest even like the GPU's conversions.
//!
//! A test builds a program from named f32 buffers (converted to the kernel's element type on
//! load), kernel calls with their launch shapes, and named outputs read back as f32.

use std::collections::HashMap;
use std::process::Command;

const COMMON: &str = include_str!("../../src/cuda/kernels/common.cuh");
const MATH: &str = include_str!("../../src/cuda/kernels/math.cuh");

/// The host headers the shim and the harnesses need (before any namespace).
const INCLUDES: &str = r#"
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <ucontext.h>
#include <algorithm>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
"#;

/// The CUDA built-ins the kernels use, on the host.
const SHIM: &str = r#"
#define PF_HOST_WARP 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define CUDART_INF_F INFINITY
struct Dim { unsigned x, y, z; };
static Dim threadIdx, blockIdx;
static Dim blockDim, gridDim;

struct __nv_bfloat16 { uint16_t bits; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
struct __half { uint16_t bits; };
struct __half2 { __half x, y; };
static inline float __bfloat162float(__nv_bfloat16 v) { uint32_t u = (uint32_t)v.bits << 16; float f; memcpy(&f, &u, 4); return f; }
static inline __nv_bfloat16 __float2bfloat16_rn(float v) {
    uint32_t u; memcpy(&u, &v, 4); u += 0x7fffu + ((u >> 16) & 1u); return __nv_bfloat16{(uint16_t)(u >> 16)};
}
static inline float __half2float(__half v) { _Float16 h; memcpy(&h, &v.bits, 2); return (float)h; }
static inline __half __float2half_rn(float v) { _Float16 h = (_Float16)v; __half r; memcpy(&r.bits, &h, 2); return r; }
static inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
static inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

struct Warp { float v[32]; float a[32][8], b[32][4]; };
static std::vector<Warp> warps;
static float emu_smem[1 << 16];
static inline int lane_id() { return threadIdx.x & 31; }
static inline Warp& my_warp() { return warps[threadIdx.x >> 5]; }

// The CUDA threads of a block are fibers (ucontext) on one host thread, run until they reach a
// barrier or return; a barrier is released when every thread of its warp (__syncwarp) or block
// (__syncthreads) that has not returned waits at it.
enum { RUNNABLE, AT_WARP_BARRIER, AT_BLOCK_BARRIER, RETURNED };
struct Fiber { ucontext_t ctx; int state; };
static std::vector<Fiber> fibers;
static std::vector<char*> stacks;
static const size_t STACK_BYTES = 256 << 10;
static ucontext_t scheduler;
static unsigned current;
static void (*fiber_body)(void*);
static void* fiber_arg;
static void fiber_main() {
    fiber_body(fiber_arg);
    fibers[current].state = RETURNED;
    swapcontext(&fibers[current].ctx, &scheduler);
}
static inline void wait_at(int barrier) {
    fibers[current].state = barrier;
    swapcontext(&fibers[current].ctx, &scheduler);
}
static inline void __syncthreads() { wait_at(AT_BLOCK_BARRIER); }
static inline void __syncwarp() { wait_at(AT_WARP_BARRIER); }
static inline float warp_exchange(float v, int from) {
    Warp& w = my_warp();
    w.v[lane_id()] = v;
    __syncwarp();
    const float r = w.v[from];
    __syncwarp();
    return r;
}
static inline float __shfl_xor_sync(unsigned, float v, int mask) { return warp_exchange(v, lane_id() ^ mask); }
static inline float __shfl_sync(unsigned, float v, int src) { return warp_exchange(v, src & 31); }

// Releases the threads of `fibers[lo..hi)` waiting at `barrier` if every one that has not
// returned waits there.
static bool release(unsigned lo, unsigned hi, int barrier) {
    bool any = false;
    for (unsigned t = lo; t < hi; ++t) {
        if (fibers[t].state == RETURNED) continue;
        if (fibers[t].state != barrier) return false;
        any = true;
    }
    for (unsigned t = lo; t < hi; ++t)
        if (fibers[t].state == barrier) fibers[t].state = RUNNABLE;
    return any;
}

// Runs `grid` blocks of `block` threads of `body` (the kernel call), one block at a time.
template <typename F> static void emu_launch(unsigned grid, unsigned block, F body) {
    blockDim = Dim{block, 1, 1};
    gridDim = Dim{grid, 1, 1};
    warps = std::vector<Warp>((block + 31) / 32);
    fibers.resize(block);
    while (stacks.size() < block) stacks.push_back((char*)malloc(STACK_BYTES));
    fiber_body = [](void* b) { (*(F*)b)(); };
    fiber_arg = &body;
    for (unsigned bi = 0; bi < grid; ++bi) {
        blockIdx = Dim{bi, 0, 0};
        for (unsigned t = 0; t < block; ++t) {
            getcontext(&fibers[t].ctx);
            fibers[t].ctx.uc_stack.ss_sp = stacks[t];
            fibers[t].ctx.uc_stack.ss_size = STACK_BYTES;
            fibers[t].ctx.uc_link = nullptr;
            makecontext(&fibers[t].ctx, fiber_main, 0);
            fibers[t].state = RUNNABLE;
        }
        for (;;) {
            bool ran = false;
            for (unsigned t = 0; t < block; ++t) {
                if (fibers[t].state != RUNNABLE) continue;
                current = t;
                threadIdx = Dim{t, 0, 0};
                swapcontext(&scheduler, &fibers[t].ctx);
                ran = true;
            }
            bool released = false;
            for (unsigned w = 0; w * 32 < block; ++w)
                released |= release(w * 32, std::min(block, w * 32 + 32), AT_WARP_BARRIER);
            released |= release(0, block, AT_BLOCK_BARRIER);
            bool done = true;
            for (unsigned t = 0; t < block; ++t) done &= fibers[t].state == RETURNED;
            if (done) break;
            if (!ran && !released) {
                fprintf(stderr, "emulator: block %u deadlocked at mismatched barriers\n", bi);
                abort();
            }
        }
    }
}

"#;

/// What needs `common.cuh` first: buffer loading and saving, and the tensor-core product on the
/// host (the fragment layouts are math.cuh's).
const TAIL: &str = r#"
template <typename T> static std::vector<T> load(const char* path) {
    FILE* f = fopen(path, "rb");
    std::vector<T> v;
    float x;
    while (fread(&x, 4, 1, f) == 1) v.push_back(from_f32<T>(x));
    fclose(f);
    return v;
}
template <typename T> static void save(FILE* f, const std::vector<T>& v) {
    for (auto x : v) { float y = to_f32(x); fwrite(&y, 4, 1, f); }
}
template <typename T> static float half_of(unsigned reg, int hi) {
    T h; uint16_t bits = hi ? (uint16_t)(reg >> 16) : (uint16_t)(reg & 0xffffu); memcpy(&h, &bits, 2); return to_f32(h);
}
// c = a . b + c with the fragments laid out as math.cuh's mma_frag_a / b / c say.
template <typename T> static void mma16816(float* c, const unsigned* a, const unsigned* b) {
    Warp& w = my_warp();
    const int lane = lane_id();
    for (int i = 0; i < 8; ++i) w.a[lane][i] = half_of<T>(a[i / 2], i & 1);
    for (int i = 0; i < 4; ++i) w.b[lane][i] = half_of<T>(b[i / 2], i & 1);
    __syncwarp();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        int r, q;
        for (int i = 0; i < 8; ++i) { mma_frag_a(l, i, &r, &q); A[r][q] = w.a[l][i]; }
        for (int i = 0; i < 4; ++i) { mma_frag_b(l, i, &r, &q); B[r][q] = w.b[l][i]; }
    }
    float d[4];
    for (int i = 0; i < 4; ++i) {
        int r, q;
        mma_frag_c(lane, i, &r, &q);
        float acc = c[i];
        for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][q];
        d[i] = acc;
    }
    __syncwarp();
    for (int i = 0; i < 4; ++i) c[i] = d[i];
}
"#;

/// A kernel source (the text of a `.cu` file) as host C++ under the emulator: the shim, the
/// shared device code, the host tensor-core product and the kernels (`extern "C"` host functions
/// of the same names), then `inside` (code that launches them with `emu_launch`), all in
/// namespace `ns` but the headers: units linked together keep their own emulator state (an
/// inline function of `common.cuh` would otherwise be merged across units, with one unit's
/// barriers).
pub fn translation_unit(source: &str, ns: &str, inside: &str) -> String {
    let common = COMMON
        .lines()
        .filter(|l| !l.starts_with("#include <"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("#pragma once", "")
        .replace("#include \"math.cuh\"", &MATH.replace("#pragma once", ""));
    let kernel = source
        .replace("#include \"common.cuh\"", "")
        .replace("extern __shared__ float smem[];", "float* smem = emu_smem;");
    format!("{INCLUDES}\nnamespace {ns} {{\n{SHIM}\n{common}\n{TAIL}\n{kernel}\n{inside}\n}}\n")
}

/// One emulated program: a kernel source, its buffers and launches.
pub struct Emu {
    source: &'static str,
    inputs: Vec<(String, String, Vec<f32>)>,
    outputs: Vec<(String, String, usize)>,
    body: String,
}

impl Emu {
    /// A program over the kernel source `source` (the text of a `.cu` file).
    pub fn new(source: &'static str) -> Emu {
        Emu {
            source,
            inputs: Vec::new(),
            outputs: Vec::new(),
            body: String::new(),
        }
    }

    /// A buffer `name` of element type `ty` (`float`, `__nv_bfloat16`, `__half`) holding `data`
    /// (rounded to `ty`); the kernel calls use `name.data()`.
    pub fn input(&mut self, name: &str, ty: &str, data: &[f32]) -> &mut Self {
        self.inputs.push((name.into(), ty.into(), data.to_vec()));
        self
    }

    /// A buffer `name` of `len` elements of `ty`, read back after the launches: NaN until a
    /// kernel writes it (an element a kernel leaves unwritten shows).
    pub fn output(&mut self, name: &str, ty: &str, len: usize) -> &mut Self {
        self.outputs.push((name.into(), ty.into(), len));
        self
    }

    /// Launches `call` (a kernel call on the buffers, e.g. `silu_f32(x.data(), 100)`) on `grid`
    /// blocks of `block` threads.
    pub fn launch(&mut self, grid: usize, block: usize, call: &str) -> &mut Self {
        self.body.push_str(&format!(
            "    emu_launch({grid}, {block}, [&] {{ {call}; }});\n"
        ));
        self
    }

    /// The device address a plan gives for buffer `name` (plus a byte offset added by the
    /// caller): the buffer's number in the high 32 bits.
    pub fn address(&self, name: &str) -> u64 {
        let i = self.inputs.iter().position(|b| b.0 == name);
        let o = self.outputs.iter().position(|b| b.0 == name);
        match (i, o) {
            (Some(i), _) => (i as u64 + 1) << 32,
            (None, Some(o)) => (o as u64 + 1001) << 32,
            _ => panic!("no buffer {name}"),
        }
    }

    /// The buffer an address points into, as a C++ pointer expression.
    fn pointer(&self, address: u64) -> String {
        if address == 0 {
            return "nullptr".into();
        }
        let (id, bytes) = ((address >> 32) as usize, (address & 0xffff_ffff) as usize);
        let (name, ty) = match id {
            1..=1000 => (&self.inputs[id - 1].0, &self.inputs[id - 1].1),
            _ => (&self.outputs[id - 1001].0, &self.outputs[id - 1001].1),
        };
        let size = if ty == "float" { 4 } else { 2 };
        assert_eq!(bytes % size, 0, "misaligned address into {name}");
        format!("({name}.data() + {})", bytes / size)
    }

    /// Runs a launch as the CUDA ops plan it (`kernels::cuda::plan`), in `dtype` (`f32`, `bf16`,
    /// `f16`), its addresses from [`Emu::address`].
    #[cfg(feature = "cuda")]
    pub fn launch_plan(&mut self, l: &kernels::cuda::plan::Launch, dtype: &str) -> &mut Self {
        use kernels::cuda::launch::Param;
        let args: Vec<String> = l
            .params
            .iter()
            .map(|p| match p {
                Param::Ptr(a) => self.pointer(*a),
                Param::I64(v) => format!("{v}L"),
                Param::I32(v) => format!("{v}"),
                Param::F32(v) => format!("{v:e}f"),
                Param::View(v) => format!(
                    "View{{{}, {}, {}}}",
                    v.batch_stride, v.row_stride, v.col_offset
                ),
            })
            .collect();
        let call = format!("{}_{dtype}({})", l.entry.base, args.join(", "));
        let (grid, block) = (l.cfg.grid_dim.0 as usize, l.cfg.block_dim.0 as usize);
        assert!(
            l.cfg.shared_mem_bytes as usize <= 4 << 16,
            "more dynamic shared memory than the emulator has"
        );
        self.launch(grid, block, &call)
    }

    /// Compiles and runs the program; the inputs and outputs by name, as f32 (inputs as the
    /// kernels left them: in-place ops write them).
    pub fn run(&self, tag: &str) -> HashMap<String, Vec<f32>> {
        let dir = std::env::temp_dir().join(format!("pipefuse-emu-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut main = String::from("int main() {\n");
        for (name, ty, data) in &self.inputs {
            let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            std::fs::write(dir.join(format!("{name}.bin")), bytes).unwrap();
            main.push_str(&format!("    auto {name} = load<{ty}>(\"{name}.bin\");\n"));
        }
        for (name, ty, len) in &self.outputs {
            main.push_str(&format!(
                "    std::vector<{ty}> {name}({len}, from_f32<{ty}>(NAN));\n"
            ));
        }
        main.push_str(&self.body);
        main.push_str("    FILE* f = fopen(\"out.bin\", \"wb\");\n");
        let names: Vec<&String> = self
            .inputs
            .iter()
            .map(|i| &i.0)
            .chain(self.outputs.iter().map(|o| &o.0))
            .collect();
        for name in &names {
            main.push_str(&format!("    save(f, {name});\n"));
        }
        main.push_str("    fclose(f);\n    return 0;\n}\n");
        let program = format!(
            "{}\nusing namespace emu;\n{main}",
            translation_unit(self.source, "emu", "")
        );
        let bin = build_cpp(
            &dir,
            &program,
            &[
                "-O2",
                "-std=c++20",
                "-pthread",
                "-fno-strict-aliasing",
                "-w",
            ],
        );
        let run = Command::new(&bin).current_dir(&dir).output().unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let bytes = std::fs::read(dir.join("out.bin")).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        let all: Vec<f32> = bytes
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let lens = self
            .inputs
            .iter()
            .map(|i| i.2.len())
            .chain(self.outputs.iter().map(|o| o.2));
        let mut out = HashMap::new();
        let mut at = 0;
        for (name, len) in names.into_iter().zip(lens) {
            out.insert(name.clone(), all[at..at + len].to_vec());
            at += len;
        }
        assert_eq!(at, all.len(), "emulator output size");
        out
    }
}

/// Compiles the C++ `program` into `dir` with this machine's C++ compiler (`CXX`, default `c++`)
/// and `flags`; the binary's path. Fails the test with the compiler's message.
pub fn build_cpp(dir: &std::path::Path, program: &str, flags: &[&str]) -> std::path::PathBuf {
    let (src, bin) = (dir.join("harness.cpp"), dir.join("harness"));
    std::fs::write(&src, program).unwrap();
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = std::process::Command::new(&cxx)
        .args(flags)
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("no C++ compiler `{cxx}` ({e}): set CXX to one"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}
