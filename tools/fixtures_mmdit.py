"""Sections `sd3`, `flux` and `pixart_sigma` of tools/make_fixtures.py (the models of issue 13): tiny
random SD3 / SD3.5 and Flux.1 transformers (MMDiT) and a PixArt-Sigma-style one, and their outputs,
from diffusers (the authority). Section `sd3`:

  sd3_tiny/            SD3Transformer2DModel(sample_size 8, patch 2, in 4, out 4, layers 3, heads 2,
                       head_dim 8, joint_attention_dim 12, caption_projection_dim 16,
                       pooled_projection_dim 10, pos_embed_max_size 12, qk_norm "rms_norm",
                       dual_attention_layers (0,)): the SD3.5 features (per-head RMS q/k norm, the
                       MMDiT-X dual attention in block 0), save_pretrained; EVERY parameter
                       re-initialised (diffusers zero-inits nothing here, but the default init makes
                       the adaLN outputs tiny).
  sd3_tiny_plain/      the same shapes without qk_norm and dual attention (SD3.0).
  sd3_tiny_io.safetensors   per variant prefix (`x.` for sd3_tiny, `plain.` for sd3_tiny_plain):
                       latent [2,4,8,6] (non-square: a 4x3 token grid cropped from the 12x12 table),
                       timestep f32 [999.0, 350.5], prompt_embeds [2,5,12], pooled [2,10],
                       output [2,4,8,6], block0..2 (image tokens after each block [2,12,16]).
"""

import os

import torch
from safetensors.torch import save_file
from diffusers import SD3Transformer2DModel

SD3_KW = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
              num_attention_heads=2, attention_head_dim=8, joint_attention_dim=12,
              caption_projection_dim=16, pooled_projection_dim=10, pos_embed_max_size=12)


@torch.no_grad()
def make_sd3(out, helpers):
    print("[sd3]")
    reinit, clean_dir, record, rel_l2 = (helpers[k] for k in ("reinit", "clean_dir", "record", "rel_l2"))
    io = {}
    g = torch.Generator().manual_seed(500)
    latent = torch.randn(2, 4, 8, 6, generator=g)
    timestep = torch.tensor([999.0, 350.5])
    prompt = torch.randn(2, 5, 12, generator=g)
    pooled = torch.randn(2, 10, generator=g)
    for prefix, name, extra, seed in (("x.", "sd3_tiny", dict(qk_norm="rms_norm", dual_attention_layers=(0,)), 5),
                                      ("plain.", "sd3_tiny_plain", {}, 6)):
        torch.manual_seed(0)
        model = SD3Transformer2DModel(**SD3_KW, **extra).eval()
        reinit(model, seed=seed)
        d = os.path.join(out, name)
        clean_dir(d)
        model.save_pretrained(d, safe_serialization=True)
        store = {}
        hooks = [b.register_forward_hook(lambda m, i, o, k=k: store.__setitem__(f"block{k}", o[1].detach().clone()))
                 for k, b in enumerate(model.transformer_blocks)]
        y = model(latent, encoder_hidden_states=prompt, pooled_projections=pooled, timestep=timestep).sample
        for h in hooks:
            h.remove()
        # the prompt matters (joint attention) and so does the pooled projection (conditioning)
        y_p = model(latent, encoder_hidden_states=prompt * 0.5, pooled_projections=pooled, timestep=timestep).sample
        y_c = model(latent, encoder_hidden_states=prompt, pooled_projections=pooled * 0.5, timestep=timestep).sample
        print(f"  {name}: output rms {y.pow(2).mean().sqrt():.3f}; prompt effect rel {rel_l2(y_p, y):.3f}, "
              f"pooled effect rel {rel_l2(y_c, y):.3f}")
        record(f"sd3 {name} prompt effect (must be visible) 1/rel", 1.0 / max(rel_l2(y_p, y), 1e-9), 100.0)
        io.update({f"{prefix}latent": latent, f"{prefix}timestep": timestep, f"{prefix}prompt_embeds": prompt,
                   f"{prefix}pooled": pooled, f"{prefix}output": y})
        for k, v in store.items():
            io[f"{prefix}{k}"] = v
    save_file({k: v.clone().contiguous() for k, v in io.items()}, os.path.join(out, "sd3_tiny_io.safetensors"))


# ---------------------------------------------------------------- flux
FLUX_KW = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
               num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(2, 2, 4))


def pack_latents(x):
    """FluxPipeline's packing (its `_pack_latents`, restated): [B, C, H, W] -> [B, (H/2)(W/2), 4C],
    each token the 2x2 block at (row, col) with channels ordered (c, dy, dx)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def image_ids(rows, cols):
    """FluxPipeline's image position ids (its `_prepare_latent_image_ids`, restated): one row
    (0, row, col) per packed token, row-major, float32."""
    r = torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, cols)
    c = torch.arange(cols, dtype=torch.float32)[None, :].expand(rows, cols)
    return torch.stack([torch.zeros(rows, cols), r, c], dim=-1).reshape(rows * cols, 3)


@torch.no_grad()
def make_flux(out, helpers):
    """Section `flux`: tiny random Flux.1 transformers (FluxTransformer2DModel).

      flux_tiny/           guidance_embeds = True (Flux.1-dev style), 2 double + 2 single blocks,
                           heads 2 x head_dim 8, axes_dims_rope (2, 2, 4), in 16 (= 4 latent channels
                           packed 2x2), joint 12, pooled 10.
      flux_tiny_schnell/   the same without the guidance embedding (Flux.1-schnell style).
      flux_tiny_io.safetensors   per prefix (`dev.`, `schnell.`): latent [2,4,6,8] (unpacked), packed
                           [2,12,16] (FluxPipeline._pack_latents), img_ids [12,3]
                           (_prepare_latent_image_ids), txt_ids [5,3] (zeros), prompt_embeds [2,5,12],
                           pooled [2,10], timestep [0.999, 0.35] (the model multiplies by 1000),
                           guidance [3.5, 5.0] (dev only), output [2,12,16] (packed), double0..1 and
                           single0..1 (image tokens after each block).
    """
    from diffusers import FluxTransformer2DModel
    print("[flux]")
    reinit, clean_dir, record, rel_l2 = (helpers[k] for k in ("reinit", "clean_dir", "record", "rel_l2"))
    io = {}
    g = torch.Generator().manual_seed(600)
    latent = torch.randn(2, 4, 6, 8, generator=g)
    packed = pack_latents(latent)
    img_ids = image_ids(3, 4)
    txt_ids = torch.zeros(5, 3)
    prompt = torch.randn(2, 5, 12, generator=g)
    pooled = torch.randn(2, 10, generator=g)
    timestep = torch.tensor([0.999, 0.35])
    guidance = torch.tensor([3.5, 5.0])
    for prefix, name, guided, seed in (("dev.", "flux_tiny", True, 7), ("schnell.", "flux_tiny_schnell", False, 8)):
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**FLUX_KW, guidance_embeds=guided).eval()
        reinit(model, seed=seed)
        d = os.path.join(out, name)
        clean_dir(d)
        model.save_pretrained(d, safe_serialization=True)
        store = {}
        hooks = [b.register_forward_hook(lambda m, i, o, k=k: store.__setitem__(f"double{k}", o[1].detach().clone()))
                 for k, b in enumerate(model.transformer_blocks)]
        hooks += [b.register_forward_hook(lambda m, i, o, k=k: store.__setitem__(f"single{k}", o[1].detach().clone()))
                  for k, b in enumerate(model.single_transformer_blocks)]
        kw = dict(encoder_hidden_states=prompt, pooled_projections=pooled, timestep=timestep, img_ids=img_ids,
                  txt_ids=txt_ids, guidance=guidance if guided else None)
        y = model(packed, **kw).sample
        for h in hooks:
            h.remove()
        y_p = model(packed, **{**kw, "encoder_hidden_states": prompt * 0.5}).sample
        print(f"  {name}: output rms {y.pow(2).mean().sqrt():.3f}; prompt effect rel {rel_l2(y_p, y):.3f}")
        record(f"flux {name} prompt effect (must be visible) 1/rel", 1.0 / max(rel_l2(y_p, y), 1e-9), 100.0)
        io.update({f"{prefix}latent": latent, f"{prefix}packed": packed, f"{prefix}img_ids": img_ids,
                   f"{prefix}txt_ids": txt_ids, f"{prefix}prompt_embeds": prompt, f"{prefix}pooled": pooled,
                   f"{prefix}timestep": timestep, f"{prefix}output": y})
        if guided:
            io[f"{prefix}guidance"] = guidance
        for k, v in store.items():
            io[f"{prefix}{k}"] = v
    save_file({k: v.clone().contiguous() for k, v in io.items()}, os.path.join(out, "flux_tiny_io.safetensors"))


# ---------------------------------------------------------------- pixart-sigma
@torch.no_grad()
def make_pixart_sigma(out, helpers):
    """Section `pixart_sigma`: a tiny PixArt-Sigma-style transformer (the PixArt-alpha class with
    Sigma's config keys: sample_size 128 without micro-conditions, an explicit interpolation_scale 2,
    as PixArt-Sigma-XL-2-1024-MS has).

      pixart_sigma_tiny/   PixArtTransformer2DModel(heads 2, head_dim 16, in 4, out 8, layers 2,
                           sample_size 128, patch 2, caption_channels 24, cross_attention_dim 32,
                           interpolation_scale 2, use_additional_conditions False).
      pixart_sigma_tiny_io.safetensors   latent [2,4,10,6] (non-square, far from the 64x64 base
                           grid), timestep i64 [999, 17], encoder_hidden_states [2,7,24], mask [2,7]
                           (sample 1 keeps 5 tokens), output_masked, output_nomask.
    """
    from diffusers import PixArtTransformer2DModel
    print("[pixart_sigma]")
    reinit, clean_dir = helpers["reinit"], helpers["clean_dir"]
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                     num_layers=2, sample_size=128, patch_size=2, caption_channels=24,
                                     cross_attention_dim=32, interpolation_scale=2,
                                     use_additional_conditions=False).eval()
    assert model.use_additional_conditions is False
    reinit(model, seed=9)
    d = os.path.join(out, "pixart_sigma_tiny")
    clean_dir(d)
    model.save_pretrained(d, safe_serialization=True)
    g = torch.Generator().manual_seed(700)
    latent = torch.randn(2, 4, 10, 6, generator=g)
    timestep = torch.tensor([999, 17], dtype=torch.int64)
    ehs = torch.randn(2, 7, 24, generator=g)
    mask = torch.tensor([[1.0] * 7, [1.0] * 5 + [0.0] * 2])
    added = {"resolution": None, "aspect_ratio": None}
    y_m = model(latent, encoder_hidden_states=ehs, timestep=timestep, added_cond_kwargs=added,
                encoder_attention_mask=mask).sample
    y_n = model(latent, encoder_hidden_states=ehs, timestep=timestep, added_cond_kwargs=added).sample
    print(f"  output rms {y_m.pow(2).mean().sqrt():.3f}; mask effect rel {helpers['rel_l2'](y_n, y_m):.3f}")
    save_file({"latent": latent, "timestep": timestep, "encoder_hidden_states": ehs, "mask": mask,
               "output_masked": y_m.contiguous(), "output_nomask": y_n.contiguous()},
              os.path.join(out, "pixart_sigma_tiny_io.safetensors"))
