"""Noise schedules as signal-to-noise ratios: DDPM (SD 1.x-SDXL) and rectified flow (SD3, FLUX) (chapter 5).

A noisy sample is x_t = a_t * x_0 + b_t * noise. Its signal-to-noise ratio is SNR = a_t^2 / b_t^2.
- DDPM / variance preserving (SD 1.x, 2.x, SDXL): a_t = sqrt(alpha_bar_t), b_t = sqrt(1 - alpha_bar_t).
- Rectified flow (SD3, FLUX.1): a = 1 - sigma, b = sigma, a straight line from data (sigma=0) to noise (sigma=1).
"""
from __future__ import annotations

import torch


def ddpm_log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """log SNR = log(alpha_bar / (1 - alpha_bar)) of a DDPM schedule, one value per training timestep.

    Args:
        alphas_cumprod: (T,) e.g. `DDPMScheduler(...).alphas_cumprod`, timestep 0 first.
    Returns:
        (T,) float64, decreasing with t for any valid schedule.
    """
    a = alphas_cumprod.double()
    return torch.log(a) - torch.log1p(-a)


def flow_log_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """log SNR = 2 log((1 - sigma) / sigma) of the rectified-flow path x = (1 - sigma) x_0 + sigma noise.

    Args:
        sigmas: values in (0, 1]; sigma = 1 (pure noise) gives -inf.
    Returns:
        float64 tensor of the same shape.
    """
    s = sigmas.double()
    if (s <= 0).any() or (s > 1).any():
        raise ValueError(f"sigmas must be in (0, 1], got [{float(s.min()):.3g}, {float(s.max()):.3g}]")
    return 2 * (torch.log1p(-s) - torch.log(s))


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma) (SD3 paper, arXiv:2403.03206: resolution-dependent shifting).

    shift > 1 spends more of the schedule at high noise, which higher resolutions need.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def vp_path(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Points sqrt(a) x0 + sqrt(1 - a) noise for each a in `alphas_cumprod`: (T, *x0.shape)."""
    a = alphas_cumprod.to(x0.dtype).view(-1, *[1] * x0.ndim)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def flow_path(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Points (1 - sigma) x0 + sigma noise for each sigma: (T, *x0.shape)."""
    s = sigmas.to(x0.dtype).view(-1, *[1] * x0.ndim)
    return (1 - s) * x0 + s * noise


def path_straightness(points: torch.Tensor) -> float:
    """Length of the polyline through `points` (T, ...) divided by the distance between its ends (1 = straight)."""
    flat = points.reshape(points.shape[0], -1).double()
    length = (flat[1:] - flat[:-1]).norm(dim=1).sum()
    return float(length / (flat[-1] - flat[0]).norm())
