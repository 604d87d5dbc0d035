#!/usr/bin/env python3
"""Train the bundled demo model: a tiny class-conditional DiT on digits rendered from the DejaVu fonts.

    .venv-tools/bin/python tools/train_demo.py                      # train (~35 min on 2 threads), save, evaluate
    .venv-tools/bin/python tools/train_demo.py --eval-only          # re-evaluate the saved folder
    .venv-tools/bin/python tools/train_demo.py --steps 50 --out /tmp/x --no-eval   # smoke test

Everything is in PIXEL space (no VAE):

  data      10,000 digits (1,000 per class) rendered white on black from 6 DejaVu fonts (Debian's
            fonts-dejavu-core / -extra) at 64x64 with random size, stroke, rotation and offset, then
            area-averaged to 16x16 (render_digits); x * 2 - 1 -> [-1, 1]: background -1, ink +1.
            Shape [N, 1, 16, 16]. (The first demo used sklearn's 8x8 digits upsampled: unreadable.)
  model     diffusers DiTTransformer2DModel(in 1, out 2 (learned-sigma layout like the real DiT
            checkpoints; only channel 0 = epsilon is trained, channel 1 stays exactly 0), patch 2,
            sample_size 16 -> 8x8 = 64 tokens, 4 heads x 32 = 128 hidden, 4 layers,
            num_embeds_ada_norm 10 (classes 0..9, null class 10), ada_norm_zero).
            DiT-style init: xavier-uniform linears, N(0, 0.02) class tables and timestep MLPs,
            zero adaLN modulation (norm1.linear, proj_out_1) and zero final projection (proj_out_2).
  noise     DDPM, linear betas 1e-4..0.02, 1000 steps, epsilon prediction (DiT's "simple" loss =
            MSE on epsilon over channel 0).
  CFG       the class label is replaced by the null class 10 with probability 0.1 (one draw per
            sample, shared by all blocks; diffusers' own per-block LabelEmbedding dropout is
            switched off because each block would otherwise drop independently).
  optim     AdamW(lr 1e-3, betas (0.9, 0.999), weight_decay 0), 100 warm-up steps then cosine to
            1e-5; EMA of the weights (decay 0.999, with the (1+n)/(10+n) warm-up); the EMA weights
            are what is saved.
  output    <out>/ (default assets/digits-dit/): model_index.json (DiTPipeline without vae, with
            id2label), transformer/ (config.json + f32 safetensors), scheduler/scheduler_config.json
            (DDIM), MODEL_CARD.md, eval/digits_8x8.safetensors (images u8 [3797,8,8] 0..16,
            labels u8 [3797]: 2,000 digits rendered with another seed, pooled 2x2, then sklearn's
            1,797 handwritten digits).

Evaluation (also `--eval-only`): DDIM 20 steps (eta 0, "leading" spacing -> t = 950, 900, ..., 0),
classifier-free guidance 4 on the eps channel (eps = u + 4 (c - u), null class 10), noise
torch.Generator().manual_seed(seed).randn(10, 1, 16, 16) for seeds 0..4 with labels 0..9; the
16x16 samples are average-pooled 2x2 to 8x8, mapped (x + 1) / 2 * 16 and clipped to 0..16, then
classified by a 3-nearest-neighbour classifier (and, for reference, a LogisticRegression) fitted on
eval/digits_8x8.safetensors. The loop is cross-checked
against diffusers' real DiTPipeline.__call__ (null label 1000 remapped to 10 by a forward pre-hook,
identity stand-in for the vae). A preview grid (rows = seeds, columns = classes 0..9, each 16x16
sample scaled x8 nearest, pixel = round((x + 1) / 2 * 255)) is written to --preview.

Deterministic: all draws come from seeded generators; CPU, float32, torch.set_num_threads(--threads).
"""
import argparse
import copy
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file, load_file

import diffusers
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "assets", "digits-dit")
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES

MODEL_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=1,
    out_channels=2,
    num_layers=4,
    dropout=0.0,
    norm_num_groups=32,
    attention_bias=True,
    sample_size=16,
    patch_size=2,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=NUM_CLASSES,
    upcast_attention=False,
    norm_type="ada_norm_zero",
    norm_elementwise_affine=False,
    norm_eps=1e-5,
)

# Keys and values of model/tests/fixtures/dit_tiny_pipeline/scheduler/scheduler_config.json (the
# facebook/DiT-XL-2-256 hub file), plus an explicit timestep_spacing.
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": diffusers.__version__,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

MODEL_INDEX = {
    "_class_name": "DiTPipeline",
    "_diffusers_version": diffusers.__version__,
    "id2label": {str(i): str(i) for i in range(NUM_CLASSES)},
    "scheduler": ["diffusers", "DDIMScheduler"],
    "transformer": ["diffusers", "DiTTransformer2DModel"],
}


# --------------------------------------------------------------------------------------------- data
# Digits rendered from the DejaVu fonts (Debian's fonts-dejavu-core / fonts-dejavu-extra), with
# random size, stroke, slant, rotation and position: crisp 16x16 digits a person reads at once.
# (The first demo learned from sklearn's 8x8 handwritten digits upsampled to 16x16: its samples
# were too blurred to read 1, 2, 4, 5 and 7.)
FONT_DIR = "/usr/share/fonts/truetype/dejavu"
FONTS = [
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansCondensed.ttf", "DejaVuSansCondensed-Bold.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
]  # upright faces only: with slanted ones and heavier strokes too (a first try), the 1.4M-parameter
#    model drew 1, 4, 7 and 8 as blobs; the Mono faces' zero is slashed
TRAIN_PER_CLASS = 1000
EVAL_PER_CLASS = 200


def render_digits(per_class, seed):
    """f32 [10 * per_class, 16, 16] in [0, 1] (ink bright) and their labels u8, class i % 10.

    Each digit is drawn white on black at 64x64 with a random font of FONTS, size 48..60 px, stroke
    0..1 px, rotation -8..8 degrees and offset -3..3 px, then area-averaged (PIL's BOX filter)
    to 16x16: anti-aliased, not blurred."""
    from PIL import Image, ImageDraw, ImageFont

    fonts = [os.path.join(FONT_DIR, f) for f in FONTS]
    missing = [f for f in fonts if not os.path.exists(f)]
    if missing:
        sys.exit(f"missing fonts (apt install fonts-dejavu-core fonts-dejavu-extra): {missing}")
    rng = np.random.default_rng(seed)
    n = 10 * per_class
    images = np.zeros((n, 16, 16), np.float32)
    for i in range(n):
        d = str(i % 10)
        font = ImageFont.truetype(fonts[rng.integers(len(fonts))], size=int(rng.integers(48, 61)))
        stroke = int(rng.integers(0, 2))
        big = Image.new("L", (128, 128), 0)
        draw = ImageDraw.Draw(big)
        x0, y0, x1, y1 = draw.textbbox((0, 0), d, font=font, stroke_width=stroke)
        draw.text(((128 - (x1 - x0)) / 2 - x0, (128 - (y1 - y0)) / 2 - y0), d, fill=255, font=font,
                  stroke_width=stroke, stroke_fill=255)
        big = big.rotate(float(rng.uniform(-8, 8)), resample=Image.BILINEAR)
        dx, dy = (int(v) for v in rng.integers(-3, 4, size=2))
        tile = big.crop((32 + dx, 32 + dy, 96 + dx, 96 + dy)).resize((16, 16), Image.BOX)
        images[i] = np.asarray(tile, np.float32) / 255.0
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


def load_training_data(seed):
    """f32 [N, 1, 16, 16] in [-1, 1] and labels i64: the rendered digits (background -1, ink +1)."""
    images, labels = render_digits(TRAIN_PER_CLASS, seed)
    return torch.from_numpy(images)[:, None] * 2.0 - 1.0, torch.from_numpy(labels.astype(np.int64))


def load_digits_u8():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.uint8)  # [1797, 8, 8], 0..16
    labels = d.target.astype(np.uint8)  # [1797]
    assert images.shape == (1797, 8, 8) and images.max() == 16 and images.min() == 0
    return images, labels


def eval_set(seed):
    """The classifier's data, 8x8 with values 0..16 (u8) and labels: digits rendered apart from the
    training set (another seed), average-pooled 2x2, followed by sklearn's 1797 handwritten digits."""
    r, rl = render_digits(EVAL_PER_CLASS, seed + 1000)
    pooled = r.reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4))
    r8 = np.clip(np.round(pooled * 16.0), 0, 16).astype(np.uint8)
    s8, sl = load_digits_u8()
    return np.concatenate([r8, s8]), np.concatenate([rl, sl])


def to_8x8(samples):
    """f32 [N, 1, 16, 16] in [-1, 1] -> f32 [N, 64] in 0..16 (2x2 average pool)."""
    x = F.avg_pool2d(samples.float(), 2)
    return ((x + 1.0) / 2.0 * 16.0).clamp(0.0, 16.0).reshape(len(x), 64).numpy()


# -------------------------------------------------------------------------------------------- model
def build_model(seed):
    torch.manual_seed(seed)
    m = DiTTransformer2DModel(**MODEL_CONFIG)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(m.named_parameters()):
            if name.endswith("norm1.linear.weight") or name.endswith("norm1.linear.bias") or name.startswith(
                ("proj_out_1.", "proj_out_2.")
            ):
                p.zero_()
            elif "class_embedder.embedding_table" in name or ("timestep_embedder" in name and name.endswith("weight")):
                p.normal_(0.0, 0.02, generator=g)
            elif p.dim() >= 2:  # linears and the patch-embed conv
                fan_out, fan_in = p.shape[0], p[0].numel()
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                p.uniform_(-bound, bound, generator=g)
            else:
                p.zero_()
    # one consistent CFG drop per sample is done by the training loop instead
    for blk in m.transformer_blocks:
        blk.norm1.emb.class_embedder.dropout_prob = 0.0
    return m


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# -------------------------------------------------------------------------------------------- train
def train(args):
    x0_all, y_all = load_training_data(args.seed)
    n = len(x0_all)

    acp = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"
    ).alphas_cumprod.float()
    sqrt_acp, sqrt_1m = acp.sqrt(), (1.0 - acp).sqrt()

    model = build_model(args.seed)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr_min + 0.5 * (args.lr - args.lr_min) * (1.0 + math.cos(math.pi * t))

    g = torch.Generator().manual_seed(args.seed + 1)
    model.train()
    curve, window = [], []
    print(f"model: {n_params(model):,} params; {args.steps} steps x batch {args.batch}", flush=True)
    t_start = time.perf_counter()
    perm, pos = torch.randperm(n, generator=g), 0
    for step in range(args.steps):
        if pos + args.batch > n:  # epoch-wise shuffling, the tail of an epoch is dropped
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + args.batch]
        pos += args.batch
        x0, y = x0_all[idx], y_all[idx].clone()
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        drop = torch.rand(len(idx), generator=g) < args.cfg_drop
        y[drop] = NULL_CLASS
        xt = sqrt_acp[t].view(-1, 1, 1, 1) * x0 + sqrt_1m[t].view(-1, 1, 1, 1) * eps

        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        out = model(xt, timestep=t, class_labels=y).sample
        loss = F.mse_loss(out[:, : MODEL_CONFIG["in_channels"]], eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        d = min(args.ema, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(d).add_(pm, alpha=1.0 - d)

        window.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            el = time.perf_counter() - t_start
            curve.append((step + 1, float(np.mean(window)), el))
            print(f"step {step + 1:5d}  loss {np.mean(window):.4f}  lr {lr_at(step):.2e}  {el:7.1f} s", flush=True)
            window = []
    train_s = time.perf_counter() - t_start
    return ema, dict(train_s=train_s, curve=curve, n_params=n_params(ema))


# --------------------------------------------------------------------------------------------- save
def save_folder(model, out, images, labels):
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    os.makedirs(os.path.join(out, "eval"), exist_ok=True)
    model.save_pretrained(os.path.join(out, "transformer"), safe_serialization=True)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER_CONFIG, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(MODEL_INDEX, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(
        {"images": torch.from_numpy(images.copy()), "labels": torch.from_numpy(labels.copy())},
        os.path.join(out, "eval", "digits_8x8.safetensors"),
    )


def load_transformer(out):
    m = DiTTransformer2DModel.from_pretrained(os.path.join(out, "transformer"))
    return m.eval().float()


# ----------------------------------------------------------------------------------------- sampling
def make_scheduler():
    cfg = {k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")}
    return DDIMScheduler(**cfg)


@torch.no_grad()
def ddim_cfg(model, noise, class_labels, steps, guidance):
    """DDIM (eta 0) + classifier-free guidance, the way DiTPipeline does it, with null class 10."""
    sched = make_scheduler()
    sched.set_timesteps(steps)
    b, c = noise.shape[0], noise.shape[1]
    x = noise.clone()
    labels = torch.cat([class_labels, torch.full((b,), NULL_CLASS, dtype=torch.long)])
    for t in sched.timesteps:
        out = model(torch.cat([x, x]), timestep=t.expand(2 * b), class_labels=labels).sample
        cond, uncond = out[:b, :c], out[b:, :c]
        eps = uncond + guidance * (cond - uncond)
        x = sched.step(eps, t, x).prev_sample
    return x, [int(t) for t in sched.timesteps]


@torch.no_grad()
def dit_pipeline_crosscheck(out, noise, class_labels, steps, guidance):
    """Run diffusers' real DiTPipeline.__call__ on the saved folder (vae=None in the folder; an
    identity stand-in is attached for the final decode, null label 1000 -> 10 by a pre-hook)."""
    import diffusers.pipelines.dit.pipeline_dit as pdit
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(out, vae=None)

    class IdentityVae:
        class config:
            scaling_factor = 1.0

        @staticmethod
        def decode(z):
            return type("D", (), {"sample": z})()

    object.__setattr__(pipe, "vae", IdentityVae())
    pipe.set_progress_bar_config(disable=True)

    def hook(mod, args, kwargs):
        cl = kwargs["class_labels"]
        kwargs["class_labels"] = torch.where(cl == 1000, torch.full_like(cl, NULL_CLASS), cl)
        return args, kwargs

    h = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    orig = pdit.randn_tensor
    pdit.randn_tensor = lambda *a, **k: noise.clone()
    try:
        img = pipe(class_labels=class_labels.tolist(), guidance_scale=guidance, num_inference_steps=steps,
                   output_type="pt").images
    finally:
        pdit.randn_tensor = orig
        h.remove()
    return img, pipe.labels


def write_preview(samples_by_seed, path):
    """rows = seeds, columns = classes 0..9; pixel = round((x + 1) / 2 * 255), x8 nearest."""
    rows = []
    for s in samples_by_seed:
        tiles = [np.pad(((s[i, 0].clamp(-1, 1) + 1) / 2 * 255).round().byte().numpy(), 1, constant_values=128)
                 for i in range(len(s))]
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    grid = grid.repeat(8, axis=0).repeat(8, axis=1)
    try:
        from PIL import Image

        Image.fromarray(grid, mode="L").save(path)
    except ImportError:
        path = os.path.splitext(path)[0] + ".pgm"
        with open(path, "wb") as f:
            f.write(b"P5 %d %d 255\n" % (grid.shape[1], grid.shape[0]) + grid.tobytes())
    return path


def evaluate(out, args):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    images, labels = eval_set(args.seed)
    X = images.reshape(-1, 64).astype(np.float64)
    makers = {"knn3": lambda: KNeighborsClassifier(n_neighbors=3),
              "logreg": lambda: LogisticRegression(max_iter=5000)}
    cv = {}
    for name, make in makers.items():  # 5-fold (shuffled, stratified) on the classifier's data
        a = []
        for tr, te in StratifiedKFold(5, shuffle=True, random_state=0).split(X, labels):
            c = make().fit(X[tr], labels[tr])
            a.append(np.mean(c.predict(X[te]) == labels[te]))
        cv[name] = float(np.mean(a))
        print(f"classifier {name}: 5-fold acc on its digits {cv[name]:.4f}")
    clfs = {name: make().fit(X, labels) for name, make in makers.items()}

    model = load_transformer(out)
    class_labels = torch.arange(NUM_CLASSES)
    want = class_labels.numpy()
    samples, preds = [], {name: [] for name in clfs}
    t0 = time.perf_counter()
    for seed in range(args.eval_seeds):
        noise = torch.randn(NUM_CLASSES, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
        x, ts = ddim_cfg(model, noise, class_labels, args.eval_steps, args.guidance)
        samples.append(x)
        feats = to_8x8(x).astype(np.float64)
        for name, c in clfs.items():
            preds[name].append(c.predict(feats))
        print(f"seed {seed}: knn3 {preds['knn3'][-1].tolist()}  logreg {preds['logreg'][-1].tolist()}  "
              f"x range [{x.min():.2f}, {x.max():.2f}]")
    sample_s = time.perf_counter() - t0
    acc = {name: float(np.mean(np.concatenate(p) == np.tile(want, args.eval_seeds))) for name, p in preds.items()}
    per_class = (np.stack(preds["knn3"]) == want).mean(axis=0)
    print(f"DDIM {args.eval_steps} steps (timesteps {ts}), CFG {args.guidance}: accuracy knn3 {acc['knn3']:.4f}, "
          f"logreg {acc['logreg']:.4f} over {args.eval_seeds} seeds x 10 classes ({sample_s:.1f} s)")
    print(f"per class (knn3): {per_class.tolist()}")

    # cross-check the loop against diffusers' DiTPipeline on seed 0
    noise = torch.randn(NUM_CLASSES, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    img, pipe_labels = dit_pipeline_crosscheck(out, noise, class_labels, args.eval_steps, args.guidance)
    ref = (samples[0] / 2 + 0.5).clamp(0, 1)
    xcheck = float((img - ref).abs().max())
    print(f"DiTPipeline cross-check (seed 0): max |diff| {xcheck:.3e}; pipe.labels {pipe_labels}")

    path = write_preview(samples, args.preview)
    print(f"preview: {path}")
    return dict(acc=acc["knn3"], acc_logreg=acc["logreg"], per_class=per_class.tolist(), cv=cv,
                timesteps=ts, preview=path, xcheck=xcheck, sample_s=sample_s, x_min=float(torch.cat(samples).min()),
                x_max=float(torch.cat(samples).max()))

# -------------------------------------------------------------------------------------------- card
def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def file_sizes(out):
    rows = []
    for root, _, files in sorted(os.walk(out)):
        for fn in sorted(files):
            p = os.path.join(root, fn)
            rows.append((os.path.relpath(p, out), os.path.getsize(p)))
    return rows


def write_card(out, args, info, ev, cmd):
    curve = "\n".join(f"| {s} | {l:.4f} | {t:.0f} |" for s, l, t in info["curve"])
    per_class = " ".join(f"{i}:{a:.1f}" for i, a in enumerate(ev["per_class"])) if ev else ""
    weights = os.path.getsize(os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors"))
    cfg = json.dumps(MODEL_CONFIG, indent=2)
    ev_text = (
        f"""- Sampler: DDIM, {args.eval_steps} steps, eta 0, `timestep_spacing` "leading"
  (timesteps {ev['timesteps']}), classifier-free guidance scale {args.guidance} on the epsilon channel:
  `eps = eps(x, null) + {args.guidance} * (eps(x, c) - eps(x, null))`, null class {NULL_CLASS}.
- Noise: `torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(seed))`, seeds
  0..{args.eval_seeds - 1}, labels 0..9 (one image per class per seed).
- Classifiers, fitted on `eval/digits_8x8.safetensors` (3,797 8x8 digits flattened to 64 features,
  0..16: 2,000 rendered apart from the training set, then sklearn's 1,797 handwritten ones):
  scikit-learn `KNeighborsClassifier(n_neighbors=3)` (the primary one) and
  `LogisticRegression(max_iter=5000)`. Their shuffled stratified 5-fold accuracy on that data is
  {ev['cv']['knn3']:.4f} (k-NN) and {ev['cv']['logreg']:.4f} (logreg).
- Samples are average-pooled 2x2 to 8x8 and mapped `(x + 1) / 2 * 16`, clipped to 0..16. The raw
  samples span [{ev['x_min']:.2f}, {ev['x_max']:.2f}] (the sampler does not clip).
- **Accuracy: {ev['acc'] * 100:.1f} % with k-NN** ({round(ev['acc'] * 10 * args.eval_seeds)}/{10 * args.eval_seeds}),
  {ev['acc_logreg'] * 100:.1f} % with logreg. Per class (k-NN, fraction of seeds): {per_class}.
- The loop matches diffusers' `DiTPipeline.__call__` on this folder (null label 1000 remapped to
  10, identity stand-in for the vae) to a max abs difference of {ev['xcheck']:.1e} on seed 0."""
        if ev
        else "(not evaluated in this run)"
    )
    text = f"""# digits-dit: a tiny class-conditional DiT drawing the digits 0-9 (demo model)

A diffusers `DiTPipeline`-style folder for pipefuse's demo: a `DiTTransformer2DModel` trained in
**pixel space** (there is no VAE) on digits rendered from the DejaVu fonts. It draws legible
16x16 digits of a requested class 0..9. Written by `tools/train_demo.py`; everything in this
folder is generated by that script.

## Outputs

Samples are **16x16, 1 channel (grayscale), in [-1, 1]**: -1 is background, +1 is full ink. To
write an 8-bit image, map `pixel = round((clamp(x, -1, 1) + 1) / 2 * 255)` (ink is bright). To
compare with the 8x8 classifier data, average-pool 2x2 and map `(x + 1) / 2 * 16`.

The folder holds no `vae` entry; a sampler must use the denoised sample directly.

## Data and preprocessing

- {10 * TRAIN_PER_CLASS:,} digits ({TRAIN_PER_CLASS:,} per class), rendered white on black at 64x64 from 6 upright DejaVu
  fonts (Sans, Sans Condensed, Serif; regular and bold; Debian's `fonts-dejavu-core` /
  `fonts-dejavu-extra`) with random size (48..60 px), stroke (0..1 px), rotation (-8..8
  degrees) and offset (-3..3 px), then area-averaged to 16x16 (`render_digits`, seed {args.seed}),
  then `x * 2 - 1`, giving [N, 1, 16, 16] in [-1, 1].
- `eval/digits_8x8.safetensors` holds the data for independent classifiers: `images` u8
  [3797, 8, 8] (0..16) and `labels` u8 [3797]: 2,000 digits rendered with another seed and pooled
  2x2, then scikit-learn's 1,797 handwritten digits (scikit-learn {_sk_version()}).

## Architecture

`transformer/config.json` (diffusers `DiTTransformer2DModel`):

```json
{cfg}
```

- 16x16 input, patch 2: 8x8 = 64 tokens, hidden 128 (4 heads x 32), 4 blocks.
- `out_channels` 2 is the learned-sigma layout of the real DiT checkpoints: channel 0 is epsilon;
  channel 1 was not trained and is exactly 0 (its weights and biases are zero). Samplers use
  channel 0 (`out_channels // 2 == in_channels`, as in `DiTPipeline`).
- Class labels 0..9; the null (unconditional) class is 10 = `num_embeds_ada_norm`.
- {info['n_params']:,} parameters; weights stored as **f32**
  (`transformer/diffusion_pytorch_model.safetensors`, {weights:,} bytes).
- Scheduler: `scheduler/scheduler_config.json`, `DDIMScheduler` with the DiT training schedule
  (linear betas 0.0001..0.02, 1000 steps, epsilon prediction), `timestep_spacing` "leading",
  `steps_offset` 0, `set_alpha_to_one` true, `clip_sample` false.
- `model_index.json` is what `DiTPipeline.save_pretrained` writes, without `vae`, plus
  `id2label` ("0".."9" -> "0".."9"), which `DiTPipeline.from_pretrained(folder, vae=None)` reads
  into `pipe.labels`. Note that `DiTPipeline.__call__` itself cannot run this folder unchanged:
  it needs a vae and hard-codes the null label as 1000.

## Training

- Objective: DDPM with linear betas 0.0001..0.02 over 1000 steps, t uniform in 0..999, MSE between
  channel 0 of the output and the noise (DiT's "simple" loss; no VLB term, sigma not learned).
- Classifier-free guidance dropout: the label is replaced by 10 with probability {args.cfg_drop}
  (one draw per sample, shared by all blocks).
- DiT-style init (seed {args.seed}): xavier-uniform linears, N(0, 0.02) class tables and timestep
  MLPs, zero adaLN modulation and zero final projection.
- AdamW (lr {args.lr:g}, betas (0.9, 0.999), weight decay 0), {args.warmup} linear warm-up steps,
  then cosine decay to {args.lr_min:g}. Batch {args.batch}, **{args.steps} steps**
  (about {args.steps * args.batch / (10 * TRAIN_PER_CLASS):.0f} epochs, shuffled per epoch). The saved weights are the EMA (decay
  {args.ema}).
- Machine: CPU only, `torch.set_num_threads({args.threads})`, {cpu_name()}, {os.cpu_count()} cores;
  torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}.
- **Training wall time: {info['train_s']:.1f} s ({info['train_s'] / 60:.1f} min)**, the training loop only
  (imports, saving and evaluation not counted). The 2 cores are shared with other jobs, so the time
  varies between runs: the {args.log_every}-step windows of this run took {_win(info, 'min'):.0f}..{_win(info, 'max'):.0f} s
  ({_win(info, 'min') / args.log_every:.2f}..{_win(info, 'max') / args.log_every:.2f} s a step).

Loss curve (mean training loss over each window of {args.log_every} steps):

| step | loss | elapsed s |
|---|---|---|
{curve}

## Evaluation

{ev_text}

## Retrain

From the repository root, with the venv of `tools/README.md`:

```sh
{cmd}
```

The run is seeded and deterministic on the same machine, thread count and package versions
(`tools/requirements.txt`). `--eval-only` re-runs the evaluation on the saved folder.
"""
    with open(os.path.join(out, "MODEL_CARD.md"), "w") as f:
        f.write(text)


def _win(info, how):
    ends = [0.0] + [t for _, _, t in info["curve"]]
    steps = [0] + [s for s, _, _ in info["curve"]]
    per = [(ends[i + 1] - ends[i]) * (steps[1] - steps[0]) / (steps[i + 1] - steps[i]) for i in range(len(ends) - 1)]
    return min(per) if how == "min" else max(per)


def _sk_version():
    import sklearn

    return sklearn.__version__


# --------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-min", type=float, default=1e-5)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=250)
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--eval-seeds", type=int, default=5)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--preview", default="/tmp/digits_preview.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.eval_only:
        ev = evaluate(args.out, args)
        return 0 if ev["acc"] >= 0.9 else 1

    cmd = " ".join([".venv-tools/bin/python tools/train_demo.py"] + sys.argv[1:])
    model, info = train(args)
    images, labels = eval_set(args.seed)
    save_folder(model, args.out, images, labels)
    ev = None if args.no_eval else evaluate(args.out, args)
    write_card(args.out, args, info, ev, cmd)
    total = 0
    for rel, size in file_sizes(args.out):
        total += size
        print(f"{size:>12,}  {os.path.join(args.out, rel)}")
    print(f"{total:>12,}  total; training {info['train_s']:.1f} s")
    return 0 if ev is None or ev["acc"] >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
