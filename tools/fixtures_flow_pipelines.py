"""Section `mmdit_pipelines` of tools/make_fixtures.py: whole sampling runs of diffusers'
StableDiffusion3Pipeline and FluxPipeline (0.42.1, the authority) on the tiny random transformers of
sections `sd3` and `flux` (run those first), from fixed noise and prompt embeddings, with
output_type="latent". Pipeline folders with null text encoders and no VAE, as a user would have
without encoders:

  sd3_pipeline/        model_index.json (StableDiffusion3Pipeline; text encoders, tokenizers and vae
                       null), transformer/ (= sd3_tiny: qk_norm, dual attention), scheduler/
                       (stabilityai/stable-diffusion-3.5-medium's: FlowMatchEulerDiscreteScheduler,
                       shift 3.0).
  flux_pipeline/       model_index.json (FluxPipeline; encoders and vae null), transformer/
                       (= flux_tiny: guidance embedding), scheduler/ (black-forest-labs/FLUX.1-dev's:
                       use_dynamic_shifting, base_shift 0.5, max_shift 1.15, shift 3.0).
  sd3_prompt.safetensors    prompt_embeds [2,5,12], pooled_prompt_embeds [2,10],
                       negative_prompt_embeds, negative_pooled_prompt_embeds (diffusers' names).
  sd3_noise.safetensors     latents [2,4,8,6] (one tensor: the --latents file).
  flux_prompt.safetensors   the same names, [2,5,12] / [2,10].
  flux_noise.safetensors    latents [2,4,6,8], UNPACKED (pipefuse packs it itself).
  mmdit_pipelines_io.safetensors:
    sd3.latent          final latent of StableDiffusion3Pipeline, 4 steps, guidance_scale 5.0
                        (CFG with the negative embeddings), [2,4,8,6].
    sd3.timesteps       the scheduler's timesteps of that run (f64).
    flux.latent         FluxPipeline, 4 steps, guidance_scale 3.5 (embedded), no true CFG;
                        unpacked [2,4,6,8].
    flux.timesteps      its timesteps (dynamic shift from the 12 packed tokens, the pipeline's
                        linspace sigmas).
    flux_cfg.latent     the same with true_cfg_scale 2.0 and the negative embeddings.
    sd3_plain.latent    sd3_plain_pipeline/ (transformer = sd3_tiny_plain: SD3.0, no qk_norm, no dual
                        attention; same scheduler), the sd3 prompt and noise, CFG 5.0.
    flux_schnell.latent flux_schnell_pipeline/ (transformer = flux_tiny_schnell: no guidance
                        embedding; FLUX.1-schnell's scheduler: static shift 1.0), the flux prompt
                        and noise, no guidance.
  pixart_sigma_pipeline/    PixArtSigmaPipeline folder (text encoder, tokenizer, vae null),
                        transformer = pixart_sigma_tiny (section pixart_sigma), scheduler = PixArt's
                        DPM-Solver++ 2M (schedulers/dpm).
  pixart_sigma_prompt.safetensors   prompt_embeds [2,6,24], prompt_attention_mask [2,6] (second
                        caption padded), negative_prompt_embeds, negative_prompt_attention_mask.
  pixart_sigma_noise.safetensors    latents [2,4,8,12].
    pixart_sigma.latent PixArtSigmaPipeline, 4 steps, guidance 4.5, use_resolution_binning False.
"""

import json
import os
import shutil

import torch
from safetensors.torch import save_file

# stabilityai/stable-diffusion-3.5-medium scheduler/scheduler_config.json
SD35_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.31.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}
# black-forest-labs/FLUX.1-schnell scheduler/scheduler_config.json
FLUX_SCHNELL_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}
# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
FLUX_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def pipeline_folder(out, name, pipeline_class, transformer_class, transformer_src, scheduler_cfg, nulls):
    d = os.path.join(out, name)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(os.path.join(d, "scheduler"))
    shutil.copytree(os.path.join(out, transformer_src), os.path.join(d, "transformer"))
    with open(os.path.join(d, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler_cfg, f, indent=2)
    index = {"_class_name": pipeline_class, "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", transformer_class]}
    index.update({k: [None, None] for k in nulls})
    with open(os.path.join(d, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return d


def unpack(latents, height, width):
    """FluxPipeline._unpack_latents with vae_scale_factor 8: packed [B, S, 4C] -> [B, C, H, W]."""
    b, _, c4 = latents.shape
    h, w = height // 8, width // 8
    x = latents.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def pack(x):
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


@torch.no_grad()
def make_mmdit_pipelines(out, helpers):
    from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    print("[mmdit_pipelines]")
    record, rel_l2 = helpers["record"], helpers["rel_l2"]
    for src in ("sd3_tiny", "sd3_tiny_plain", "flux_tiny", "flux_tiny_schnell"):
        if not os.path.exists(os.path.join(out, src, "config.json")):
            raise SystemExit(f"[mmdit_pipelines] {out}/{src} is missing: run sections sd3 and flux first")
    io = {}
    g = torch.Generator().manual_seed(700)

    # ---- SD3 / SD3.5: CFG 5.0, 4 steps, batch 2, non-square 8 x 6 latent (64 x 48 px)
    d = pipeline_folder(out, "sd3_pipeline", "StableDiffusion3Pipeline", "SD3Transformer2DModel", "sd3_tiny",
                        SD35_SCHEDULER, ["text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                                         "tokenizer_2", "tokenizer_3", "vae", "image_encoder",
                                         "feature_extractor"])
    sd3 = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(os.path.join(d, "transformer")),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(d, "scheduler")),
        vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None)
    prompt = {"prompt_embeds": torch.randn(2, 5, 12, generator=g),
              "pooled_prompt_embeds": torch.randn(2, 10, generator=g),
              "negative_prompt_embeds": torch.randn(2, 5, 12, generator=g),
              "negative_pooled_prompt_embeds": torch.randn(2, 10, generator=g)}
    noise = torch.randn(2, 4, 8, 6, generator=g)
    y = sd3(**prompt, latents=noise.clone(), height=64, width=48, num_inference_steps=4, guidance_scale=5.0,
            output_type="latent").images
    io["sd3.latent"] = y
    io["sd3.timesteps"] = sd3.scheduler.timesteps.to(torch.float64)
    save_file(prompt, os.path.join(out, "sd3_prompt.safetensors"))
    save_file({"latents": noise}, os.path.join(out, "sd3_noise.safetensors"))
    y1 = sd3(**prompt, latents=noise.clone(), height=64, width=48, num_inference_steps=4, guidance_scale=1.0,
             output_type="latent").images
    print(f"  sd3: timesteps {sd3.scheduler.timesteps.tolist()}; |latent| rms {y.pow(2).mean().sqrt():.3f}; "
          f"guidance effect rel {rel_l2(y1, y):.3f}")
    record("sd3 pipeline guidance effect (must be visible) 1/rel", 1.0 / max(rel_l2(y1, y), 1e-9), 100.0)

    # ---- Flux.1-dev: embedded guidance 3.5, 4 steps, 6 x 8 latent (48 x 64 px); then true CFG 2.0
    d = pipeline_folder(out, "flux_pipeline", "FluxPipeline", "FluxTransformer2DModel", "flux_tiny",
                        FLUX_SCHEDULER, ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae",
                                         "image_encoder", "feature_extractor"])
    flux = FluxPipeline(
        transformer=FluxTransformer2DModel.from_pretrained(os.path.join(d, "transformer")),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(d, "scheduler")),
        vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    fprompt = {"prompt_embeds": torch.randn(2, 5, 12, generator=g),
               "pooled_prompt_embeds": torch.randn(2, 10, generator=g),
               "negative_prompt_embeds": torch.randn(2, 5, 12, generator=g),
               "negative_pooled_prompt_embeds": torch.randn(2, 10, generator=g)}
    fnoise = torch.randn(2, 4, 6, 8, generator=g)
    pos = {k: v for k, v in fprompt.items() if not k.startswith("negative")}
    y = flux(**pos, latents=pack(fnoise), height=48, width=64, num_inference_steps=4, guidance_scale=3.5,
             output_type="latent").images
    io["flux.latent"] = unpack(y, 48, 64)
    io["flux.timesteps"] = flux.scheduler.timesteps.to(torch.float64)
    yc = flux(**fprompt, latents=pack(fnoise), height=48, width=64, num_inference_steps=4, guidance_scale=3.5,
              true_cfg_scale=2.0, output_type="latent").images
    io["flux_cfg.latent"] = unpack(yc, 48, 64)
    save_file(fprompt, os.path.join(out, "flux_prompt.safetensors"))
    save_file({"latents": fnoise}, os.path.join(out, "flux_noise.safetensors"))
    print(f"  flux: timesteps {flux.scheduler.timesteps.tolist()}; |latent| rms {y.pow(2).mean().sqrt():.3f}; "
          f"true-CFG effect rel {rel_l2(yc, y):.3f}")
    record("flux pipeline true-CFG effect (must be visible) 1/rel", 1.0 / max(rel_l2(yc, y), 1e-9), 100.0)
    assert torch.equal(pack(unpack(y, 48, 64)), y), "pack/unpack round trip"

    # ---- SD3.0-style transformer (no qk_norm, no dual attention), same request as sd3
    d = pipeline_folder(out, "sd3_plain_pipeline", "StableDiffusion3Pipeline", "SD3Transformer2DModel",
                        "sd3_tiny_plain", SD35_SCHEDULER, ["text_encoder", "text_encoder_2", "text_encoder_3",
                                                           "tokenizer", "tokenizer_2", "tokenizer_3", "vae",
                                                           "image_encoder", "feature_extractor"])
    sd3.transformer = SD3Transformer2DModel.from_pretrained(os.path.join(d, "transformer"))
    io["sd3_plain.latent"] = sd3(**prompt, latents=noise.clone(), height=64, width=48, num_inference_steps=4,
                                 guidance_scale=5.0, output_type="latent").images
    # ---- Flux.1-schnell-style: no guidance embedding, static shift 1
    d = pipeline_folder(out, "flux_schnell_pipeline", "FluxPipeline", "FluxTransformer2DModel", "flux_tiny_schnell",
                        FLUX_SCHNELL_SCHEDULER, ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae",
                                                 "image_encoder", "feature_extractor"])
    schnell = FluxPipeline(
        transformer=FluxTransformer2DModel.from_pretrained(os.path.join(d, "transformer")),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(d, "scheduler")),
        vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    ys = schnell(**pos, latents=pack(fnoise), height=48, width=64, num_inference_steps=4,
                 output_type="latent").images
    io["flux_schnell.latent"] = unpack(ys, 48, 64)
    io["flux_schnell.timesteps"] = schnell.scheduler.timesteps.to(torch.float64)
    print(f"  sd3_plain: |latent| rms {io['sd3_plain.latent'].pow(2).mean().sqrt():.3f}; flux_schnell: timesteps "
          f"{schnell.scheduler.timesteps.tolist()}")
    # ---- PixArt-Sigma: the PixArt class with Sigma's config, its own pipeline class
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    d = os.path.join(out, "pixart_sigma_pipeline")
    if os.path.exists(d):
        shutil.rmtree(d)
    shutil.copytree(os.path.join(out, "pixart_sigma_tiny"), os.path.join(d, "transformer"))
    shutil.copytree(os.path.join(out, "schedulers", "dpm"), os.path.join(d, "scheduler"))
    with open(os.path.join(d, "model_index.json"), "w") as f:
        json.dump({"_class_name": "PixArtSigmaPipeline", "_diffusers_version": "0.42.1",
                   "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
                   "transformer": ["diffusers", "PixArtTransformer2DModel"],
                   "text_encoder": [None, None], "tokenizer": [None, None], "vae": [None, None]}, f, indent=2)
    sigma = PixArtSigmaPipeline(
        transformer=PixArtTransformer2DModel.from_pretrained(os.path.join(d, "transformer")),
        scheduler=DPMSolverMultistepScheduler.from_pretrained(os.path.join(d, "scheduler")),
        vae=None, text_encoder=None, tokenizer=None)
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    sp = {"prompt_embeds": torch.randn(2, 6, 24, generator=g), "prompt_attention_mask": mask,
          "negative_prompt_embeds": torch.randn(2, 6, 24, generator=g),
          "negative_prompt_attention_mask": torch.ones(2, 6)}
    snoise = torch.randn(2, 4, 8, 12, generator=g)
    io["pixart_sigma.latent"] = sigma(**sp, negative_prompt=None, latents=snoise.clone(), height=64, width=96,
                                      num_inference_steps=4,
                                      guidance_scale=4.5, use_resolution_binning=False,
                                      output_type="latent").images
    save_file(sp, os.path.join(out, "pixart_sigma_prompt.safetensors"))
    save_file({"latents": snoise}, os.path.join(out, "pixart_sigma_noise.safetensors"))
    print(f"  pixart_sigma: |latent| rms {io['pixart_sigma.latent'].pow(2).mean().sqrt():.3f}")
    save_file({k: v.clone().contiguous() for k, v in io.items()},
              os.path.join(out, "mmdit_pipelines_io.safetensors"))
