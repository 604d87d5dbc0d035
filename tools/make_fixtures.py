#!/usr/bin/env python3
"""Generate the small, committed test fixtures of pipefuse from diffusers (the authority).

    .venv-tools/bin/python tools/make_fixtures.py [--out model/tests/fixtures] [--ref-dir DIR] [--copy]
                                                  [--only SECTION[,SECTION...]] [--pf-out actors/tests/fixtures]

Deterministic: every random draw comes from a seeded torch.Generator / torch.manual_seed,
everything runs on CPU in float32 with model.eval() and torch.no_grad(). Re-running with the
pinned versions in tools/requirements.txt reproduces the files bit for bit (the safetensors
files written by diffusers' save_pretrained carry no timestamp).

What is written (all tensors float32 unless stated; integer tensors int64):

  dit_tiny/                    DiTTransformer2DModel(heads 2, head_dim 16, in 4, out 8, layers 3,
                               sample_size 8, patch 2, num_embeds_ada_norm 10), save_pretrained.
                               EVERY parameter re-initialised with N(0, std^2) (see `param_std`),
                               because diffusers zero-inits the adaLN-Zero / gate weights.
  dit_tiny_io.safetensors      latent [2,4,8,8], timestep i64 [999,17], class_labels i64 [3,10]
                               (10 = null class = num_embeds_ada_norm), output [2,8,8,8],
                               patch_embed / block0..2 [2,16,32] (forward hooks),
                               output_f16 / output_bf16 (parameters rounded to f16 / bf16 and
                               back to f32, forward in f32).
  dit_tiny_f16/, dit_tiny_bf16/  same model, weights stored as F16 / BF16.
  dit_tiny_sharded/            same f32 weights, save_pretrained(max_shard_size="100KB") -> >= 3
                               shards + diffusion_pytorch_model.safetensors.index.json.
  dit_tiny_legacy/             same weights, config.json in the old hub style of
                               facebook/DiT-XL-2-256/transformer (Transformer2DModel, no norm_eps).
  pixart_tiny/                 PixArtTransformer2DModel(heads 2, head_dim 16, in 4, out 8, layers 3,
                               sample_size 8, patch 2, caption_channels 24, cross_attention_dim 32).
  pixart_tiny_io.safetensors   prefixes sq. (latent [2,4,8,8]) and nonsq. ([2,4,8,12]).
  schedulers/{ddim,dpm,flow}/scheduler_config.json   the hub configs (DiT-XL-2-256,
                               PixArt-XL-2-512x512, stable-diffusion-3-medium).
  schedulers/trajectories.safetensors   ddim (12), dpm (12), dpm20 (20), flow (12) steps.
  dit_tiny_pipeline/           model_index.json (+ transformer/, scheduler/), no vae.
  dit_pipeline_ddim.safetensors  real DiTPipeline.__call__ (12 DDIM steps, CFG 4, labels [3,7]).
  dit_pipeline_noise.safetensors single tensor `latents` = the pipeline noise.

Section `vae`:

  vae_tiny/                    AutoencoderKL(block_out_channels [16, 32], layers_per_block 1,
                               norm_num_groups 8, latent 4, out 3, scaling_factor 0.18215,
                               shift_factor None), every parameter re-drawn (reinit, seed 3),
                               save_pretrained (encoder weights included; the Rust side reads only
                               decoder.* and post_quant_conv.*). Upscale factor 2^(2-1) = 2.
  vae_tiny_io.safetensors      latent [2,4,8,8] (sampler space), decode_input = latent / 0.18215,
                               output = vae.decode(decode_input).sample [2,3,16,16],
                               image = (output / 2 + 0.5).clamp(0, 1), and the traced intermediates
                               post_quant_conv [2,4,8,8], conv_in / mid_block [2,32,8,8],
                               up_blocks.0 [2,32,16,16] (forward hooks).

Section `pipefusion` (written under --pf-out, default actors/tests/fixtures/):

  dit_pf/                      DiTPipeline folder (model_index.json, transformer/, scheduler/ = the
                               DDIM hub config): DiTTransformer2DModel(heads 2, head_dim 16, in 4,
                               out 8, layers 4, sample_size 16, patch 2, num_embeds_ada_norm 1000),
                               same re-init as dit_tiny (seed 1), f32. 8x8 = 64 tokens, 8 token rows.
  pipefusion_ref.safetensors   noise [2,4,16,16], labels i64 [3,7], steps i64 [8], guidance f32 [4.0],
                               timesteps i64 [8], and the final latents [2,4,16,16] of
                               shared/reference/pipefusion_ref.run for cases M{M}_W{W} plus `serial`
                               (M=1, W=steps).

torch_bf16_io.safetensors (section torch_bf16): diffusers' own bf16 forwards (`model.to(torch.bfloat16)`) of
  dit_tiny (dit.output) and pixart_tiny (pixart.sq.output_masked, pixart.nonsq.output_masked) on those
  fixtures' inputs, stored as f32.

Sections are selected with --only (comma-separated: dit, pixart, torch_bf16 (after dit and pixart),
schedulers, pipeline, vae, pipefusion,
sd3, flux and pixart_sigma (tools/fixtures_mmdit.py), mmdit_pipelines (tools/fixtures_flow_pipelines.py,
after sd3 and flux));
the default runs all of them.

Weight files that are exact copies of dit_tiny's (dit_tiny_legacy/ and
dit_tiny_pipeline/transformer/) are written as relative symlinks to keep the fixtures small;
pass --copy to write real copies instead.

The numpy reference (/work/shared/reference/numpy_ref.py, found via --ref-dir, default
<repo>/../shared/reference) is imported for cross-checks when present; diffusers stays the
authority and its outputs are what is stored.
"""
import argparse
import copy
import glob
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
import diffusers.pipelines.dit.pipeline_dit as pipeline_dit_module
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtTransformer2DModel,
    Transformer2DModel,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = "diffusion_pytorch_model.safetensors"

DIT_KW = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3,
              sample_size=8, patch_size=2, num_embeds_ada_norm=10)
PIXART_KW = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3,
                 sample_size=8, patch_size=2, caption_channels=24, cross_attention_dim=32)

# ---- hub configs, reproduced key for key (json.dumps(indent=2, sort_keys=True) like diffusers) ----
# facebook/DiT-XL-2-256 scheduler/scheduler_config.json. No timestep_spacing key: default "leading".
DDIM_HUB = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.12.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "trained_betas": None,
}
# PixArt-alpha/PixArt-XL-2-512x512 scheduler/scheduler_config.json. NOTE: "lambda_min_clipped" is
# written by Python's json as the non-standard literal -Infinity (as on the hub).
# No final_sigmas_type key: diffusers default "zero".
DPM_HUB = {
    "_class_name": "DPMSolverMultistepScheduler",
    "_diffusers_version": "0.22.0.dev0",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "lambda_min_clipped": float("-inf"),
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}
# stabilityai/stable-diffusion-3-medium scheduler/scheduler_config.json
FLOW_HUB = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.29.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}


def legacy_dit_config(kw):
    """Old hub layout of facebook/DiT-XL-2-256/transformer/config.json, with our tiny sizes."""
    return {
        "_class_name": "Transformer2DModel",
        "_diffusers_version": "0.12.0.dev0",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "attention_head_dim": kw["attention_head_dim"],
        "cross_attention_dim": None,
        "dropout": 0.0,
        "in_channels": kw["in_channels"],
        "norm_elementwise_affine": False,
        "norm_num_groups": 32,
        "norm_type": "ada_norm_zero",
        "num_attention_heads": kw["num_attention_heads"],
        "num_embeds_ada_norm": kw["num_embeds_ada_norm"],
        "num_layers": kw["num_layers"],
        "num_vector_embeds": None,
        "only_cross_attention": False,
        "out_channels": kw["out_channels"],
        "patch_size": kw["patch_size"],
        "sample_size": kw["sample_size"],
        "upcast_attention": False,
        "use_linear_projection": False,
    }


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def rel_l2(a, b):
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else float(np.linalg.norm(a - b))


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


CHECKS = []


def record(name, value, limit):
    ok = value <= limit
    CHECKS.append((name, value, limit, ok))
    print(f"  check {name}: {value:.3e} (limit {limit:.0e}) {'ok' if ok else 'FAIL'}")
    return ok


# ---------------------------------------------------------------- init
MOD_GAIN = 1.0  # std of the adaLN modulation outputs (shift / scale / gate)


def param_std(name, shape):
    """Per-tensor std of the re-initialisation (activations O(1), shift/scale/gates O(1), output O(1))."""
    if name.endswith(".bias"):
        return 0.1
    if "embedding_table" in name:                 # class table rows (incl. the null row)
        return 1.0
    if "scale_shift_table" in name:              # PixArt per-block / final modulation offsets
        return 0.3
    fan_in = int(np.prod(shape[1:]))
    gain = 1.0
    if name.endswith("norm1.linear.weight") or name.startswith("adaln_single.linear") or \
            name.startswith("proj_out_1"):        # adaLN modulation: shift/scale/gate ~ N(0, 1)
        gain = MOD_GAIN
    return gain / np.sqrt(fan_in)


@torch.no_grad()
def reinit(model, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        p.copy_(torch.randn(tuple(p.shape), generator=g, dtype=torch.float32) * param_std(name, p.shape))


@torch.no_grad()
def rounded_copy(model, dtype):
    m = copy.deepcopy(model)
    for _, p in m.named_parameters():           # parameters only (the pos table buffer stays f32)
        p.copy_(p.to(dtype).to(torch.float32))
    return m


def add_hooks(model, store):
    hs = [model.pos_embed.register_forward_hook(lambda m, i, o: store.__setitem__("patch_embed", o.detach().clone()))]
    for k, blk in enumerate(model.transformer_blocks):
        hs.append(blk.register_forward_hook(
            lambda m, i, o, k=k: store.__setitem__(f"block{k}", (o[0] if isinstance(o, tuple) else o).detach().clone())))
    return hs


def link_or_copy(src, dst, use_copy):
    if os.path.lexists(dst):
        os.remove(dst)
    if use_copy:
        shutil.copyfile(src, dst)
    else:
        os.symlink(os.path.relpath(src, os.path.dirname(dst)), dst)


def clean_dir(path):
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


# ---------------------------------------------------------------- DiT
@torch.no_grad()
def make_dit(out, args, ref):
    print("[dit]")
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**DIT_KW).eval()
    reinit(model, seed=1)
    d_dir = os.path.join(out, "dit_tiny")
    clean_dir(d_dir)
    model.save_pretrained(d_dir, safe_serialization=True)

    g = torch.Generator().manual_seed(100)
    latent = torch.randn(2, 4, 8, 8, generator=g)
    timestep = torch.tensor([999, 17], dtype=torch.int64)
    labels = torch.tensor([3, 10], dtype=torch.int64)

    store = {}
    hooks = add_hooks(model, store)
    output = model(latent, timestep=timestep, class_labels=labels).sample
    for h in hooks:
        h.remove()
    out_f16 = rounded_copy(model, torch.float16)(latent, timestep=timestep, class_labels=labels).sample
    out_bf16 = rounded_copy(model, torch.bfloat16)(latent, timestep=timestep, class_labels=labels).sample

    # activation scale report (to judge the init): residual stream and the per-block increments
    prev = store["patch_embed"]
    print(f"  |patch_embed| rms {prev.pow(2).mean().sqrt():.3f}")
    for k in range(DIT_KW["num_layers"]):
        cur = store[f"block{k}"]
        print(f"  block{k}: rms {cur.pow(2).mean().sqrt():.3f}, increment rms {(cur - prev).pow(2).mean().sqrt():.3f}")
        prev = cur
    print(f"  output: rms {output.pow(2).mean().sqrt():.3f}, max|x| {output.abs().max():.3f}; "
          f"rel diff f16 {rel_l2(out_f16, output):.2e}, bf16 {rel_l2(out_bf16, output):.2e}")

    io = {"latent": latent, "timestep": timestep, "class_labels": labels, "output": output,
          "output_f16": out_f16, "output_bf16": out_bf16}
    io.update(store)
    save_file({k: v.clone().contiguous() for k, v in io.items()}, os.path.join(out, "dit_tiny_io.safetensors"))

    # reduced-precision folders
    for tag, dt, want in (("f16", torch.float16, out_f16), ("bf16", torch.bfloat16, out_bf16)):
        p = os.path.join(out, f"dit_tiny_{tag}")
        clean_dir(p)
        copy.deepcopy(model).to(dt).save_pretrained(p, safe_serialization=True)
        m = DiTTransformer2DModel.from_pretrained(p, torch_dtype=torch.float32).eval()
        got = m(latent, timestep=timestep, class_labels=labels).sample
        record(f"dit_tiny_{tag} reload (f32) vs output_{tag} max_abs", max_abs(got, want), 1e-6)

    # sharded
    p = os.path.join(out, "dit_tiny_sharded")
    clean_dir(p)
    model.save_pretrained(p, safe_serialization=True, max_shard_size="100KB")
    shards = sorted(glob.glob(os.path.join(p, "diffusion_pytorch_model-*.safetensors")))
    assert len(shards) >= 3, shards
    assert os.path.exists(os.path.join(p, WEIGHTS + ".index.json"))
    m = DiTTransformer2DModel.from_pretrained(p).eval()
    record(f"dit_tiny_sharded ({len(shards)} shards) reload max_abs",
           max_abs(m(latent, timestep=timestep, class_labels=labels).sample, output), 0.0)

    # legacy hub-style config
    p = os.path.join(out, "dit_tiny_legacy")
    clean_dir(p)
    write_json(os.path.join(p, "config.json"), legacy_dit_config(DIT_KW))
    link_or_copy(os.path.join(d_dir, WEIGHTS), os.path.join(p, WEIGHTS), args.copy)
    m = Transformer2DModel.from_pretrained(p).eval()
    print(f"  Transformer2DModel.from_pretrained(dit_tiny_legacy) -> {type(m).__name__}, "
          f"norm_eps {m.config.norm_eps}")
    assert isinstance(m, DiTTransformer2DModel)
    got = m(latent, timestep=timestep, class_labels=labels).sample
    assert max_abs(got, output) <= 1e-6
    record("dit_tiny_legacy reload max_abs", max_abs(got, output), 1e-6)

    if ref is not None:
        cfg, w = ref.load_model(d_dir)
        dbg = {}
        y = ref.dit_forward(cfg, w, latent.numpy(), timestep.numpy(), labels.numpy(), dbg=dbg)
        record("numpy_ref dit output rel_l2", rel_l2(y, output), 1e-5)
        for k in ("patch_embed", "block0", "block1", "block2"):
            record(f"numpy_ref dit {k} rel_l2", rel_l2(dbg[k], store[k]), 1e-5)
        for tag, want in (("f16", out_f16), ("bf16", out_bf16)):
            cfg2, w2 = ref.load_model(os.path.join(out, f"dit_tiny_{tag}"))
            y = ref.dit_forward(cfg2, w2, latent.numpy(), timestep.numpy(), labels.numpy())
            record(f"numpy_ref dit_tiny_{tag} folder vs output_{tag} rel_l2", rel_l2(y, want), 1e-5)
    return model


# ---------------------------------------------------------------- PixArt
@torch.no_grad()
def make_pixart(out, ref):
    print("[pixart]")
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**PIXART_KW).eval()
    # the attribute is derived (sample_size != 128 -> False); config.json keeps the argument as passed (null)
    assert model.use_additional_conditions is False, "use_additional_conditions must come out False"
    reinit(model, seed=2)
    p_dir = os.path.join(out, "pixart_tiny")
    clean_dir(p_dir)
    model.save_pretrained(p_dir, safe_serialization=True)
    with open(os.path.join(p_dir, "config.json")) as f:
        assert json.load(f)["use_additional_conditions"] is None

    g = torch.Generator().manual_seed(300)
    timestep = torch.tensor([999, 17], dtype=torch.int64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.float32)
    added = {"resolution": None, "aspect_ratio": None}
    io = {}
    for prefix, shape in (("sq.", (2, 4, 8, 8)), ("nonsq.", (2, 4, 8, 12))):
        latent = torch.randn(*shape, generator=g)
        ehs = torch.randn(2, 6, 24, generator=g)
        store = {}
        hooks = add_hooks(model, store) if prefix == "sq." else []
        out_m = model(latent, encoder_hidden_states=ehs, timestep=timestep, added_cond_kwargs=added,
                      encoder_attention_mask=mask).sample
        for h in hooks:
            h.remove()
        out_n = model(latent, encoder_hidden_states=ehs, timestep=timestep, added_cond_kwargs=added).sample
        # masked caption tokens of sample 1 must not matter
        ehs2 = ehs.clone()
        ehs2[1, 4:] = torch.randn(2, 24, generator=torch.Generator().manual_seed(301)) * 5
        out_m2 = model(latent, encoder_hidden_states=ehs2, timestep=timestep, added_cond_kwargs=added,
                       encoder_attention_mask=mask).sample
        assert max_abs(out_m2, out_m) <= 1e-6
        record(f"pixart {prefix} masked-token invariance max_abs", max_abs(out_m2, out_m), 1e-6)
        print(f"  {prefix} output_masked rms {out_m.pow(2).mean().sqrt():.3f}, max|x| {out_m.abs().max():.3f}; "
              f"mask effect rel {rel_l2(out_n, out_m):.3f}")
        io.update({f"{prefix}latent": latent, f"{prefix}timestep": timestep, f"{prefix}encoder_hidden_states": ehs,
                   f"{prefix}mask": mask, f"{prefix}output_masked": out_m, f"{prefix}output_nomask": out_n})
        for k, v in store.items():
            io[f"{prefix}{k}"] = v
        if prefix == "sq.":
            prev = store["patch_embed"]
            for k in range(PIXART_KW["num_layers"]):
                cur = store[f"block{k}"]
                print(f"  block{k}: rms {cur.pow(2).mean().sqrt():.3f}, increment rms "
                      f"{(cur - prev).pow(2).mean().sqrt():.3f}")
                prev = cur
        if ref is not None:
            cfg, w = ref.load_model(p_dir)
            dbg = {}
            y = ref.pixart_forward(cfg, w, latent.numpy(), timestep.numpy(), ehs.numpy(), mask.numpy(), dbg=dbg)
            record(f"numpy_ref pixart {prefix}output_masked rel_l2", rel_l2(y, out_m), 1e-5)
            y = ref.pixart_forward(cfg, w, latent.numpy(), timestep.numpy(), ehs.numpy(), None)
            record(f"numpy_ref pixart {prefix}output_nomask rel_l2", rel_l2(y, out_n), 1e-5)
            for k in store:
                record(f"numpy_ref pixart {prefix}{k} rel_l2", rel_l2(dbg[k], store[k]), 1e-5)
    save_file({k: v.clone().contiguous() for k, v in io.items()}, os.path.join(out, "pixart_tiny_io.safetensors"))


# ---------------------------------------------------------------- diffusers' bf16 forwards
@torch.no_grad()
def make_torch_bf16(out):
    """diffusers' own bf16 forward (weights and activations bf16, as `model.to(torch.bfloat16)` runs
    on the CPU) of the dit_tiny and pixart_tiny folders on their fixtures' inputs, as f32: what the
    runtime's bf16 linears are compared with (model/tests/golden_bf16.rs). Reads the existing
    fixtures (run after the dit and pixart sections); writes torch_bf16_io.safetensors."""
    print("[torch_bf16]")
    from safetensors.torch import load_file
    io = {}
    dit = DiTTransformer2DModel.from_pretrained(os.path.join(out, "dit_tiny")).eval()
    d = load_file(os.path.join(out, "dit_tiny_io.safetensors"))
    y = dit.to(torch.bfloat16)(d["latent"].to(torch.bfloat16), timestep=d["timestep"],
                               class_labels=d["class_labels"]).sample.float()
    io["dit.output"] = y
    print(f"  dit_tiny: diffusers bf16 vs f32 rel {rel_l2(y, d['output']):.2e}")
    pix = PixArtTransformer2DModel.from_pretrained(os.path.join(out, "pixart_tiny")).eval().to(torch.bfloat16)
    p = load_file(os.path.join(out, "pixart_tiny_io.safetensors"))
    for prefix in ("sq.", "nonsq."):
        y = pix(p[f"{prefix}latent"].to(torch.bfloat16),
                encoder_hidden_states=p[f"{prefix}encoder_hidden_states"].to(torch.bfloat16),
                timestep=p[f"{prefix}timestep"], added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                encoder_attention_mask=p[f"{prefix}mask"]).sample.float()
        io[f"pixart.{prefix}output_masked"] = y
        print(f"  pixart_tiny {prefix}: diffusers bf16 vs f32 rel {rel_l2(y, p[f'{prefix}output_masked']):.2e}")
    save_file({k: v.clone().contiguous() for k, v in io.items()}, os.path.join(out, "torch_bf16_io.safetensors"))


# ---------------------------------------------------------------- schedulers
@torch.no_grad()
def make_schedulers(out):
    print("[schedulers]")
    s_dir = os.path.join(out, "schedulers")
    os.makedirs(s_dir, exist_ok=True)
    classes = {"ddim": (DDIM_HUB, DDIMScheduler), "dpm": (DPM_HUB, DPMSolverMultistepScheduler),
               "flow": (FLOW_HUB, FlowMatchEulerDiscreteScheduler)}
    for name, (cfg, _) in classes.items():
        clean_dir(os.path.join(s_dir, name))
        write_json(os.path.join(s_dir, name, "scheduler_config.json"), cfg)

    cases = [("ddim", "ddim", 12, 11), ("dpm", "dpm", 12, 12), ("dpm20", "dpm", 20, 13), ("flow", "flow", 12, 14)]
    traj = {}
    for case, cname, n, seed in cases:
        cls = classes[cname][1]
        sch = cls.from_pretrained(os.path.join(s_dir, cname))      # proves diffusers parses the file
        sch.set_timesteps(n)
        g = torch.Generator().manual_seed(1000 + seed)
        sample = torch.randn(1, 4, 8, 8, generator=g) * float(getattr(sch, "init_noise_sigma", 1.0))  # flow: none (1)
        fixed = torch.randn(n, 1, 4, 8, 8, generator=g)
        s_in, m_out, s_out = [], [], []
        for i, t in enumerate(sch.timesteps):
            if hasattr(sch, "scale_model_input"):                    # ddim/dpm: identity; flow: none
                assert torch.equal(sch.scale_model_input(sample, t), sample)
            mo = 0.8 * torch.tanh(sample) + 0.3 * fixed[i]
            nxt = sch.step(mo, t, sample).prev_sample
            s_in.append(sample)
            m_out.append(mo)
            s_out.append(nxt)
            sample = nxt
        traj[f"{case}.timesteps"] = sch.timesteps.to(torch.float64)
        traj[f"{case}.sample_in"] = torch.stack(s_in)
        traj[f"{case}.model_output"] = torch.stack(m_out)
        traj[f"{case}.sample_out"] = torch.stack(s_out)
        if getattr(sch, "sigmas", None) is not None:
            traj[f"{case}.sigmas"] = sch.sigmas.to(torch.float64)
        if case in ("ddim", "dpm"):
            traj[f"{case}.alphas_cumprod"] = sch.alphas_cumprod.to(torch.float32)
        ts = sch.timesteps.tolist()
        sig = traj.get(f"{case}.sigmas")
        print(f"  {case}: timesteps ({sch.timesteps.dtype}) = {[round(x, 4) for x in ts]}")
        if sig is not None:
            print(f"  {case}: sigmas = {[round(x, 6) for x in sig.tolist()]}")
        print(f"  {case}: |final sample| rms {sample.pow(2).mean().sqrt():.3f}")
        # small independent checks of the simplest update rules
        if case == "flow":
            x = traj["flow.sample_in"].double()
            dt = (sig[1:] - sig[:-1]).view(-1, 1, 1, 1, 1)
            record("flow euler update (x + (s_next - s)*v) rel_l2",
                   rel_l2((x + dt * traj["flow.model_output"].double()), traj["flow.sample_out"]), 1e-6)
        if case == "ddim":
            acp = traj["ddim.alphas_cumprod"].double()
            ratio = 1000 // n
            x, e = traj["ddim.sample_in"].double(), traj["ddim.model_output"].double()
            outs = []
            for i, t in enumerate(ts):
                a_t = acp[int(t)]
                a_p = acp[int(t) - ratio] if int(t) - ratio >= 0 else torch.tensor(1.0, dtype=torch.float64)
                x0 = (x[i] - (1 - a_t).sqrt() * e[i]) / a_t.sqrt()
                outs.append(a_p.sqrt() * x0 + (1 - a_p).sqrt() * e[i])
            record("ddim eta=0 update rel_l2", rel_l2(torch.stack(outs), traj["ddim.sample_out"]), 1e-5)
    save_file({k: v.clone().contiguous() for k, v in traj.items()}, os.path.join(s_dir, "trajectories.safetensors"))


# ---------------------------------------------------------------- DiTPipeline
@torch.no_grad()
def make_pipeline(out, args, ref):
    """Runs diffusers' real DiTPipeline.__call__ on dit_tiny.

    How the latents are obtained: DiTPipeline has no `latents=` argument, so the module-level
    `randn_tensor` of diffusers.pipelines.dit.pipeline_dit is monkeypatched to return `noise`.
    DiTPipeline ignores output_type="latent" (it always runs vae.decode; only "pil"/"np"/"pt"
    change the post-processing), so the per-step latents are captured by wrapping
    pipe.scheduler.step (prev_sample, conditional half = first B rows), and the final latent is the
    last of them; it is cross-checked against the input of vae.decode (= final / scaling_factor).
    The pipeline hard-codes the CFG null label as 1000 (the real DiT's num_embeds_ada_norm); our
    tiny model's null row is 10 = num_embeds_ada_norm, so a forward pre-hook on the transformer
    maps label 1000 -> 10. The tiny AutoencoderKL only exists to construct the pipeline.
    """
    print("[pipeline]")
    p_dir = os.path.join(out, "dit_tiny_pipeline")
    clean_dir(p_dir)
    d_dir = os.path.join(out, "dit_tiny")
    os.makedirs(os.path.join(p_dir, "transformer"))
    shutil.copyfile(os.path.join(d_dir, "config.json"), os.path.join(p_dir, "transformer", "config.json"))
    link_or_copy(os.path.join(d_dir, WEIGHTS), os.path.join(p_dir, "transformer", WEIGHTS), args.copy)
    write_json(os.path.join(p_dir, "scheduler", "scheduler_config.json"), DDIM_HUB)

    transformer = DiTTransformer2DModel.from_pretrained(os.path.join(p_dir, "transformer")).eval()
    scheduler = DDIMScheduler.from_pretrained(os.path.join(p_dir, "scheduler"))
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=8).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    # model_index.json exactly as DiTPipeline.save_pretrained writes it, minus the vae entry
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        with open(os.path.join(tmp, "model_index.json")) as f:
            mi = json.load(f)
    mi.pop("vae")
    write_json(os.path.join(p_dir, "model_index.json"), mi)

    null = transformer.config.num_embeds_ada_norm

    def remap_null(module, args_, kwargs):
        cl = kwargs.get("class_labels")
        if cl is not None:
            kwargs["class_labels"] = torch.where(cl == 1000, torch.full_like(cl, null), cl)
        return args_, kwargs

    hook = transformer.register_forward_pre_hook(remap_null, with_kwargs=True)

    g = torch.Generator().manual_seed(200)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    labels = [3, 7]
    B = len(labels)
    orig_randn = pipeline_dit_module.randn_tensor
    pipeline_dit_module.randn_tensor = lambda *a, **k: noise.clone()
    steps_lat, ts_seen, decode_in = [], [], []
    orig_step = pipe.scheduler.step

    def step_wrap(model_output, t, sample, *a, **k):
        res = orig_step(model_output, t, sample, *a, **k)
        assert torch.equal(res.prev_sample[:B], res.prev_sample[B:])   # CFG halves stay identical
        steps_lat.append(res.prev_sample[:B].clone())
        ts_seen.append(int(t))
        return res

    pipe.scheduler.step = step_wrap
    orig_decode = vae.decode

    def decode_wrap(z, *a, **k):
        decode_in.append(z.clone())
        return orig_decode(z, *a, **k)

    vae.decode = decode_wrap
    try:
        pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=12, output_type="pt")
    finally:
        pipeline_dit_module.randn_tensor = orig_randn
        hook.remove()
    final = steps_lat[-1]
    assert len(steps_lat) == 12
    sf = vae.config.scaling_factor
    record("pipeline vae.decode input * scaling_factor vs final_latent rel_l2",
           rel_l2(decode_in[0] * sf, final), 1e-6)
    print(f"  DDIM timesteps seen: {ts_seen}")
    print(f"  final latent rms {final.pow(2).mean().sqrt():.3f}, max|x| {final.abs().max():.3f}")

    io = {"noise": noise, "class_labels": torch.tensor(labels, dtype=torch.int64), "final_latent": final}
    for i, x in enumerate(steps_lat):
        io[f"latents.step{i:02d}"] = x
    save_file({k: v.clone().contiguous() for k, v in io.items()}, os.path.join(out, "dit_pipeline_ddim.safetensors"))
    save_file({"latents": noise.contiguous()}, os.path.join(out, "dit_pipeline_noise.safetensors"))

    if ref is not None:
        cfg, w = ref.load_model(os.path.join(p_dir, "transformer"))
        with open(os.path.join(p_dir, "scheduler", "scheduler_config.json")) as f:
            sched = json.load(f)
        orig_fwd = ref.dit_forward

        def fwd(cfg_, w_, latent, t, y, dbg=None):            # same null-label remap as above
            return orig_fwd(cfg_, w_, latent, t, np.where(y == 1000, null, y), dbg)

        ref.dit_forward = fwd
        try:
            ts, _, lat = ref.ddim_cfg(cfg, w, sched, noise.numpy(), np.array(labels, dtype=np.int64), 4.0, 12)
        finally:
            ref.dit_forward = orig_fwd
        assert [int(t) for t in ts] == ts_seen
        record("numpy_ref ddim_cfg final_latent rel_l2", rel_l2(lat[-1], final), 1e-4)
        record("numpy_ref ddim_cfg worst per-step rel_l2",
               max(rel_l2(a, b) for a, b in zip(lat, steps_lat)), 1e-4)


# ---------------------------------------------------------------- VAE decoder
# Two block_out_channels = one upsampling stage (factor 2 = 2^(len-1), not SD's 8); 16/32 channels
# keep the whole folder (encoder included, as save_pretrained writes it) near 0.67 MB.
VAE_KW = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
              latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.18215)
VAE_TRACE = ("post_quant_conv", "decoder.conv_in", "decoder.mid_block", "decoder.up_blocks.0")


@torch.no_grad()
def make_vae(out):
    """AutoencoderKL decoder: the sampler's latent in, `vae.decode(latent / scaling_factor).sample` out.

    The division is done here, before vae.decode, exactly as PixArtAlphaPipeline does
    (`latents / self.vae.config.scaling_factor`); DiTPipeline writes `1 / scaling_factor * latents`,
    which differs by rounding only (checked below). shift_factor is None for this config.
    """
    print("[vae]")
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_KW).eval()
    reinit(vae, seed=3)
    v_dir = os.path.join(out, "vae_tiny")
    clean_dir(v_dir)
    vae.save_pretrained(v_dir, safe_serialization=True)
    vae = AutoencoderKL.from_pretrained(v_dir).eval()
    cfg = vae.config
    assert cfg.shift_factor is None and cfg.use_post_quant_conv and cfg.mid_block_add_attention

    g = torch.Generator().manual_seed(500)
    latent = torch.randn(2, cfg.latent_channels, 8, 8, generator=g)      # sampler space
    z = latent / cfg.scaling_factor                                        # what vae.decode gets
    store = {}
    hooks = [vae.get_submodule(name).register_forward_hook(
        lambda m, i, o, name=name: store.__setitem__(name.removeprefix("decoder."), o.detach().clone()))
        for name in VAE_TRACE]
    sample = vae.decode(z).sample
    for h in hooks:
        h.remove()
    image = (sample / 2 + 0.5).clamp(0, 1)
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    assert sample.shape == (2, cfg.out_channels, 8 * factor, 8 * factor), sample.shape
    dit_style = vae.decode(1 / cfg.scaling_factor * latent).sample
    record("vae decode(latent / sf) vs decode(1 / sf * latent) (DiTPipeline form) rel_l2",
           rel_l2(dit_style, sample), 1e-6)
    for k, v in store.items():
        print(f"  {k}: {tuple(v.shape)}, rms {v.pow(2).mean().sqrt():.3f}")
    print(f"  output {tuple(sample.shape)}: rms {sample.pow(2).mean().sqrt():.3f}, max|x| {sample.abs().max():.3f}; "
          f"image in (0, 1): {((image > 0) & (image < 1)).float().mean():.2f} of pixels")

    io = {"latent": latent, "decode_input": z, "output": sample, "image": image}
    io.update(store)
    save_file({k: v.clone().contiguous() for k, v in io.items()}, os.path.join(out, "vae_tiny_io.safetensors"))


# ---------------------------------------------------------------- PipeFusion reference latents
PF_KW = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=4,
             sample_size=16, patch_size=2, num_embeds_ada_norm=1000)   # 1000 = the CFG null label
PF_CASES = [(1, 0), (1, 1), (2, 1), (4, 1), (4, 0), (3, 2), (8, 1), (2, 8)]   # (M, W); W = 8 = T is serial
PF_STEPS, PF_GUIDANCE, PF_LABELS = 8, 4.0, [3, 7]


@torch.no_grad()
def make_pipefusion(pf_out, pf_ref, ref):
    """Final latents of shared/reference/pipefusion_ref.run (numpy) on a 16x16-latent DiT.

    pipefusion_ref.run is called as is (not copied). `serial` is M=1, W=steps. Exactness checks:
    M=1 (any W) and W=T (any M) must equal serial. The serial latent is also checked against diffusers'
    real DiTPipeline.__call__ on the same noise / labels / steps (null label 1000 = num_embeds_ada_norm,
    so no remap is needed here) and against numpy_ref.ddim_cfg.
    """
    print("[pipefusion]")
    p_dir = os.path.join(pf_out, "dit_pf")
    clean_dir(p_dir)
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**PF_KW).eval()
    reinit(model, seed=1)
    model.save_pretrained(os.path.join(p_dir, "transformer"), safe_serialization=True)
    write_json(os.path.join(p_dir, "scheduler", "scheduler_config.json"), DDIM_HUB)

    transformer = DiTTransformer2DModel.from_pretrained(os.path.join(p_dir, "transformer")).eval()
    scheduler = DDIMScheduler.from_pretrained(os.path.join(p_dir, "scheduler"))
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=8).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:          # model_index.json as save_pretrained writes it, minus vae
        pipe.save_pretrained(tmp, safe_serialization=True)
        with open(os.path.join(tmp, "model_index.json")) as f:
            mi = json.load(f)
    mi.pop("vae")
    write_json(os.path.join(p_dir, "model_index.json"), mi)

    g = torch.Generator().manual_seed(400)
    noise = torch.randn(2, 4, PF_KW["sample_size"], PF_KW["sample_size"], generator=g)
    labels = np.array(PF_LABELS, dtype=np.int64)
    B = len(PF_LABELS)

    # diffusers' real DiTPipeline (same randn_tensor monkeypatch / scheduler.step capture as make_pipeline)
    orig_randn = pipeline_dit_module.randn_tensor
    pipeline_dit_module.randn_tensor = lambda *a, **k: noise.clone()
    steps_lat, ts_seen = [], []
    orig_step = pipe.scheduler.step

    def step_wrap(model_output, t, sample, *a, **k):
        res = orig_step(model_output, t, sample, *a, **k)
        assert torch.equal(res.prev_sample[:B], res.prev_sample[B:])
        steps_lat.append(res.prev_sample[:B].clone())
        ts_seen.append(int(t))
        return res

    pipe.scheduler.step = step_wrap
    try:
        pipe(class_labels=PF_LABELS, guidance_scale=PF_GUIDANCE, num_inference_steps=PF_STEPS, output_type="pt")
    finally:
        pipeline_dit_module.randn_tensor = orig_randn
    assert len(steps_lat) == PF_STEPS
    diffusers_final = steps_lat[-1].numpy()
    print(f"  DDIM timesteps seen: {ts_seen}")

    cfg, w = ref.load_model(os.path.join(p_dir, "transformer"))
    with open(os.path.join(p_dir, "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    tn = time.time()

    def pf(M, W):
        return pf_ref.run(cfg, w, sched, noise.numpy(), labels, scale=PF_GUIDANCE, steps=PF_STEPS, M=M, W=W)

    serial = pf(1, PF_STEPS)
    res = {f"M{M}_W{W}": pf(M, W) for M, W in PF_CASES}
    print(f"  pipefusion_ref.run: {len(PF_CASES) + 1} runs in {time.time() - tn:.1f} s; "
          f"serial rms {np.sqrt(np.mean(serial.astype(np.float64) ** 2)):.3f}, max|x| {np.abs(serial).max():.3f}")
    record("pipefusion M1_W0 vs serial rel_l2", rel_l2(res["M1_W0"], serial), 1e-5)
    record("pipefusion M1_W1 vs serial rel_l2", rel_l2(res["M1_W1"], serial), 1e-5)
    record(f"pipefusion M2_W{PF_STEPS} vs serial rel_l2", rel_l2(res[f"M2_W{PF_STEPS}"], serial), 1e-5)
    record("pipefusion serial vs diffusers DiTPipeline final latent rel_l2", rel_l2(serial, diffusers_final), 1e-4)
    ts, _, lat = ref.ddim_cfg(cfg, w, sched, noise.numpy(), labels, PF_GUIDANCE, PF_STEPS)
    assert [int(t) for t in ts] == ts_seen
    record("pipefusion serial vs numpy_ref.ddim_cfg rel_l2", rel_l2(serial, lat[-1]), 1e-5)
    print("  drift (rel_l2 vs serial):")
    for name, x in res.items():
        print(f"    {name:8s} {rel_l2(x, serial):.6e}")
    stale = [n for n, x in res.items() if rel_l2(x, serial) == 0.0 and not n.startswith("M1_")
             and not n.endswith(f"_W{PF_STEPS}")]
    assert not stale, f"cases with stale KV but no drift: {stale}"

    io = {"noise": noise, "labels": torch.tensor(PF_LABELS, dtype=torch.int64),
          "steps": torch.tensor([PF_STEPS], dtype=torch.int64),
          "guidance": torch.tensor([PF_GUIDANCE], dtype=torch.float32),
          "timesteps": torch.tensor(ts_seen, dtype=torch.int64),
          "serial": torch.from_numpy(np.ascontiguousarray(serial, dtype=np.float32))}
    for name, x in res.items():
        io[name] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    meta = {"steps": str(PF_STEPS), "guidance": repr(PF_GUIDANCE), "labels": ",".join(map(str, PF_LABELS)),
            "null_label": "1000", "scheduler": "DDIM (dit_pf/scheduler)", "pipeline": "dit_pf",
            "cases": ",".join(f"M{M}_W{W}" for M, W in PF_CASES) + ",serial",
            "serial": f"M=1, W={PF_STEPS}"}
    # one metadata key: safetensors writes __metadata__ from a hash map, so several keys would come out in a
    # random order and the file would not be bit-reproducible
    save_file({k: v.clone().contiguous() for k, v in io.items()}, os.path.join(pf_out, "pipefusion_ref.safetensors"),
              metadata={"pipefusion_ref": json.dumps(meta, sort_keys=True)})


def dir_size(path):
    total, rows = 0, []
    for dp, dns, fns in os.walk(path):
        dns.sort()
        for fn in sorted(fns):
            fp = os.path.join(dp, fn)
            if os.path.islink(fp):
                rows.append((os.path.relpath(fp, path), 0, "-> " + os.readlink(fp)))
                continue
            s = os.path.getsize(fp)
            total += s
            rows.append((os.path.relpath(fp, path), s, ""))
    return total, rows


SECTIONS = ("dit", "pixart", "torch_bf16", "schedulers", "pipeline", "vae", "pipefusion", "sd3", "flux",
            "pixart_sigma", "mmdit_pipelines")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "model", "tests", "fixtures"))
    ap.add_argument("--ref-dir", default=os.path.join(os.path.dirname(ROOT), "shared", "reference"),
                    help="folder holding numpy_ref.py for cross-checks (skipped if absent)")
    ap.add_argument("--copy", action="store_true", help="write copies instead of symlinks for duplicate weights")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections to run (default: all = {','.join(SECTIONS)})")
    ap.add_argument("--pf-out", default=os.path.join(ROOT, "actors", "tests", "fixtures"),
                    help="output folder of the pipefusion section")
    args = ap.parse_args()
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in only if x not in SECTIONS]
    if bad or not only:
        ap.error(f"--only: unknown section(s) {bad}; choose from {','.join(SECTIONS)}")
    t0 = time.time()
    diffusers.utils.logging.set_verbosity_error()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, numpy {np.__version__}")
    ref = None
    if os.path.exists(os.path.join(args.ref_dir, "numpy_ref.py")):
        sys.dont_write_bytecode = True          # never write __pycache__ into the (read-only) reference dir
        sys.path.insert(0, args.ref_dir)
        import numpy_ref as ref  # noqa: E402
        print(f"numpy reference: {args.ref_dir}/numpy_ref.py")
    else:
        print(f"numpy reference not found in {args.ref_dir}: cross-checks skipped")
    out_dirs = []
    if any(x in only for x in ("dit", "pixart", "torch_bf16", "schedulers", "pipeline", "vae", "sd3", "flux", "pixart_sigma",
                               "mmdit_pipelines")):
        os.makedirs(args.out, exist_ok=True)
        out_dirs.append(args.out)

    if "dit" in only:
        make_dit(args.out, args, ref)
    if "pixart" in only:
        make_pixart(args.out, ref)
    if "torch_bf16" in only:
        make_torch_bf16(args.out)
    if "schedulers" in only:
        make_schedulers(args.out)
    if "pipeline" in only:
        make_pipeline(args.out, args, ref)
    if "vae" in only:
        make_vae(args.out)
    if "sd3" in only:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from fixtures_mmdit import make_sd3  # noqa: E402
        make_sd3(args.out, dict(reinit=reinit, clean_dir=clean_dir, record=record, rel_l2=rel_l2))
    if "flux" in only:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from fixtures_mmdit import make_flux  # noqa: E402
        make_flux(args.out, dict(reinit=reinit, clean_dir=clean_dir, record=record, rel_l2=rel_l2))
    if "pixart_sigma" in only:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from fixtures_mmdit import make_pixart_sigma  # noqa: E402
        make_pixart_sigma(args.out, dict(reinit=reinit, clean_dir=clean_dir, record=record, rel_l2=rel_l2))
    if "mmdit_pipelines" in only:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from fixtures_flow_pipelines import make_mmdit_pipelines  # noqa: E402
        make_mmdit_pipelines(args.out, dict(record=record, rel_l2=rel_l2))
    if "pipefusion" in only:
        if ref is None or not os.path.exists(os.path.join(args.ref_dir, "pipefusion_ref.py")):
            print(f"[pipefusion] pipefusion_ref.py / numpy_ref.py not found in {args.ref_dir}: section skipped")
            if only == ["pipefusion"]:
                sys.exit(1)
        else:
            import pipefusion_ref as pf_ref  # noqa: E402  (ref_dir is already on sys.path)
            os.makedirs(args.pf_out, exist_ok=True)
            out_dirs.append(args.pf_out)
            make_pipefusion(args.pf_out, pf_ref, ref)

    print("\n[summary of checks]")
    for name, v, lim, ok in CHECKS:
        print(f"  {'ok  ' if ok else 'FAIL'} {v:.3e} <= {lim:.0e}  {name}")
    for d in out_dirs:
        total, rows = dir_size(d)
        print(f"\n[files under {os.path.relpath(d, ROOT)}]")
        for r, s, extra in rows:
            print(f"  {s:9d}  {r} {extra}")
        print(f"total {total} bytes ({total / 1024:.1f} KiB) in regular files")
    print(f"{time.time() - t0:.1f} s")
    failed = [c for c in CHECKS if not c[3]]
    if failed:
        print(f"{len(failed)} check(s) FAILED")
        sys.exit(1)


if __name__ == "__main__":
    main()
