"""How far diffusers' own bf16 forward is from its f32 forward on the committed golden fixtures
(relative L2 of the outputs): the yardstick for the bf16 tolerances of pipefuse's GPU check
(model/examples/gpu_golden.rs). Runs the fixture models from model/tests/fixtures on the CPU
with PyTorch, in f32 and with the weights and inputs in bf16.

    .venv-tools/bin/python tools/bf16_distance.py
"""
import os

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from safetensors.torch import load_file

FIX = os.path.join(os.path.dirname(__file__), "..", "model", "tests", "fixtures")


def rel_l2(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.no_grad()
def distance(model_cls, name, io, prefix, call, exact=None):
    model = model_cls.from_pretrained(os.path.join(FIX, name)).eval()
    f = {k[len(prefix):]: v for k, v in io.items() if k.startswith(prefix)}
    # Flux's forward rounds `timestep * 1000` and `guidance * 1000` to the model's dtype
    # (pipefuse does not): values whose products are exact in bf16 keep that rounding out.
    for k, v in (exact or {}).items():
        if k in f:
            f[k] = torch.full_like(f[k], v)
    y32 = call(model, f).sample
    model = model.to(torch.bfloat16)
    # Timesteps, guidance and positions stay f32 as pipefuse keeps them (its sinusoidal features
    # are made in f32 on the host); the weights, latent and text embeddings are bf16.
    keep = ("timestep", "guidance", "img_ids", "txt_ids")
    fb = {k: (v if k in keep else v.to(torch.bfloat16)) for k, v in f.items()}
    y16 = call(model, fb).sample
    print(f"{name}: bf16 vs f32 relative L2 {rel_l2(y16, y32):.3e}"
          + ("" if exact else f"; f32 vs fixture {rel_l2(y32, f['output']):.1e}"))


def main():
    sd3 = load_file(os.path.join(FIX, "sd3_tiny_io.safetensors"))
    for prefix, name in (("x.", "sd3_tiny"), ("plain.", "sd3_tiny_plain")):
        distance(SD3Transformer2DModel, name, sd3, prefix,
                 lambda m, f: m(f["latent"], encoder_hidden_states=f["prompt_embeds"],
                                pooled_projections=f["pooled"], timestep=f["timestep"]))
    flux = load_file(os.path.join(FIX, "flux_tiny_io.safetensors"))
    for prefix, name in (("dev.", "flux_tiny"), ("schnell.", "flux_tiny_schnell")):
        distance(FluxTransformer2DModel, name, flux, prefix,
                 lambda m, f: m(f["packed"], encoder_hidden_states=f["prompt_embeds"],
                                pooled_projections=f["pooled"], timestep=f["timestep"],
                                img_ids=f["img_ids"], txt_ids=f["txt_ids"], guidance=f.get("guidance")),
                 exact={"timestep": 0.5, "guidance": 4.0})


if __name__ == "__main__":
    main()
