#!/usr/bin/env python3
"""Time one forward pass of diffusers' DiTTransformer2DModel or PixArtTransformer2DModel (the PyTorch
baseline of `pipefuse bench forward`, same presets), on the CPU or a GPU.

    .venv-tools/bin/python tools/bench_torch.py --preset DiT-XL/2 --resolution 256 --batch 2 \
        --threads 2 --warmup 1 --iters 3 --json

Random-initialised model (diffusers' default init), float32, model.eval(), torch.inference_mode(),
torch.set_num_threads(threads), torch.set_num_interop_threads(1). The input is a random latent
(batch, 4, res/8, res/8), random timesteps and class labels (PixArt: 120 random caption tokens of
4096 channels, no mask, and for PixArt-alpha-1024 the resolution / aspect-ratio micro-conditions, as
the Rust bench gives); `batch` is the forward batch as given (no CFG doubling here). Prints one line per timed iteration; with --json a final line holding
{"impl":"pytorch","preset","resolution","batch","threads","ms_per_forward" (median),"ms_min",
"ms_max","gflops","torch_version"}.

FLOP count (shared with the Rust bench; multiply-add = 2 FLOPs; softmax, norms, GELU,
biases and the sin/cos features are not counted). With d = hidden size, L = layers, p = patch,
T = tokens = (res/8/p)^2, R = batch*T, C_in = 4, C_out = 8:

    per block:  linear layers   2*R*d*(3d + d + 4d + 4d)        (qkv, attn out, MLP in, MLP out)
                attention       4*batch*T^2*d                   (Q K^T and P V)
                modulation      2*batch*(256*d + d*d + d*6d)    (timestep MLP + adaLN linear;
                                                                 every diffusers block has its own)
    patch embed                 2*R*(4*p*p)*d
    final layer                 2*R*d*(p*p*8) + 2*batch*d*2d    (proj_out_2 + proj_out_1)

    total = L*(per block) + patch embed + final layer;  gflops = total / 1e9 / (median seconds)

PixArt (ModelConfig::forward_flops in model/src/config.rs): one shared modulation (counted once),
plus per block the cross-attention over Tc caption tokens 2*R*d*2d + 2*batch*Tc*d*2d + 4*batch*T*Tc*d,
plus the caption projection 2*batch*Tc*(4096*d + d*d).
"""
import argparse
import json
import statistics
import sys
import time

import torch

PRESETS = {  # name: (hidden, layers, heads)
    "DiT-S/2": (384, 12, 6),
    "DiT-B/2": (768, 12, 12),
    "DiT-L/2": (1024, 24, 16),
    "DiT-XL/2": (1152, 28, 16),
}
PIXART = {  # name: latent side (sample_size); all d=1152, 28 layers, 16 heads
    "PixArt-alpha-256": 32,
    "PixArt-alpha-512": 64,
    "PixArt-alpha-1024": 128,
}
PATCH, C_IN, C_OUT, CLASSES, CAPTION_CHANNELS = 2, 4, 8, 1000, 4096


def dit_flops(d, layers, patch, batch, tokens, c_in=C_IN, c_out=C_OUT):
    """The FLOP formula of the module docstring."""
    r = batch * tokens
    block = (2 * r * d * (3 * d + d + 4 * d + 4 * d)
             + 4 * batch * tokens * tokens * d
             + 2 * batch * (256 * d + d * d + d * 6 * d))
    patch_embed = 2 * r * (c_in * patch * patch) * d
    final = 2 * r * d * (patch * patch * c_out) + 2 * batch * d * 2 * d
    return layers * block + patch_embed + final


def pixart_flops(d, layers, patch, batch, tokens, caption, c_in=C_IN, c_out=C_OUT):
    """PixArt's FLOPs (the module docstring; the Rust formula)."""
    r = batch * tokens
    block = (2 * r * d * 12 * d + 4 * batch * tokens * tokens * d
             + 2 * r * d * 2 * d + 2 * batch * caption * d * 2 * d + 4 * batch * tokens * caption * d)
    shared = 2 * batch * (256 * d + d * d + 6 * d * d) + 2 * batch * caption * (CAPTION_CHANNELS * d + d * d)
    return (shared + layers * block + 2 * r * c_in * patch * patch * d + 2 * r * d * patch * patch * c_out
            + 2 * batch * d * 2 * d)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="DiT-XL/2", choices=sorted(PRESETS) + sorted(PIXART))
    ap.add_argument("--resolution", type=int, default=256, help="image size in pixels (latent = res/8)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N blocks (as the Rust bench's --layers)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32",
                    help="model and inputs in this dtype (bf16: PyTorch's CPU bf16 path, oneDNN/AMX where present)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: GPU 0 (attention through SDPA; each forward timed to torch.cuda.synchronize())")
    ap.add_argument("--json", action="store_true", help="print a final JSON line")
    a = ap.parse_args()
    if a.resolution % (8 * PATCH):
        sys.exit("resolution must be a multiple of 16")

    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel  # after the thread settings

    pixart = a.preset in PIXART
    d, layers, heads = PRESETS["DiT-XL/2"] if pixart else PRESETS[a.preset]
    layers = a.layers or layers
    lat = a.resolution // 8
    tokens = (lat // PATCH) ** 2
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    if pixart:
        sample = PIXART[a.preset]
        model = PixArtTransformer2DModel(num_attention_heads=heads, attention_head_dim=d // heads,
                                         in_channels=C_IN, out_channels=C_OUT, num_layers=layers,
                                         cross_attention_dim=d, caption_channels=CAPTION_CHANNELS,
                                         sample_size=sample, patch_size=PATCH, norm_type="ada_norm_single",
                                         use_additional_conditions=sample == 128,
                                         interpolation_scale=max(sample // 64, 1)).eval()
    else:
        model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=d // heads,
                                      in_channels=C_IN, out_channels=C_OUT, num_layers=layers, sample_size=lat,
                                      patch_size=PATCH, num_embeds_ada_norm=CLASSES).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # f32 means f32, as pipefuse's cuBLASLt path
    model = model.to(a.device, dtype)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{a.preset}: d={d} layers={layers} heads={heads} params={n_params / 1e6:.1f}M, latent {lat}x{lat}, "
          f"tokens={tokens}, batch={a.batch}, threads={torch.get_num_threads()} "
          f"(built in {time.perf_counter() - t0:.1f} s)", flush=True)

    g = torch.Generator().manual_seed(a.seed + 1)
    x = torch.randn(a.batch, C_IN, lat, lat, generator=g).to(a.device, dtype)
    t = torch.randint(0, 1000, (a.batch,), generator=g).to(a.device)
    y = torch.randint(0, CLASSES, (a.batch,), generator=g).to(a.device)
    caption = 120
    if pixart:
        text = torch.randn(a.batch, caption, CAPTION_CHANNELS, generator=g).to(a.device, dtype)
        extra = None
        if PIXART[a.preset] == 128:
            extra = {"resolution": torch.tensor([[float(a.resolution)] * 2] * a.batch).to(a.device, dtype),
                     "aspect_ratio": torch.ones(a.batch, 1).to(a.device, dtype)}
        forward = lambda: model(x, encoder_hidden_states=text, timestep=t, added_cond_kwargs=extra).sample
        flops = pixart_flops(d, layers, PATCH, a.batch, tokens, caption)
    else:
        forward = lambda: model(x, timestep=t, class_labels=y).sample
        flops = dit_flops(d, layers, PATCH, a.batch, tokens)

    times = []
    with torch.inference_mode():
        for i in range(a.warmup + a.iters):
            sync()
            s = time.perf_counter()
            out = forward()
            sync()
            ms = (time.perf_counter() - s) * 1e3
            tag = "warmup" if i < a.warmup else "iter"
            if i >= a.warmup:
                times.append(ms)
            print(f"{tag} {i if i < a.warmup else i - a.warmup}: {ms:.1f} ms "
                  f"({flops / 1e9 / (ms / 1e3):.1f} GFLOP/s)", flush=True)
    assert out.shape == (a.batch, C_OUT, lat, lat) and torch.isfinite(out).all()
    med = statistics.median(times)
    print(f"median {med:.1f} ms, min {min(times):.1f}, max {max(times):.1f}; "
          f"{flops / 1e9:.1f} GFLOP per forward, {flops / 1e9 / (med / 1e3):.1f} GFLOP/s")
    if a.json:
        print(json.dumps({"impl": "pytorch", "device": a.device, "dtype": a.dtype, "preset": a.preset, "resolution": a.resolution, "batch": a.batch,
                          "threads": a.threads, "ms_per_forward": round(med, 3), "ms_min": round(min(times), 3),
                          "ms_max": round(max(times), 3), "gflops": round(flops / 1e9 / (med / 1e3), 3),
                          "gflop_per_forward": round(flops / 1e9, 3), "torch_version": torch.__version__}))


if __name__ == "__main__":
    main()
