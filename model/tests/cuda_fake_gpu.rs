//! The prepared GPU check's model half (`examples/gpu_golden.rs`) run on the fake GPU (the
//! kernels crate's `tests/fake_gpu/`: a stand-in driver and cuBLASLt over the CUDA emulator):
//! the DiT, PixArt, SD3, Flux and VAE golden fixtures through stages that live on a CUDA device
//! (weights converted and uploaded at load, K/V buffers, conditioning and every op on the
//! device) in f32 and bf16 against diffusers, and two-stage PipeFusions with both stages on the
//! one GPU against the CPU, without a GPU.
#![cfg(feature = "cuda")]
#![allow(dead_code, unreachable_pub)]

#[path = "../../kernels/tests/common/cuda_emu.rs"]
mod cuda_emu;
#[path = "../../kernels/tests/common/fake_gpu.rs"]
mod fake_gpu;

#[path = "../examples/gpu_golden.rs"]
mod gpu_golden;

#[test]
fn gpu_golden_passes_on_the_fake_gpu() {
    fake_gpu::run_on_fake_gpu("gpu_golden_passes_on_the_fake_gpu", || {
        let devices = kernels::cuda_devices().expect("the fake GPU is visible");
        assert!(devices[0].name.contains("pipefuse fake GPU"), "{devices:?}");
        gpu_golden::run()
    });
}
