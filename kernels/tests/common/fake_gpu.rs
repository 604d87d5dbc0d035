//! The fake GPU: a stand-in CUDA driver and cuBLASLt built from `tests/fake_gpu/*.cpp` with every
//! kernel source compiled as host C++ under the CUDA emulator ([`super::cuda_emu`]), so that a
//! program using the CUDA backend runs end to end without a GPU when `LD_LIBRARY_PATH` puts
//! [`build`]'s folder first (NVRTC stays the real one: the kernels are compiled to PTX as on a
//! GPU, and the stand-in driver runs their emulated twins by entry name). The driver checks every
//! copy, free and kernel pointer argument against its live allocations and fills new memory with
//! NaN; the cuBLASLt stand-in checks the layouts and the operands (see the C++ files' heads).

use std::path::{Path, PathBuf};
use std::process::Command;

use kernels::cuda::launch::ENTRIES;
use kernels::cuda::SOURCES;

const DRIVER: &str = include_str!("../fake_gpu/driver.cpp");
const CUBLASLT: &str = include_str!("../fake_gpu/cublaslt.cpp");

/// Launchers of a source's entry points: `fake_kernels_<stem>()` returns a table of
/// (entry name, launcher); a launcher checks the pointer arguments with the driver, then queues
/// the kernel (on the emulator, with the parameters' values taken now) on the driver's queue.
fn launch_table(file: &str) -> String {
    let stem = file.trim_end_matches(".cu");
    let mut rows = String::new();
    for entry in ENTRIES.iter().filter(|e| e.file == file) {
        for dtype in entry.dtypes {
            let name = format!("{}_{dtype}", entry.base);
            rows.push_str(&format!(
                "    {{\"{name}\", [](unsigned g, unsigned b, void** p) {{ return fake_run(\"{name}\", {name}, g, b, p); }}}},\n"
            ));
        }
    }
    format!(
        r#"
extern "C" int fake_gpu_check_argument(const char*, int, const void*);
extern "C" void fake_gpu_enqueue(void (*run)(void*), void* arg);
template <typename A> static bool fake_arg_ok(const char* name, int i, void* slot) {{
    if constexpr (std::is_pointer_v<A>) return fake_gpu_check_argument(name, i, *(void**)slot);
    else return true;
}}
template <typename... A, size_t... I>
static int fake_call(const char* name, void (*k)(A...), unsigned grid, unsigned block, void** p,
                     std::index_sequence<I...>) {{
    bool ok = true;
    ((ok = fake_arg_ok<A>(name, (int)I, p[I]) && ok), ...);
    if (!ok) return 1;
    // The parameters' values now (the caller's may be gone when the queue runs the kernel).
    auto* job = new std::function<void()>(
        [k, grid, block, args = std::make_tuple(*(std::remove_cv_t<A>*)p[I]...)] {{
            emu_launch(grid, block, [&] {{ std::apply(k, args); }});
        }});
    fake_gpu_enqueue([](void* j) {{
        auto* f = (std::function<void()>*)j;
        (*f)();
        delete f;
    }}, job);
    return 0;
}}
template <typename... A>
static int fake_run(const char* name, void (*k)(A...), unsigned grid, unsigned block, void** p) {{
    return fake_call(name, k, grid, block, p, std::index_sequence_for<A...>{{}});
}}
struct FakeKernel {{ const char* name; int (*launch)(unsigned, unsigned, void**); }};
static const FakeKernel fake_table[] = {{
{rows}}};
extern "C" const FakeKernel* fake_kernels_{stem}(int* n) {{
    *n = sizeof fake_table / sizeof *fake_table;
    return fake_table;
}}
"#
    )
}

fn compile(dir: &Path, name: &str, source: &str, extra: &[&str]) -> PathBuf {
    let (src, obj) = (
        dir.join(format!("{name}.cpp")),
        dir.join(format!("{name}.o")),
    );
    std::fs::write(&src, source).unwrap();
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args([
            "-O2",
            "-std=c++20",
            "-pthread",
            "-fno-strict-aliasing",
            "-w",
            "-fPIC",
            "-c",
        ])
        .args(extra)
        .arg("-o")
        .arg(&obj)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("no C++ compiler `{cxx}` ({e}): set CXX to one"));
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    obj
}

fn link(dir: &Path, soname: &str, objects: &[PathBuf], libs: &[&str]) {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args(["-shared", "-pthread", &format!("-Wl,-soname,{soname}")])
        .arg("-o")
        .arg(dir.join(soname))
        .args(objects)
        .arg(format!("-L{}", dir.display()))
        .args(libs)
        .arg("-Wl,-rpath,$ORIGIN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{soname}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds `libcuda.so.1` (driver + emulated kernels) and `libcublasLt.so.13` into `dir`; put
/// `dir` first on `LD_LIBRARY_PATH` of a process to give it the fake GPU.
pub fn build(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut objects = vec![compile(dir, "driver", DRIVER, &[])];
    for (file, source) in SOURCES {
        let stem = file.trim_end_matches(".cu");
        let unit =
            super::cuda_emu::translation_unit(source, &format!("emu_{stem}"), &launch_table(file));
        objects.push(compile(dir, file.trim_end_matches(".cu"), &unit, &[]));
    }
    link(dir, "libcuda.so.1", &objects, &[]);
    let blas = compile(dir, "cublaslt", CUBLASLT, &[]);
    link(dir, "libcublasLt.so.13", &[blas], &["-l:libcuda.so.1"]);
}

/// Runs `check` on the fake GPU: the test named `test` (this function's caller) builds the fake
/// GPU's libraries, then runs itself again as a child process with them first on
/// `LD_LIBRARY_PATH` (the loader reads it at start) and `PIPEFUSE_FAKE_GPU_CHILD` naming the
/// test; the child runs `check`, which says whether every check passed. Panics, with the
/// child's output, if the child fails.
pub fn run_on_fake_gpu(test: &str, check: impl FnOnce() -> bool) {
    if std::env::var("PIPEFUSE_FAKE_GPU_CHILD").is_ok_and(|t| t == test) {
        assert!(check(), "a check failed on the fake GPU (lines above)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("pipefuse-fake-gpu-{test}-{}", std::process::id()));
    build(&dir);
    let path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(rest) if !rest.is_empty() => format!("{}:{rest}", dir.display()),
        _ => dir.display().to_string(),
    };
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("LD_LIBRARY_PATH", path)
        .env("PIPEFUSE_FAKE_GPU_CHILD", test)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "on the fake GPU:\n{stdout}\n{stderr}");
    // The child ran the test (not zero tests) and opened the fake GPU.
    assert!(stdout.contains("1 passed"), "{stdout}\n{stderr}");
}
