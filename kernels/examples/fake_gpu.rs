//! Builds the fake GPU's libraries (a stand-in `libcuda.so.1` and `libcublasLt.so.13` over the
//! CUDA emulator: `tests/fake_gpu/`, `tests/common/fake_gpu.rs`) into a folder, for running any
//! program on it by hand (`tools/fake_gpu.sh` does both):
//!
//!     cargo run -p kernels --features cuda --example fake_gpu -- target/fake-gpu
//!     LD_LIBRARY_PATH=target/fake-gpu:$NVRTC_LIB pipefuse generate --device cuda ...

#[path = "../tests/common/cuda_emu.rs"]
#[allow(dead_code, unreachable_pub)]
mod cuda_emu;
#[path = "../tests/common/fake_gpu.rs"]
#[allow(dead_code, unreachable_pub)]
mod fake_gpu;

fn main() {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: fake_gpu <folder>  (builds libcuda.so.1 and libcublasLt.so.13 there)");
        std::process::exit(2);
    };
    fake_gpu::build(std::path::Path::new(&dir));
    println!("{dir}");
}
