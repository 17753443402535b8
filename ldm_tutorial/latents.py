"""Latent health: is a VAE, its scaling factor and its input images set up the way SD expects?

Introduced in the scaling-factor chapter (book/02_scaling_factor). One call encodes a batch of
images, measures what the U-Net would see, and names each way the set-up departs from SD's
convention: images in [-1, 1], scaled latents near unit variance, a round trip that works, no
NaN or inf anywhere.

    report = ldm.check_latent_health(pipe.vae, images)
    assert report.ok, report.problems
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .metrics import psnr

SCALED_STD_RANGE = (2 / 3, 1.5)    # scaled latents outside this std: the factor is wrong
MIN_ROUND_TRIP_PSNR = 20.0         # dB on [-1, 1] images; a trained SD-style VAE scores 25 or more
PIXEL_TOLERANCE = 1e-3             # slack on the [-1, 1] bounds (resampling, float error)


@dataclass
class LatentHealth:
    """What `check_latent_health` measured. Statistics are over every latent element (and per
    latent channel); scaled = (raw - shift_factor) * scaling_factor, diffusers' convention."""

    ok: bool
    problems: list[str]
    n_images: int
    scaling_factor: float
    shift_factor: float | None
    pixel_min: float
    pixel_max: float
    raw_mean: float | None = None
    raw_std: float | None = None
    scaled_mean: float | None = None
    scaled_std: float | None = None
    raw_channel_mean: list[float] = field(default_factory=list)
    raw_channel_std: list[float] = field(default_factory=list)
    scaled_channel_mean: list[float] = field(default_factory=list)
    scaled_channel_std: list[float] = field(default_factory=list)
    round_trip_psnr: float | None = None

    @property
    def suggested_scaling_factor(self) -> float | None:
        """1 / std of the raw latents (a shift does not change the std): what LDM's scale_by_std
        would set from this batch."""
        if self.raw_std is None or not self.raw_std > 0:
            return None
        return 1.0 / self.raw_std

    def __repr__(self) -> str:
        def num(v, fmt=".3f"):
            return "n/a" if v is None else format(v, fmt)

        shift = "" if self.shift_factor is None else f", shift_factor {self.shift_factor:g}"
        lines = [f"LatentHealth: {'ok' if self.ok else 'PROBLEMS'} ({self.n_images} images, "
                 f"scaling_factor {self.scaling_factor:g}{shift})",
                 f"  pixels      min {self.pixel_min:.3f}  max {self.pixel_max:.3f}  (expected -1 .. 1)",
                 f"  raw         mean {num(self.raw_mean)}  std {num(self.raw_std)}",
                 f"  scaled      mean {num(self.scaled_mean)}  std {num(self.scaled_std)}  (expected ~0, ~1)"]
        if self.scaled_channel_std:
            per = "  ".join(f"{m:+.2f}/{s:.2f}" for m, s in zip(self.scaled_channel_mean,
                                                                  self.scaled_channel_std))
            lines.append(f"  per channel (scaled mean/std) {per}")
        lines.append(f"  round trip  PSNR {num(self.round_trip_psnr, '.1f')} dB "
                     f"(expected >= {MIN_ROUND_TRIP_PSNR:g})")
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


def _check_arguments(vae, images, scaling_factor) -> None:
    config = getattr(vae, "config", None)
    if config is None or not hasattr(vae, "encode") or not hasattr(vae, "decode"):
        raise ValueError(f"vae must be an autoencoder with .config, .encode and .decode "
                         f"(diffusers' AutoencoderKL), got {type(vae).__name__}")
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must have 4 dimensions (B, C, H, W), got shape {tuple(images.shape)}")
    if len(images) == 0:
        raise ValueError("images must hold at least one image, got a batch of 0")
    expected = config.in_channels
    if images.shape[1] != expected:
        raise ValueError(f"images must have {expected} channels (vae.config.in_channels): the VAE does not "
                         f"match these images, got {images.shape[1]} channels in shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [-1, 1], got dtype {images.dtype} "
                         f"(uint8 images: images.float() / 127.5 - 1)")
    if scaling_factor is None and getattr(config, "scaling_factor", None) is None:
        raise ValueError("scaling_factor is None and vae.config has no scaling_factor: pass scaling_factor=")
    if scaling_factor is not None:
        if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, (int, float)) \
                or not 0 < float(scaling_factor) < float("inf"):
            raise ValueError(f"scaling_factor must be a positive finite number or None (read vae.config), "
                             f"got {scaling_factor!r}")


@torch.no_grad()
def check_latent_health(vae, images: torch.Tensor, scaling_factor: float | None = None,
                        batch_size: int = 32, generator: torch.Generator | None = None) -> LatentHealth:
    """Encode `images`, measure the latents the U-Net would see, and list what is wrong.

    Args:
        vae: an AutoencoderKL-like model (`.config.in_channels`, `.config.scaling_factor`, optional
            `.config.shift_factor`, `.encode(x).latent_dist`, `.decode(z).sample`).
        images: (B, C, H, W) float tensor, C = vae.config.in_channels, expected in [-1, 1].
        scaling_factor: the factor to check; None reads it from `vae.config` (what pipelines use).
        batch_size: images per encode call.
        generator: for the posterior samples (default: seeded with 0, so the report is deterministic).

    Returns:
        LatentHealth with `.ok`, `.problems` (readable strings) and the statistics: pixel range,
        raw and scaled mean/std overall and per channel, round-trip PSNR (posterior mode decoded),
        the shift factor when the config has one. Its repr prints a short report.

    Catches: a wrong factor (scaled std outside SCALED_STD_RANGE), images in [0, 1] or [0, 255],
    a round trip below MIN_ROUND_TRIP_PSNR dB (an untrained VAE, say), NaN or inf in the images,
    latents or decodes. A VAE with another channel count than the images raises ValueError.
    """
    _check_arguments(vae, images, scaling_factor)
    config = vae.config
    sf = float(config.scaling_factor if scaling_factor is None else scaling_factor)
    shift = getattr(config, "shift_factor", None)
    shift = None if shift is None else float(shift)
    problems: list[str] = []
    x = images.detach().float()
    finite = torch.isfinite(x)
    n_bad = int((~finite).sum())
    lo = float(x[finite].min()) if finite.any() else float("nan")
    hi = float(x[finite].max()) if finite.any() else float("nan")
    result = LatentHealth(ok=False, problems=problems, n_images=len(x), scaling_factor=sf,
                          shift_factor=shift, pixel_min=lo, pixel_max=hi)
    if n_bad:
        problems.append(f"images contain {n_bad} NaN or inf values: fix the input before encoding")
        return result
    if hi > 1 + PIXEL_TOLERANCE and lo >= -PIXEL_TOLERANCE:
        problems.append(f"images look like [0, 255] (min {lo:.3g}, max {hi:.3g}); the VAE expects [-1, 1]: "
                        f"use images / 127.5 - 1")
    elif lo >= -PIXEL_TOLERANCE and hi <= 1 + PIXEL_TOLERANCE:
        problems.append(f"images look like [0, 1] (min {lo:.3g}, max {hi:.3g}); the VAE expects [-1, 1]: "
                        f"use images * 2 - 1")
    elif lo < -1 - PIXEL_TOLERANCE or hi > 1 + PIXEL_TOLERANCE:
        problems.append(f"images leave [-1, 1] (min {lo:.3g}, max {hi:.3g}); the VAE expects [-1, 1]")

    param = next(vae.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    gen = generator if generator is not None else torch.Generator(device=device).manual_seed(0)
    raws, psnrs = [], []
    for i in range(0, len(x), batch_size):
        chunk = x[i:i + batch_size].to(device, dtype)
        post = vae.encode(chunk).latent_dist
        raws.append(post.sample(generator=gen).float().cpu())                # (b, c, h, w)
        rec = vae.decode(post.mode()).sample.float().cpu()
        psnrs.append(psnr(chunk.float().cpu().clamp(-1, 1), rec.clamp(-1, 1))
                     if torch.isfinite(rec).all() else torch.full((len(chunk),), float("nan")))
    raw = torch.cat(raws)
    if not torch.isfinite(raw).all():
        problems.append(f"latents contain {int((~torch.isfinite(raw)).sum())} NaN or inf values: the encoder "
                        f"overflowed (float16? run the VAE in float32, diffusers' force_upcast)")
        result.ok = False
        return result
    scaled = (raw - (shift or 0.0)) * sf

    def per(t):                                   # (c,) means and stds over B, h, w
        flat = t.transpose(0, 1).flatten(1)       # (c, B * h * w)
        return flat.mean(1).tolist(), flat.std(1).tolist()

    result.raw_mean, result.raw_std = float(raw.mean()), float(raw.std())
    result.scaled_mean, result.scaled_std = float(scaled.mean()), float(scaled.std())
    result.raw_channel_mean, result.raw_channel_std = per(raw)
    result.scaled_channel_mean, result.scaled_channel_std = per(scaled)
    all_psnr = torch.cat(psnrs)
    result.round_trip_psnr = float(all_psnr.mean())
    low, high = SCALED_STD_RANGE
    if not low <= result.scaled_std <= high:
        suggestion = result.suggested_scaling_factor
        problems.append(f"scaled latents have std {result.scaled_std:.3f} (expected {low:.2f} .. {high:.2f}): "
                        f"scaling_factor {sf:g} is wrong for this VAE; 1/std of these latents is "
                        f"{suggestion:.4g}")
    if not torch.isfinite(all_psnr).all():
        problems.append("decoded images contain NaN or inf: the decoder overflowed "
                        "(float16? run the VAE in float32, diffusers' force_upcast)")
    elif result.round_trip_psnr < MIN_ROUND_TRIP_PSNR:
        problems.append(f"round trip PSNR {result.round_trip_psnr:.1f} dB (expected >= {MIN_ROUND_TRIP_PSNR:g}): "
                        f"the VAE does not reconstruct these images (untrained, or not the VAE they "
                        f"belong to)")
    result.ok = not problems
    return result
