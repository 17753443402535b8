"""Initial latents that carry the signal leak the U-Net was trained with.

SD's scaled-linear schedule never destroys the image completely: at t = 999, sqrt(alpha_bar) of
the clean latent is still in x_t (Lin et al., arXiv:2305.08891). Training always saw that leak;
sampling from pure Gaussian noise does not. So the image-wide content the leak carries (the mean
colour and brightness, the coarse layout) starts at the data's average, and generated images
share one mid tone. Everaert et al. (WACV 2024, arXiv:2309.15842) put a leak back into the initial
latent, drawn from a simple model of the training latents, with no retraining:

    x_T = sqrt(1 - alpha_bar_T) * eps + sqrt(alpha_bar_T) * x0_tilde,   x0_tilde ~ q~(x0).

Here q~ is a Gaussian: the training latents' mean and their top principal components, plus
isotropic noise for the rest of the variance (`fit_signal_leak`). `signal_leak_latents` draws
x_T for a pipeline and a step count; pass it as `latents=` to `ldm.sample` or to the diffusers
pipeline. Both multiply it by the scheduler's init_noise_sigma: 1 for DDIM, PNDM and DPM-Solver,
sqrt(sigma_0^2 + 1) for Euler with leading spacing, so the formula holds exactly; Euler's
linspace and trailing spacings use sigma_0 instead, which is off by under 1 / (2 sigma_0^2)
(0.3% at SD's sigma_0 of 14.6).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checks

__all__ = ["SignalLeak", "fit_signal_leak", "signal_leak_latents", "first_alpha_bar"]


@dataclass(frozen=True)
class SignalLeak:
    """A Gaussian model of (scaled) training latents: mean + components @ (scales * z) + residual * z'.

    mean: (C, h, w); components: (C*h*w, k) orthonormal columns; scales: (k,) the std along each;
    residual: the std of every other direction; n: how many latents it was fitted on.
    """
    mean: torch.Tensor
    components: torch.Tensor
    scales: torch.Tensor
    residual: float
    n: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mean.shape)

    def sample(self, batch_size: int, generator=None) -> torch.Tensor:
        """(batch_size, C, h, w) draws of x0_tilde in float32 on the CPU; a list of generators
        draws image i from generator i (as the pipelines seed images one by one)."""
        batch_size = checks.positive_int(batch_size, "batch_size")
        generator = checks.generators(generator, batch_size)
        d, k = self.components.shape
        gens = generator if isinstance(generator, list) else [generator] * batch_size
        components, scales = self.components.float(), self.scales.float()
        out = []
        for g in gens:
            dev = g.device if g is not None else torch.device("cpu")
            z = torch.randn(k, generator=g, device=dev).cpu()
            rest = torch.randn(d, generator=g, device=dev).cpu()
            out.append(components @ (scales * z) + self.residual * rest)
        return self.mean.float() + torch.stack(out).view(batch_size, *self.shape)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file  # noqa: PLC0415

        save_file({"mean": self.mean.half().contiguous(), "components": self.components.half().contiguous(),
                   "scales": self.scales.float().contiguous()}, str(path),
                  metadata={"residual": repr(float(self.residual)), "n": str(int(self.n))})

    @classmethod
    def load(cls, path: str | Path) -> SignalLeak:
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k).float() for k in ("mean", "components", "scales")}
        return cls(t["mean"], t["components"], t["scales"], float(meta["residual"]), int(meta["n"]))


def fit_signal_leak(latents: torch.Tensor, rank: int = 64) -> SignalLeak:
    """Fit the Gaussian q~(x0) to scaled training latents (N, C, h, w): their mean, the `rank`
    principal directions of their covariance, and one std for the remaining variance."""
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        raise ValueError(f"latents must be a (N, C, h, w) tensor of scaled training latents, got "
                         f"{getattr(latents, 'shape', type(latents).__name__)}")
    n, d = len(latents), latents[0].numel()
    rank = checks.positive_int(rank, "rank")
    if n < 2 or rank >= min(n, d):
        raise ValueError(f"rank must be below both the number of latents ({n}) and their size ({d}), got {rank}")
    flat = latents.detach().flatten(1).double().cpu()
    if not torch.isfinite(flat).all():
        raise ValueError("latents must be finite (a NaN or inf would poison the fit)")
    mean = flat.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov(flat.T))
    evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
    residual = float(evals[rank:].mean().sqrt())
    return SignalLeak(mean.float().view(latents.shape[1:]), evecs[:, :rank].float().contiguous(),
                      evals[:rank].sqrt().float(), residual, n)


def first_alpha_bar(scheduler, num_inference_steps: int) -> float:
    """alpha_bar at the first noise level the scheduler visits for num_inference_steps steps.

    Sigma-parametrised schedulers (Euler, DPM-Solver) give it as 1 / (1 + sigma_0^2), the others
    (DDIM, PNDM, DDPM) as alphas_cumprod at the first timestep. The scheduler is not changed.
    """
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise ValueError(f"signal-leak latents need a scheduler with alphas_cumprod (DDIM, PNDM, Euler, "
                         f"DPM-Solver); {type(scheduler).__name__} has none (a flow-matching schedule "
                         f"ends at pure noise, so it has no leak to restore)")
    s = copy.deepcopy(scheduler)
    s.set_timesteps(checks.positive_int(num_inference_steps, "num_inference_steps"))
    sigmas = getattr(s, "sigmas", None)
    if sigmas is not None and len(sigmas):
        return float(1.0 / (1.0 + float(sigmas[0]) ** 2))
    return float(s.alphas_cumprod[int(round(float(s.timesteps[0])))])


def signal_leak_latents(pipe, batch_size: int, num_inference_steps: int = 25, generator=None,
                        leak: SignalLeak | None = None) -> torch.Tensor:
    """Initial latents with a signal leak, for `ldm.sample(pipe, ..., latents=this)` or `pipe(...)`.

    eps is drawn first, exactly as `ldm.sample` draws its noise from `generator` (so the same seed
    gives the same eps with and without the leak); x0_tilde is drawn next from the same generator.
    num_inference_steps must be the one the sampler will use: it fixes the first timestep, hence
    alpha_bar_T. leak: a `fit_signal_leak` model of this pipeline's latents (None: TinySD's,
    `ldm.tinysd.load_signal_leak()`). Returns (batch_size, C, h, w) on the U-Net's device and dtype.
    """
    batch_size = checks.positive_int(batch_size, "batch_size")
    generator = checks.generators(generator, batch_size)
    if leak is None:
        from .tinysd import load_signal_leak  # noqa: PLC0415

        leak = load_signal_leak()
    if not isinstance(leak, SignalLeak):
        raise ValueError(f"leak must be a SignalLeak (ldm.signal_leak.fit_signal_leak), got {type(leak).__name__}")
    cfg = pipe.unet.config
    want = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    if leak.shape != want:
        raise ValueError(f"leak models latents of shape {leak.shape}, but this pipeline's U-Net takes {want}: "
                         f"fit one on this pipeline's own latents (fit_signal_leak)")
    abar = first_alpha_bar(pipe.scheduler, num_inference_steps)
    from diffusers.utils.torch_utils import randn_tensor  # noqa: PLC0415

    first = generator[0] if isinstance(generator, list) else generator
    eps = randn_tensor((batch_size, *want), generator=generator, dtype=torch.float32,
                       device=torch.device("cpu") if first is None else first.device).cpu()
    x0 = leak.sample(batch_size, generator)
    x_t = (1 - abar) ** 0.5 * eps + abar ** 0.5 * x0
    return x_t.to(pipe.unet.device, pipe.unet.dtype)
