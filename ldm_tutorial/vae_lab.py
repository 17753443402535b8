"""The VAE-losses lab: small autoencoders trained side by side, one change at a time.

Every variant is a diffusers `AutoencoderKL` (or `VQModel` for the VQ variant) with the same encoder and
decoder, trained on the same data stream (TinySD's shapes world plus random crops of the training
photographs) with the same seed, optimiser and number of steps. Only the objective, the regulariser or the
downsampling factor changes:

| variant    | objective                                        | latent          |
|------------|--------------------------------------------------|-----------------|
| l2         | mean squared error                               | KL 1e-6, f=8    |
| l1         | mean absolute error                              | KL 1e-6, f=8    |
| l1_p       | L1 + perceptual                                  | KL 1e-6, f=8    |
| full       | L1 + perceptual + PatchGAN (the LDM recipe)      | KL 1e-6, f=8    |
| kl0        | the LDM recipe                                   | KL 0, f=8       |
| kl1e-2     | the LDM recipe                                   | KL 1e-2, f=8    |
| kl1e-2_sum | the LDM recipe, KL summed next to a mean L1      | KL 1e-2 x 3HW   |
| vq         | the LDM recipe, commitment loss instead of KL    | VQ, 512 codes   |
| f4 / f16   | the LDM recipe                                   | KL 1e-6, f=4/16 |

The perceptual term is `ldm_tutorial.losses.Perceptual`: LPIPS's formula on a frozen random VGG-style trunk,
an offline substitute for real LPIPS (whose ImageNet weights cannot be downloaded here). KL weights follow
LDM's convention (see `VAELossConfig.kl_reduction`).

Lab models are smaller than TinySD's VAE and have no attention in the middle block, so that they can be
trained on 64x64 crops on a CPU and then applied to whole 128x128 images (a convolution-only network does
not care about the image size). The shipped checkpoints come from

    python -m ldm_tutorial.vae_lab --steps 1000 --ckpt-dir /tmp/vae-lab

which resumes from its checkpoints if interrupted; a chapter can train the same variants for a few
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
from tqdm.auto import tqdm

from .losses import PatchDiscriminator, Perceptual, VAELoss, VAELossConfig
from .metrics import high_freq_ratio, psnr, ssim
from .runtime import cpu_name
from .tinysd import WEIGHTS_DIR, data, shapes

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

    def loss_config(self, disc_start: int) -> VAELossConfig:
        return VAELossConfig(**{"disc_start": disc_start, **self.loss})


_NO_GAN = dict(use_gan=False)
VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("l2", "L2", dict(l1_weight=0.0, l2_weight=1.0, perceptual_weight=0.0, **_NO_GAN)),
    Variant("l1", "L1", dict(perceptual_weight=0.0, **_NO_GAN)),
    Variant("l1_p", "L1 + P", dict(**_NO_GAN)),
    Variant("full", "L1 + P + GAN (LDM)"),
    Variant("kl0", "LDM, KL 0", dict(kl_weight=0.0)),
    Variant("kl1e-2", "LDM, KL 1e-2", dict(kl_weight=1e-2)),
    # the same number with the reduction many re-implementations use: 3*H*W times stronger
    Variant("kl1e-2_sum", "LDM, KL 1e-2 summed", dict(kl_weight=1e-2, kl_reduction="sum")),
    Variant("vq", "LDM, VQ 512 codes", dict(kl_weight=0.0), kind="vq"),
    Variant("f4", "LDM, f=4", factor=4),
    Variant("f16", "LDM, f=16", factor=16),
]}
CODEBOOK_SIZE = 512


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


def new_model(variant: str | Variant, seed: int = 0):
    """A freshly initialised lab autoencoder (AutoencoderKL, or VQModel for kind "vq")."""
    from diffusers import AutoencoderKL, VQModel  # noqa: PLC0415

    v = variant if isinstance(variant, Variant) else _variant(variant)
    torch.manual_seed(seed)
    cfg = model_config(v.factor)
    if v.kind == "vq":
        return VQModel(**cfg, num_vq_embeddings=CODEBOOK_SIZE, vq_embed_dim=LATENT_CHANNELS, scaling_factor=1.0)
    return AutoencoderKL(**cfg, scaling_factor=1.0)


# ----------------------------------------------------------------------------- data
class LabData:
    """A deterministic stream of 64x64 training crops: 3/4 shapes scenes, 1/4 photographs."""

    def __init__(self, n_scenes: int = 2048, seed: int = 0, photo_frac: float = 0.25, crop: int = CROP):
        self.images, _ = data.render_dataset(n_scenes, seed=seed, workers=1)
        self.photos = data.load_photos("train")
        self.photo_frac, self.crop = photo_frac, crop

    def batch(self, n: int, gen: torch.Generator) -> torch.Tensor:
        n_photo = int(round(n * self.photo_frac))
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
def train_variant(variant: str | Variant, steps: int, batch: int = 16, lr: float = 5e-4, seed: int = 0,
                  lab_data: LabData | None = None, disc_start_frac: float = 0.5, ckpt: Path | None = None,
                  ckpt_every: int = 100, log_every: int = 10, progress: bool = True, device: str = "cpu"):
    """Train one variant; returns (model, history). Resumes from `ckpt` (a file) when it exists.

    A checkpoint of a finished run can be extended by asking for more steps; the discriminator's
    warm-up stays where the run first put it (`disc_start_frac` of its first step budget).
    device: "cpu" (default, what the shipped runs used) or "cuda"; data are made on the CPU either way.

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
    model = new_model(v, seed=seed).to(device)
    disc_start = int(steps * disc_start_frac)
    lossf = VAELoss(v.loss_config(disc_start)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(lossf.discriminator.parameters(), lr=lr, betas=(0.5, 0.9)) if lossf.cfg.use_gan else None
    gen = torch.Generator().manual_seed(seed + 1)
    sample_gen = torch.Generator().manual_seed(seed + 2)
    hist: dict = {k: [] for k in ("step", "rec", "kl", "g", "adaptive_weight", "d", "commit", "usage")}
    hist.update(seconds=0.0, disc_start=disc_start, steps=steps, batch=batch, lr=lr)
    step = 0
    if ckpt is not None and Path(ckpt).exists():
        st = torch.load(ckpt, weights_only=False, map_location="cpu")
        model.load_state_dict(st["model"]); opt.load_state_dict(st["opt"]); lossf.load_state_dict(st["loss"])
        if opt_d:
            opt_d.load_state_dict(st["opt_d"])
        gen.set_state(st["gen"]); sample_gen.set_state(st["sample_gen"]); hist = st["hist"]; step = st["step"]
        # resuming (or extending a finished run to more steps) keeps the warm-up the run started with
        lossf.cfg.disc_start = disc_start = hist["disc_start"]
        hist["steps"] = steps
    lab_data = lab_data or LabData(seed=seed)
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
                            sample_gen=sample_gen.get_state(), hist=hist, step=step), str(ckpt) + ".tmp")
            Path(str(ckpt) + ".tmp").replace(ckpt)
    bar.close()
    if ckpt is None:
        hist["seconds"] += time.time() - t0
    model.to("cpu").eval()
    return model, hist


# ----------------------------------------------------------------------------- shipped checkpoints
def load_variant(name: str, lab_dir: Path | None = None):
    """A shipped lab checkpoint (diffusers folder) in float32, ready to evaluate."""
    from diffusers import AutoencoderKL, VQModel  # noqa: PLC0415

    v = _variant(name)
    folder = Path(lab_dir or LAB_DIR) / name
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no shipped checkpoint for variant {name!r} in {folder}; "
                                f"train it with `python -m ldm_tutorial.vae_lab --variants {name}`")
    cls = VQModel if v.kind == "vq" else AutoencoderKL
    return cls.from_pretrained(folder, torch_dtype=torch.float32).eval()


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


def load_discriminator(name: str = "full", lab_dir: Path | None = None):
    """The trained PatchGAN shipped with a GAN variant (only "full" ships one), in float32, eval mode."""
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
    judge = Perceptual(seed=1)          # not the trunk the variants were trained against
    lines = ["| variant | photos PSNR | photos SSIM | photos perc. | photos HF ratio | shapes PSNR | shapes SSIM "
             "| shapes perc. | shapes HF ratio | parameters | steps x batch | train seconds | machine |",
             "|" + "---|" * 13]
    for name, v in VARIANTS.items():
        model, hist = load_variant(name, lab_dir), load_history(name, lab_dir)
        m = {k: measure(model, x, perceptual=judge, cutoff=cutoff) for k, x in evals.items()}
        extra = ""
        if v.kind == "vq":
            cb = codebook_stats(model, torch.cat(list(evals.values())))
            extra = f" ({cb['used']}/{cb['codes']} codes used, perplexity {cb['perplexity']:.1f})"
        cells = [f"{v.title}{extra}"] + [f"{m[k]['psnr']:.2f}" if q == "psnr" else f"{m[k][q]:.3f}"
                                         for k in ("photos", "shapes") for q in ("psnr", "ssim", "perceptual", "hf_ratio")]
        cells += [f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", f"{hist['steps']} x {hist['batch']}",
                  f"{hist['seconds']:.0f}", hist.get("machine", "?")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="all", help="comma-separated names, or 'all': " + ", ".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--ckpt-dir", type=Path, default=Path("/tmp/vae-lab"))
    ap.add_argument("--out", type=Path, default=LAB_DIR)
    ap.add_argument("--report", type=Path, default=None, help="measure the checkpoints in --out, write a markdown table")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report:
        args.report.write_text(report(args.out))
        print(args.report.read_text())
        return
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    for n in names:
        _variant(n)
    lab_data = LabData(seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for n in names:
        model, hist = train_variant(n, args.steps, batch=args.batch, lr=args.lr, seed=args.seed, lab_data=lab_data,
                                    ckpt=args.ckpt_dir / f"{n}.pt", device=args.device)
        model.to(torch.float16).save_pretrained(args.out / n)
        hist.update(machine=(torch.cuda.get_device_name() if args.device == "cuda"
                             else f"{cpu_name()}, {torch.get_num_threads()} CPU thread(s)"),
                    variant=asdict(VARIANTS[n]))
        (args.out / n / "history.json").write_text(json.dumps(hist, indent=1))
        if n == "full":                      # the chapter computes the adaptive weight with the real D
            export_discriminator(args.ckpt_dir / f"{n}.pt", args.out / n)
        print(f"[{n}] {hist['steps']} steps in {hist['seconds']:.0f} s -> {args.out / n}", flush=True)


if __name__ == "__main__":
    main()
