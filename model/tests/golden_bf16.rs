//! Linear layers in bf16 (weights packed once, activations rounded to bf16 per product, f32
//! accumulation; AMX tiles or AVX512-BF16 where the CPU has them) against diffusers' f32 outputs
//! on the golden fixtures; on such a CPU, attention's two products in bf16 too (the model's device computes
//! in bf16). Everything else (norms, softmax, embeddings, residuals) stays f32, so the error is
//! bf16's rounding of the products' operands (8-bit mantissa: about 2^-9 relative per operand)
//! carried through the blocks. Tolerance: relative L2 <= 1e-2 of the whole output (measured
//! 4.0e-3 to 5.0e-3, printed); the f32 path's tolerance is 1e-4 (golden_transformer.rs).
//!
//! Against diffusers' own bf16 forward (`model.to(torch.bfloat16)`, fixture torch_bf16_io, which
//! is 6.8e-3 to 9.0e-3 from f32): the runtime's bf16 output must be at least as close to f32 as
//! diffusers' bf16 is, and within twice that distance of diffusers' bf16 output.

mod common;

use common::{fixtures, Fixture};
use kernels::{DType, Device, Tensor};
use model::{CondInputs, ModelConfig, SafetensorsDir, Transformer, WithLinearDtype};

const TOL: f64 = 1e-2;

fn load_bf16(name: &str) -> Transformer {
    let dir = fixtures().join(name);
    let src = SafetensorsDir::open(&dir).unwrap();
    let bf16 = WithLinearDtype {
        inner: &src,
        dtype: DType::BF16,
    };
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let model = Transformer::from_source(cfg, &bf16, None, Device::cpu(2).unwrap()).unwrap();
    // A model with bf16 linears computes attention in bf16 where the CPU can (AMX, AVX512-BF16).
    #[allow(irrefutable_let_patterns)] // irrefutable without the `cuda` feature
    if let Device::Cpu(c) = model.device() {
        assert_eq!(
            c.bf16_attention(),
            !kernels::bf16_gemm_path().starts_with("f32 fallback")
        );
    }
    model
}

/// `got` (bf16 linears) against diffusers' f32 output `want` and diffusers' bf16 output `torch`.
fn check(name: &str, got: &Tensor, want: &Tensor, torch: &Tensor) {
    let rel = |a: &Tensor, b: &Tensor| common::rel_l2(a.as_f32().unwrap(), b.as_f32().unwrap());
    let (e, e_torch, e_between) = (rel(got, want), rel(torch, want), rel(got, torch));
    eprintln!(
        "{name}: bf16 linears vs diffusers f32 {e:.2e}; diffusers bf16 vs f32 {e_torch:.2e}; \
         ours vs diffusers bf16 {e_between:.2e}"
    );
    assert!(e <= TOL, "{name}: rel L2 {e} > {TOL}");
    // Not accidentally the f32 path: bf16 rounding shows.
    assert!(e > 1e-5, "{name}: rel L2 {e}: the bf16 path did not run");
    assert!(
        e <= e_torch,
        "{name}: {e:.2e} from f32, diffusers' bf16 is {e_torch:.2e}"
    );
    assert!(
        e_between <= 2.0 * e_torch,
        "{name}: {e_between:.2e} from diffusers' bf16 output"
    );
}

#[test]
fn dit_with_bf16_linears_is_within_the_stated_tolerance() {
    let io = Fixture::load("dit_tiny_io.safetensors");
    let torch = Fixture::load("torch_bf16_io.safetensors");
    let model = load_bf16("dit_tiny");
    let inputs = CondInputs {
        timesteps: io.i("timestep").iter().map(|&t| t as f32).collect(),
        class_labels: io.i("class_labels").iter().map(|&c| c as usize).collect(),
        ..Default::default()
    };
    check(
        "dit_tiny output",
        &model.forward(io.f("latent"), &inputs).unwrap(),
        io.f("output"),
        torch.f("dit.output"),
    );
}

#[test]
fn pixart_with_bf16_linears_is_within_the_stated_tolerance() {
    let io = Fixture::load("pixart_tiny_io.safetensors");
    let torch = Fixture::load("torch_bf16_io.safetensors");
    let model = load_bf16("pixart_tiny");
    for p in ["sq.", "nonsq."] {
        let (inputs, _) = common::pixart_case(&io, p, true);
        check(
            &format!("pixart_tiny {p}output_masked"),
            &model.forward(io.f(&format!("{p}latent")), &inputs).unwrap(),
            io.f(&format!("{p}output_masked")),
            torch.f(&format!("pixart.{p}output_masked")),
        );
    }
}
