//! The prepared GPU check (`examples/gpu_check.rs`, with its smaller problems) run on the fake
//! GPU (`tests/fake_gpu/`: a stand-in driver and cuBLASLt over the CUDA emulator): the CUDA
//! backend's whole host path (cudarc, the GPU's one stream, allocation, page-locked staging,
//! launch plans, cuBLASLt descriptors, prepared plans and epilogues) and the kernels it launches,
//! against the CPU backend, in f32, bf16 and f16, without a GPU. The stand-in checks every copy,
//! free, kernel pointer and GEMM operand against its live allocations.
#![cfg(feature = "cuda")]

mod common;

#[path = "../examples/gpu_check.rs"]
#[allow(dead_code)]
mod gpu_check;

#[test]
fn gpu_check_passes_on_the_fake_gpu() {
    common::fake_gpu::run_on_fake_gpu("gpu_check_passes_on_the_fake_gpu", || {
        let devices = kernels::cuda_devices().expect("the fake GPU is visible");
        assert!(devices[0].name.contains("pipefuse fake GPU"), "{devices:?}");
        gpu_check::run_with(false, gpu_check::SMALL).expect("the check ran")
    });
}
