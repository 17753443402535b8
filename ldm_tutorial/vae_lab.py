"""The VAE-losses lab: autoencoders trained side by side, one change at a time.

Two families, each holding everything fixed but one thing.

The loss family ("shared"): one good starting autoencoder, TinySD's VAE (3.9M parameters, trained
on shapes scenes and photograph crops), is copied four times. Its encoder stays frozen, so every copy
keeps the same latents; only the decoder's last two stages (0.28M parameters) are fine-tuned, each
copy with its own objective, on 128x128 crops of the training photographs, from the same seed and
data stream. This is how Stability made sd-vae-ft-EMA and ft-MSE from SD's decoder.

| variant | objective                                   |
|---------|---------------------------------------------|
| l2      | mean squared error                          |
| l1      | mean absolute error                         |
| l1_p    | L1 + perceptual                             |
| full    | L1 + perceptual + PatchGAN (the LDM recipe) |

The latent family ("scratch"): small autoencoders (0.2-0.4M parameters, no attention) trained from
scratch on 64x64 crops (3/4 shapes scenes, 1/4 photographs), because the KL weight, a VQ bottleneck
and the downsampling factor change the encoder too:

| variant    | objective                                      | latent          |
|------------|------------------------------------------------|-----------------|
| kl1e-6     | the LDM recipe                                 | KL 1e-6, f=8    |
| kl0        | the LDM recipe                                 | KL 0, f=8       |
| kl1e-2     | the LDM recipe                                 | KL 1e-2, f=8    |
| kl1e-2_sum | the LDM recipe, KL summed next to a mean L1    | KL 1e-2 x 3HW   |
| vq         | the LDM recipe, commitment loss instead of KL  | VQ, 512 codes   |
| f4 / f16   | the LDM recipe                                 | KL 1e-6, f=4/16 |

The perceptual term is `ldm_tutorial.losses.Perceptual`, LPIPS's formula on a frozen VGG-style trunk:
for the loss family the trunk trained here on the training photographs (`train_perceptual`, seed 0;
seed 1 is the independent judge), for the latent family a random trunk (seed 0). Real LPIPS needs
ImageNet weights that cannot be downloaded here. KL weights follow LDM's convention (see
`VAELossConfig.kl_reduction`).

The shipped checkpoints come from (README lists the exact commands and times)

    python -m ldm_tutorial.vae_lab --perceptual 0          # and 1: the two photo-trained trunks
    python -m ldm_tutorial.vae_lab --variants l2,l1,l1_p,full      # 1500 steps of batch 4
    python -m ldm_tutorial.vae_lab --variants kl1e-6,kl0,kl1e-2,kl1e-2_sum,vq,f4,f16   # 1000 x 16

which resume from their checkpoints if interrupted; a chapter can train the same variants for a few
steps with `train_variant` to show the mechanics.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .arch import count_parameters, decoder_features, decoder_rest
from .losses import PatchDiscriminator, Perceptual, VAELoss, VAELossConfig, perceptual_weights_path, vgg_trunk
from .metrics import high_freq_ratio, psnr, ssim
from .runtime import cpu_name
from .tinysd import WEIGHTS_DIR, data, load_vae, shapes
from .tinysd.fixed_norm import TAIL_PREFIXES

LAB_DIR = WEIGHTS_DIR / "vae-lab"
CROP = 64                 # training crop size
EVAL_SEED = 10_002        # held-out scenes (training scenes use seeds below 10_000)
LATENT_CHANNELS = 4


@dataclass(frozen=True)
class Variant:
    name: str
    title: str
    loss: dict = field(default_factory=dict)      # VAELossConfig overrides
    factor: int = 8
    kind: str = "kl"                              # "kl" (AutoencoderKL) or "vq" (VQModel)
    base: str = "scratch"                         # "scratch" (small lab model) or "shared" (below)

    def loss_config(self, disc_start: int) -> VAELossConfig:
        return VAELossConfig(**{"disc_start": disc_start, **self.loss})


_NO_GAN = dict(use_gan=False)
VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("l2", "L2", dict(l1_weight=0.0, l2_weight=1.0, perceptual_weight=0.0, **_NO_GAN), base="shared"),
    Variant("l1", "L1", dict(perceptual_weight=0.0, **_NO_GAN), base="shared"),
    Variant("l1_p", "L1 + P", dict(perceptual_weight=0.1, **_NO_GAN), base="shared"),
    Variant("full", "L1 + P + GAN (LDM)", dict(perceptual_weight=0.1), base="shared"),
    Variant("kl1e-6", "LDM, KL 1e-6 (small)"),
    Variant("kl0", "LDM, KL 0", dict(kl_weight=0.0)),
    Variant("kl1e-2", "LDM, KL 1e-2", dict(kl_weight=1e-2)),
    # the same number with the reduction many re-implementations use: 3*H*W times stronger
    Variant("kl1e-2_sum", "LDM, KL 1e-2 summed", dict(kl_weight=1e-2, kl_reduction="sum")),
    Variant("vq", "LDM, VQ 512 codes", dict(kl_weight=0.0), kind="vq"),
    Variant("f4", "LDM, f=4", factor=4),
    Variant("f16", "LDM, f=16", factor=16),
]}
CODEBOOK_SIZE = 512
LOSS_VARIANTS = ("l2", "l1", "l1_p", "full")
SHIPPED_RUNS = {"shared": (1500, 4), "scratch": (1000, 16)}     # steps, batch of the shipped runs

# The "shared" variants all start from one good decoder, TinySD's with its GroupNorm tail
# (`tinysd.load_vae(groupnorm=True)`), with its encoder frozen, and
# fine-tune only its last two decoder stages with their own loss (as Stability fine-tuned the SD
# decoder into sd-vae-ft-EMA and ft-MSE): every variant starts equal, latents never move, and only
# the fine-tuned tensors ship.
TRAINED_PREFIXES = TAIL_PREFIXES        # up_blocks 2 and 3, conv_norm_out, conv_out
TAIL_FILE = "decoder_tail.safetensors"
SHARED_EMA_DECAY = 0.995          # the shipped shared variants are weight averages over ~200 steps


def _variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {name!r}")
    return VARIANTS[name]


def model_config(factor: int = 8, width: int = 16) -> dict:
    """diffusers config of a lab autoencoder with downsampling factor `factor` (4, 8 or 16)."""
    if factor not in (4, 8, 16):
        raise ValueError(f"factor must be 4, 8 or 16, got {factor}")
    levels = int(np.log2(factor)) + 1          # each level after the first halves the resolution
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels,
                block_out_channels=(width,) + (2 * width,) * (levels - 1), layers_per_block=1,
                latent_channels=LATENT_CHANNELS, norm_num_groups=16, sample_size=shapes.IMAGE_SIZE,
                mid_block_add_attention=False)


def shared_model():
    """The shared starting autoencoder in float32: TinySD's VAE with its GroupNorm decoder tail,
    frozen except the decoder's last two stages."""
    model = load_vae(groupnorm=True)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(TRAINED_PREFIXES))
    return model


def trained_state(model) -> dict[str, torch.Tensor]:
    """The tensors a shared variant trains (and ships)."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(TRAINED_PREFIXES)}


def decode_shared(model, z: torch.Tensor) -> torch.Tensor:
    """`model.decode(z).sample` for a shared variant, with the frozen stages run without autograd.

    The same numbers as diffusers' decode (a test checks it). It is also a workaround: torch 2.13's
    CPU GroupNorm backward crashes (segfault) when its weight needs a gradient and its input does
    not, which is exactly the first trained stage's position; here its input requires grad.
    """
    first = 2                                      # decoder.up_blocks.2: the first trained stage
    with torch.no_grad():
        h = decoder_features(model, z, first)
    return decoder_rest(model, h.requires_grad_(torch.is_grad_enabled()), first)


def new_model(variant: str | Variant, seed: int = 0):
    """A lab autoencoder before training: freshly initialised (AutoencoderKL, or VQModel for kind
    "vq"), or for base "shared" the shared starting decoder with its trainable stages."""
    from diffusers import AutoencoderKL, VQModel  # noqa: PLC0415

    v = variant if isinstance(variant, Variant) else _variant(variant)
    if v.base == "shared":
        return shared_model()
    torch.manual_seed(seed)
    cfg = model_config(v.factor)
    if v.kind == "vq":
        return VQModel(**cfg, num_vq_embeddings=CODEBOOK_SIZE, vq_embed_dim=LATENT_CHANNELS, scaling_factor=1.0)
    return AutoencoderKL(**cfg, scaling_factor=1.0)


# ----------------------------------------------------------------------------- data
class LabData:
    """A deterministic stream of 64x64 training crops: 3/4 shapes scenes, 1/4 photographs by default.

    photo_frac=1.0 (what the shared variants train on) renders no scenes at all."""

    def __init__(self, n_scenes: int = 2048, seed: int = 0, photo_frac: float = 0.25, crop: int = CROP):
        if not 0 <= photo_frac <= 1:
            raise ValueError(f"photo_frac must be in [0, 1], got {photo_frac}")
        self.images = (data.render_dataset(n_scenes, seed=seed, workers=1)[0] if photo_frac < 1
                       else None)
        self.photos = data.load_photos("train")
        self.photo_frac, self.crop = photo_frac, crop

    def batch(self, n: int, gen: torch.Generator) -> torch.Tensor:
        n_photo = int(round(n * self.photo_frac))
        if n_photo == n:
            return data.random_photo_crops(self.photos, n, gen, size=self.crop)
        idx = torch.randint(len(self.images), (n - n_photo,), generator=gen)
        full = data.to_float(self.images[idx])
        c, S = self.crop, full.shape[-1]
        ys = torch.randint(0, S - c + 1, (len(idx),), generator=gen)
        xs = torch.randint(0, S - c + 1, (len(idx),), generator=gen)
        crops = [im[:, y:y + c, x:x + c] for im, y, x in zip(full, ys.tolist(), xs.tolist())]
        out = torch.stack(crops)
        if n_photo:
            out = torch.cat([out, data.random_photo_crops(self.photos, n_photo, gen, size=c)])
        return out


def shared_data(seed: int = 0) -> LabData:
    """What the shared variants train on: whole-size (128x128) crops of the training photographs.

    Whole size, not 64x64: the shared decoder was trained at 128x128, and its frozen GroupNorms
    normalise over the whole image, so stages fine-tuned on small crops learn small-crop statistics
    (measured: 64x64 fine-tuning lowered the held-out photos' PSNR)."""
    return LabData(seed=seed, photo_frac=1.0, crop=shapes.IMAGE_SIZE)


def seen_images(n: int = 8, seed: int = 0) -> torch.Tensor:
    """n 128x128 crops of the training photographs: what the loss family was fine-tuned on."""
    return shared_data(seed).batch(n, torch.Generator().manual_seed(seed))


def eval_images(n_shapes: int = 8) -> dict[str, torch.Tensor]:
    """Held-out 128x128 evaluation images: shapes scenes never trained on, and the held-out photographs."""
    scenes = shapes.sample_scenes(n_shapes, seed=EVAL_SEED)
    return {"shapes": shapes.render(scenes).clamp(-1, 1), "photos": data.heldout_photo_crops()}


# ----------------------------------------------------------------------------- model use
def encode(model, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
    """Latents of x: the posterior mean (or a sample) for KL models, the pre-quantisation vectors for VQ."""
    if hasattr(model, "quantize"):
        return model.encode(x).latents
    post = model.encode(x).latent_dist
    return post.sample(generator=generator) if sample else post.mode()


def decode(model, z: torch.Tensor) -> torch.Tensor:
    return model.decode(z).sample


@torch.no_grad()
def reconstruct(model, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Round trip with the posterior mean (KL) or the nearest codes (VQ), clamped to [-1, 1]."""
    model.eval()
    return torch.cat([decode(model, encode(model, x[i:i + batch])).clamp(-1, 1) for i in range(0, len(x), batch)])


@torch.no_grad()
def codebook_stats(model, x: torch.Tensor) -> dict:
    """How a VQ model uses its codebook on images x: fraction of codes used and perplexity.

    perplexity = exp(entropy of the code histogram): the number of equally likely codes that would
    give the same entropy. With K codes it lies between 1 (collapse onto one code) and K (uniform use).
    """
    if not hasattr(model, "quantize"):
        raise ValueError("model must be a VQModel (a variant of kind 'vq')")
    model.eval()
    idx = model.quantize(model.encode(x).latents)[2][2].flatten()
    K = model.quantize.n_e
    counts = torch.bincount(idx, minlength=K).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codes": K, "used": int((counts > 0).sum()), "usage": float((counts > 0).float().mean()),
            "perplexity": float(entropy.exp()), "counts": counts.long()}


@torch.no_grad()
def image_scores(rec: torch.Tensor, images: torch.Tensor, perceptual: Perceptual | None = None,
                 cutoff: float = 0.25) -> dict:
    """PSNR, SSIM, perceptual distance and high-frequency power ratio of reconstructions `rec` (means)."""
    perceptual = perceptual or Perceptual()
    return {"psnr": float(psnr(rec, images).mean()), "ssim": float(ssim(rec, images).mean()),
            "perceptual": float(perceptual(images, rec).mean()),
            "hf_ratio": high_freq_ratio(rec, images, cutoff=cutoff)}


def measure(model, images: torch.Tensor, perceptual: Perceptual | None = None, cutoff: float = 0.25) -> dict:
    """`image_scores` of the model's round trip of `images`."""
    return image_scores(reconstruct(model, images), images, perceptual, cutoff)


# ----------------------------------------------------------------------------- training
def train_variant(variant: str | Variant, steps: int, batch: int = 16, lr: float | None = None, seed: int = 0,
                  lab_data: LabData | None = None, disc_start_frac: float = 0.5, ckpt: Path | None = None,
                  ckpt_every: int = 100, log_every: int = 10, progress: bool = True, device: str = "cpu",
                  ema_decay: float | None = None, lr_schedule: str | None = None):
    """Train one variant; returns (model, history). Resumes from `ckpt` (a file) when it exists.

    A checkpoint of a finished run can be extended by asking for more steps; the discriminator's
    warm-up stays where the run first put it (`disc_start_frac` of its first step budget).
    device: "cpu" (default, what the shipped runs used) or "cuda"; data are made on the CPU either way.
    Shared variants train on photograph crops only, with the photo-trained perceptual trunk (seed 0),
    lr 1e-4 by default (5e-4 for the small models trained from scratch).
    ema_decay: returns an exponential moving average of the trained weights (diffusers' EMAModel)
    instead of the last step's; default SHARED_EMA_DECAY for shared variants, none (0) otherwise.
    Batches of four make single steps noisy, and Stability's fine-tuned decoders ship EMA weights too.
    lr_schedule: "cosine" (diffusers' get_scheduler: from lr down to 0 at `steps`) or "constant";
    default cosine for shared variants, constant otherwise.

    history: lists keyed by "step", "rec", "kl", "g", "adaptive_weight", "d", "commit", "usage",
    logged every `log_every` steps, plus "seconds" (training-loop time) and "disc_start".
    """
    v = variant if isinstance(variant, Variant) else _variant(variant)
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' needs a CUDA GPU; none is visible (use device='cpu')")
    shared = v.base == "shared"
    lr = lr if lr is not None else (1e-4 if shared else 5e-4)
    ema_decay = ema_decay if ema_decay is not None else (SHARED_EMA_DECAY if shared else 0.0)
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1) (0: no averaging), got {ema_decay}")
    lr_schedule = lr_schedule or ("cosine" if shared else "constant")
    if lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
    model = new_model(v, seed=seed).to(device)
    trained = [p for p in model.parameters() if p.requires_grad]
    ema = EMAModel(trained, decay=ema_decay) if ema_decay else None
    disc_start = int(steps * disc_start_frac)
    cfg = v.loss_config(disc_start)
    teacher = Perceptual("photo-trained", seed=0) if shared and cfg.perceptual_weight else None
    torch.manual_seed(seed)                         # the discriminator's initialisation
    lossf = VAELoss(cfg, perceptual=teacher).to(device)
    opt = torch.optim.Adam(trained, lr=lr, betas=(0.5, 0.9))
    sched = get_scheduler(lr_schedule, opt, num_warmup_steps=0, num_training_steps=steps)
    opt_d = torch.optim.Adam(lossf.discriminator.parameters(), lr=lr, betas=(0.5, 0.9)) if lossf.cfg.use_gan else None
    gen = torch.Generator().manual_seed(seed + 1)
    sample_gen = torch.Generator().manual_seed(seed + 2)
    hist: dict = {k: [] for k in ("step", "rec", "kl", "g", "adaptive_weight", "d", "commit", "usage")}
    hist.update(seconds=0.0, disc_start=disc_start, steps=steps, batch=batch, lr=lr, ema_decay=ema_decay,
                lr_schedule=lr_schedule)
    step = 0
    if ckpt is not None and Path(ckpt).exists():
        st = torch.load(ckpt, weights_only=False, map_location="cpu")
        model.load_state_dict(st["model"]); opt.load_state_dict(st["opt"]); lossf.load_state_dict(st["loss"])
        if opt_d:
            opt_d.load_state_dict(st["opt_d"])
        if ema is not None:
            ema.load_state_dict(st["ema"])
        if st.get("sched"):
            sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"]); sample_gen.set_state(st["sample_gen"]); hist = st["hist"]; step = st["step"]
        # resuming (or extending a finished run to more steps) keeps the warm-up the run started with
        lossf.cfg.disc_start = disc_start = hist["disc_start"]
        hist["steps"] = steps
    if lab_data is None:
        lab_data = shared_data(seed) if shared else LabData(seed=seed)
    last_layer = model.decoder.conv_out.weight
    model.train()
    t0 = time.time()
    bar = tqdm(total=steps, initial=step, desc=v.name, disable=not progress, mininterval=5)
    while step < steps:
        x = lab_data.batch(batch, gen).to(device)
        if v.kind == "vq":
            h = model.encode(x).latents
            z_q, commit, (_, _, idx) = model.quantize(h)              # idx: for the usage log
            x_hat = model.decode(z_q, force_not_quantize=True).sample    # z_q is quantised already
            kl = torch.zeros(len(x), device=device)
        else:
            if shared:                      # a frozen encoder: no graph, and the KL is a constant
                with torch.no_grad():
                    post = model.encode(x).latent_dist
                x_hat = decode_shared(model, post.sample(generator=sample_gen))
            else:
                post = model.encode(x).latent_dist
                x_hat = model.decode(post.sample(generator=sample_gen)).sample
            kl = post.kl()
        loss, logs = lossf.generator_loss(x, x_hat, kl, step, last_layer)
        if v.kind == "vq":
            loss = loss + commit
            logs["commit"] = commit.item()
            logs["usage"] = idx.unique().numel() / CODEBOOK_SIZE
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema.step(trained)
        if opt_d is not None:
            d_loss = lossf.discriminator_loss(x, x_hat, step)
            if d_loss is not None:
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                logs["d"] = d_loss.item()
        step += 1
        bar.update(1)
        if step % log_every == 0 or step == steps:
            hist["step"].append(step)
            for k in ("rec", "kl", "g", "adaptive_weight", "d", "commit", "usage"):
                hist[k].append(logs.get(k))
            bar.set_postfix(rec=f"{logs['rec']:.3g}", refresh=False)
        if ckpt is not None and (step % ckpt_every == 0 or step == steps):
            hist["seconds"] += time.time() - t0
            t0 = time.time()
            Path(ckpt).parent.mkdir(parents=True, exist_ok=True)
            torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), loss=lossf.state_dict(),
                            opt_d=opt_d.state_dict() if opt_d else None, gen=gen.get_state(),
                            ema=ema.state_dict() if ema is not None else None, sched=sched.state_dict(),
                            sample_gen=sample_gen.get_state(), hist=hist, step=step), str(ckpt) + ".tmp")
            Path(str(ckpt) + ".tmp").replace(ckpt)
    bar.close()
    if ckpt is None:
        hist["seconds"] += time.time() - t0
    if ema is not None:
        ema.copy_to(trained)
    model.to("cpu").eval()
    return model, hist


# ----------------------------------------------------------------------------- perceptual trunk
PERCEPTUAL_WIDTH = 24


def _perceptual_batch(photos: list[torch.Tensor], n: int, gen: torch.Generator, crop: int):
    """n augmented crops and the index of the photograph each came from."""
    labels = torch.randint(len(photos), (n,), generator=gen)
    x = torch.cat([data.random_photo_crops([photos[i]], 1, gen, size=crop) for i in labels.tolist()])
    # brightness, contrast and (for 30% of crops) grey: the photo must be told by its structure
    gain = 1 + 0.25 * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
    shift = 0.15 * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
    grey = torch.rand(n, 1, 1, 1, generator=gen) < 0.3
    x = torch.where(grey, x.mean(1, keepdim=True).expand_as(x), x)
    return (x * gain + shift).clamp(-1, 1), labels


PERCEPTUAL_STEPS = 3000          # the shipped trunks' run


def train_perceptual(seed: int = 0, steps: int = PERCEPTUAL_STEPS, batch: int = 64, crop: int = 32,
                     width: int = PERCEPTUAL_WIDTH, lr: float = 1e-3, progress: bool = True):
    """Train the VGG-style trunk of `Perceptual(kind="photo-trained")`; returns (trunk, history).

    The pretext task: name which of the training photographs a small random crop comes from
    (random scale, flip, brightness, contrast, greyscale), a classifier on the trunk's pooled last
    stage. Telling brick from gravel or grass from coins needs texture and edge features, which is
    what a perceptual distance should compare. The held-out photographs are never seen.
    """
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    photos = data.load_photos("train")
    torch.manual_seed(seed)
    trunk = vgg_trunk(width)
    head = torch.nn.Linear(4 * width, len(photos))
    opt = torch.optim.Adam([*trunk.parameters(), *head.parameters()], lr=lr)
    gen = torch.Generator().manual_seed(seed + 100)
    val_x, val_y = _perceptual_batch(photos, 512, torch.Generator().manual_seed(12_345), crop)

    def logits(x):
        for stage in trunk:
            x = stage(x)
        return head(x.mean((2, 3)))

    hist: dict = {"step": [], "loss": [], "val_acc": [], "seed": seed, "width": width, "crop": crop,
                  "batch": batch, "steps": steps, "lr": lr, "classes": len(photos)}
    t0 = time.time()
    for step in tqdm(range(1, steps + 1), desc=f"perceptual seed {seed}", disable=not progress,
                     mininterval=5):
        x, y = _perceptual_batch(photos, batch, gen, crop)
        loss = F.cross_entropy(logits(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            with torch.no_grad():
                acc = float((logits(val_x).argmax(1) == val_y).float().mean())
            hist["step"].append(step); hist["loss"].append(loss.item()); hist["val_acc"].append(acc)
    hist["seconds"] = time.time() - t0
    hist["machine"] = f"{cpu_name()}, {torch.get_num_threads()} CPU thread(s)"
    return trunk.eval().requires_grad_(False), hist


def _save_fp16(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(path))


def save_perceptual(trunk, hist: dict, seed: int) -> Path:
    """Ship a trained trunk (fp16 safetensors) and its training log beside it."""
    path = perceptual_weights_path(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_fp16(trunk.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps(hist, indent=1))
    return path


def load_perceptual_history(seed: int) -> dict:
    """The training log of a shipped photo-trained trunk (held-out crop accuracy, seconds, machine)."""
    path = perceptual_weights_path(seed).with_suffix(".json")
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: train it with `python -m ldm_tutorial.vae_lab "
                                f"--perceptual {seed}`")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- shipped checkpoints
def load_variant(name: str, lab_dir: Path | None = None):
    """A shipped lab checkpoint (diffusers folder) in float32, ready to evaluate."""
    from diffusers import AutoencoderKL, VQModel  # noqa: PLC0415

    v = _variant(name)
    folder = Path(lab_dir or LAB_DIR) / name
    if v.base == "shared":
        return _load_shared(name, folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no shipped checkpoint for variant {name!r} in {folder}; "
                                f"train it with `python -m ldm_tutorial.vae_lab --variants {name}`")
    cls = VQModel if v.kind == "vq" else AutoencoderKL
    return cls.from_pretrained(folder, torch_dtype=torch.float32).eval()


def _load_shared(name: str, folder: Path):
    from safetensors.torch import load_file  # noqa: PLC0415

    path = folder / TAIL_FILE
    if not path.exists():
        raise FileNotFoundError(f"no shipped decoder stages for variant {name!r} in {folder}; "
                                f"train it with `python -m ldm_tutorial.vae_lab --variants {name}`")
    model = shared_model()
    tail = load_file(str(path))
    expected = set(trained_state(model))
    if set(tail) != expected:
        raise ValueError(f"{path} must hold exactly the tensors of {TRAINED_PREFIXES}; "
                         f"missing {sorted(expected - set(tail))[:3]}, extra {sorted(set(tail) - expected)[:3]}")
    model.load_state_dict({k: v.float() for k, v in tail.items()}, strict=False)
    return model.requires_grad_(False).eval()


def save_variant(model, name: str, folder: Path) -> None:
    """Ship a trained variant in float16: a diffusers folder, or only the trained tensors (shared)."""
    folder.mkdir(parents=True, exist_ok=True)
    if _variant(name).base == "shared":
        _save_fp16(trained_state(model), folder / TAIL_FILE)
    else:
        model.to(torch.float16).save_pretrained(folder)


def export_discriminator(ckpt: Path, folder: Path) -> Path:
    """Save the PatchGAN of a training checkpoint beside its autoencoder (fp16 safetensors)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    loss_state = torch.load(ckpt, weights_only=False)["loss"]
    disc = {k.removeprefix("discriminator."): v.to(torch.float16).contiguous()
            for k, v in loss_state.items() if k.startswith("discriminator.")}
    if not disc:
        raise ValueError(f"{ckpt} has no discriminator: its variant trains without the GAN term")
    path = Path(folder) / "discriminator.safetensors"
    save_file(disc, str(path))
    return path


def load_discriminator(name: str = "kl1e-6", lab_dir: Path | None = None):
    """The trained PatchGAN shipped with a GAN variant (only "kl1e-6" ships one), in float32, eval mode."""
    from safetensors.torch import load_file  # noqa: PLC0415

    path = Path(lab_dir or LAB_DIR) / _variant(name).name / "discriminator.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no discriminator shipped for variant {name!r} ({path})")
    disc = PatchDiscriminator()
    disc.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return disc.eval().requires_grad_(False)


def load_history(name: str, lab_dir: Path | None = None) -> dict:
    """The training log of a shipped variant: loss curves, seconds, machine."""
    _variant(name)
    path = Path(lab_dir or LAB_DIR) / name / "history.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: train it with `python -m ldm_tutorial.vae_lab --variants {name}`")
    return json.loads(path.read_text())


def report(lab_dir: Path | None = None, cutoff: float = 0.25) -> str:
    """Markdown table of every shipped variant: held-out metrics and how it was trained."""
    evals = eval_images()
    judge = Perceptual("photo-trained", seed=1)   # no variant was trained against this trunk
    lines = ["| variant | photos PSNR | photos SSIM | photos perc. | photos HF ratio | shapes PSNR | shapes SSIM "
             "| shapes perc. | shapes HF ratio | parameters | steps x batch | train seconds | machine |",
             "|" + "---|" * 13]

    def row(title: str, model, rest: list[str]) -> str:
        m = {k: measure(model, x, perceptual=judge, cutoff=cutoff) for k, x in evals.items()}
        cells = [f"{m[k]['psnr']:.2f}" if q == "psnr" else f"{m[k][q]:.3f}"
                 for k in ("photos", "shapes") for q in ("psnr", "ssim", "perceptual", "hf_ratio")]
        return "| " + " | ".join([title, *cells, *rest]) + " |"

    start = shared_model()                         # the loss family's common starting point
    lines.append(row("start: TinySD's decoder, not fine-tuned", start,
                     [f"{count_parameters(start) / 1e6:.2f}M", "-", "-", "-"]))
    for name, v in VARIANTS.items():
        model, hist = load_variant(name, lab_dir), load_history(name, lab_dir)
        extra = ""
        if v.kind == "vq":
            cb = codebook_stats(model, torch.cat(list(evals.values())))
            extra = f" ({cb['used']}/{cb['codes']} codes used, perplexity {cb['perplexity']:.1f})"
        size = f"{count_parameters(model) / 1e6:.2f}M"
        if v.base == "shared":
            size += f" ({sum(t.numel() for t in trained_state(model).values()) / 1e6:.2f}M trained)"
        lines.append(row(f"{v.title}{extra}", model, [size, f"{hist['steps']} x {hist['batch']}",
                                                       f"{hist['seconds']:.0f}", hist.get("machine", "?")]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="all", help="comma-separated names, or 'all': " + ", ".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=None,
                    help=f"default {SHIPPED_RUNS['shared'][0]} for shared variants, {SHIPPED_RUNS['scratch'][0]} otherwise")
    ap.add_argument("--batch", type=int, default=None,
                    help=f"default {SHIPPED_RUNS['shared'][1]} for shared variants, {SHIPPED_RUNS['scratch'][1]} otherwise")
    ap.add_argument("--lr", type=float, default=None, help="default 1e-4 for shared variants, 5e-4 otherwise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--ckpt-dir", type=Path, default=Path("/tmp/vae-lab"))
    ap.add_argument("--out", type=Path, default=LAB_DIR)
    ap.add_argument("--report", type=Path, default=None, help="measure the checkpoints in --out, write a markdown table")
    ap.add_argument("--perceptual", type=int, default=None, metavar="SEED",
                    help="train and ship the photo-trained perceptual trunk of this seed instead")
    ap.add_argument("--perceptual-steps", type=int, default=PERCEPTUAL_STEPS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.perceptual is not None:
        trunk, hist = train_perceptual(seed=args.perceptual, steps=args.perceptual_steps)
        path = save_perceptual(trunk, hist, args.perceptual)
        print(f"[perceptual seed {args.perceptual}] held-out crop accuracy {hist['val_acc'][-1]:.3f}, "
              f"{hist['seconds']:.0f} s -> {path}", flush=True)
        return
    if args.report:
        args.report.write_text(report(args.out))
        print(args.report.read_text())
        return
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    for n in names:
        _variant(n)
    streams: dict[str, LabData] = {}           # one data stream per base, made when first needed
    args.out.mkdir(parents=True, exist_ok=True)
    for n in names:
        base = VARIANTS[n].base
        if base not in streams:
            streams[base] = shared_data(args.seed) if base == "shared" else LabData(seed=args.seed)
        steps, batch = (args.steps or SHIPPED_RUNS[base][0]), (args.batch or SHIPPED_RUNS[base][1])
        model, hist = train_variant(n, steps, batch=batch, lr=args.lr, seed=args.seed,
                                    lab_data=streams[base],
                                    ckpt=args.ckpt_dir / f"{n}.pt", device=args.device)
        save_variant(model, n, args.out / n)
        hist.update(machine=(torch.cuda.get_device_name() if args.device == "cuda"
                             else f"{cpu_name()}, {torch.get_num_threads()} CPU thread(s)"),
                    variant=asdict(VARIANTS[n]))
        (args.out / n / "history.json").write_text(json.dumps(hist, indent=1))
        if n == "kl1e-6":                    # the chapter computes the adaptive weight with the real D
            export_discriminator(args.ckpt_dir / f"{n}.pt", args.out / n)
        print(f"[{n}] {hist['steps']} steps in {hist['seconds']:.0f} s -> {args.out / n}", flush=True)


if __name__ == "__main__":
    main()
