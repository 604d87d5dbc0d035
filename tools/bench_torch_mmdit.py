#!/usr/bin/env python3
"""Time one forward of diffusers' SD3Transformer2DModel / FluxTransformer2DModel on the CPU with a
preset's shapes (the PyTorch baseline of `pipefuse bench forward --preset ...`, same flags):

    .venv-tools/bin/python tools/bench_torch_mmdit.py --preset SD3.5-Medium --resolution 512 \
        --batch 1 --threads 2 --iters 2 --json
    .venv-tools/bin/python tools/bench_torch_mmdit.py --preset Flux.1-dev --layers 9 ...

Random-initialised model (diffusers' init), float32, eval(), torch.inference_mode(),
torch.set_num_threads(threads), torch.set_num_interop_threads(1). `--layers N` keeps N blocks
(SD3: the first N joint blocks, dual attention among them; Flux: N // 3 double-stream and the
rest single-stream), as the Rust bench does, for models whose f32 weights do not fit in memory.
Inputs: a random latent (batch, 16, res/8, res/8) (Flux: packed 2x2 into (batch, tokens, 64) with
the pipeline's image ids), T prompt tokens (SD3 333, Flux 512; --caption-tokens), pooled text,
timestep 500 (Flux: 0.5, guidance 3.5 for dev). FLOPs: `MmditConfig::forward_flops` in
model/src/mmdit/family.rs (restated in `mmdit_flops` below).
"""
import argparse
import json
import statistics
import time

import torch

SD3 = {  # name: (layers, heads, pos_embed_max_size, dual layers, qk_norm)
    "SD3-Medium": (24, 24, 192, 0, False),
    "SD3.5-Medium": (24, 24, 384, 13, True),
    "SD3.5-Large": (38, 38, 192, 0, True),
}
FLUX = {"Flux.1-dev": True, "Flux.1-schnell": False}  # guidance embedding


def mmdit_flops(kind, d, layers, single, dual, batch, n, t, in_c, out_c, joint=4096, patch=2):
    """The Rust formula (family.rs): per joint/double block 2 (n+T) d 12d + 4 (n+T)^2 d + modulation."""
    jb = 2 * (n + t) * d * 12 * d + 4 * (n + t) ** 2 * d
    if kind == "sd3":
        second = 2 * n * d * 4 * d + 4 * n * n * d
        return batch * (layers * (jb + 2 * d * 12 * d) + dual * (second + 2 * d * 3 * d)
                        + 2 * n * in_c * patch * patch * d + 2 * t * joint * d + 2 * n * d * patch * patch * out_c)
    return batch * (layers * (jb + 2 * d * 12 * d) + single * (jb + 2 * d * 3 * d)
                    + 2 * n * in_c * d + 2 * t * joint * d + 2 * n * d * out_c)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="SD3.5-Medium", choices=sorted(SD3) + sorted(FLUX))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--caption-tokens", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    torch.manual_seed(0)
    lat = a.resolution // 8
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    if a.preset in SD3:
        layers, heads, pmax, dual, qk = SD3[a.preset]
        layers = a.layers or layers
        dual = min(dual, layers)
        t = a.caption_tokens or 333
        model = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                                      num_layers=layers, attention_head_dim=64, num_attention_heads=heads,
                                      joint_attention_dim=4096, caption_projection_dim=heads * 64,
                                      pooled_projection_dim=2048, pos_embed_max_size=pmax,
                                      dual_attention_layers=tuple(range(dual)),
                                      qk_norm="rms_norm" if qk else None).eval()
        d, n = heads * 64, (lat // 2) ** 2
        kw = dict(hidden_states=torch.randn(a.batch, 16, lat, lat, generator=g),
                  encoder_hidden_states=torch.randn(a.batch, t, 4096, generator=g),
                  pooled_projections=torch.randn(a.batch, 2048, generator=g),
                  timestep=torch.full((a.batch,), 500.0))
        flops = mmdit_flops("sd3", d, layers, 0, dual, a.batch, n, t, 16, 16)
    else:
        total = a.layers or 57
        double, single = total // 3, total - total // 3
        t = a.caption_tokens or 512
        guided = FLUX[a.preset]
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                       pooled_projection_dim=768, guidance_embeds=guided,
                                       axes_dims_rope=(16, 56, 56)).eval()
        d, n, layers = 3072, (lat // 2) ** 2, double
        rows = lat // 2
        ids = torch.zeros(rows, rows, 3)
        ids[..., 1] = torch.arange(rows)[:, None]
        ids[..., 2] = torch.arange(rows)[None, :]
        kw = dict(hidden_states=torch.randn(a.batch, n, 64, generator=g),
                  encoder_hidden_states=torch.randn(a.batch, t, 4096, generator=g),
                  pooled_projections=torch.randn(a.batch, 768, generator=g),
                  timestep=torch.full((a.batch,), 0.5), img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(t, 3),
                  guidance=torch.full((a.batch,), 3.5) if guided else None)
        flops = mmdit_flops("flux", d, double, single, 0, a.batch, n, t, 64, 64)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{a.preset}: layers {a.layers or 'all'}, params {n_params / 1e9:.2f} B, {n} image + {t} prompt tokens, "
          f"batch {a.batch}, threads {torch.get_num_threads()} (built in {time.perf_counter() - t0:.1f} s)", flush=True)
    times = []
    with torch.inference_mode():
        for i in range(a.warmup + a.iters):
            s = time.perf_counter()
            out = model(**kw).sample
            ms = (time.perf_counter() - s) * 1e3
            if i >= a.warmup:
                times.append(ms)
            print(f"{'warmup' if i < a.warmup else 'iter'} {i}: {ms:.1f} ms ({flops / 1e9 / (ms / 1e3):.1f} GFLOP/s)",
                  flush=True)
    assert torch.isfinite(out).all()
    med = statistics.median(times)
    print(f"median {med:.1f} ms; {flops / 1e9:.1f} GFLOP per forward, {flops / 1e9 / (med / 1e3):.1f} GFLOP/s")
    if a.json:
        print(json.dumps({"impl": "pytorch", "preset": a.preset, "layers": a.layers, "resolution": a.resolution,
                          "batch": a.batch, "threads": a.threads, "ms_per_forward": round(med, 3),
                          "gflop_per_forward": round(flops / 1e9, 3), "gflops": round(flops / 1e9 / (med / 1e3), 3),
                          "torch_version": torch.__version__}))


if __name__ == "__main__":
    main()
