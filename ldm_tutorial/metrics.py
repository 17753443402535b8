"""Image-quality figures used across the book: PSNR, SSIM and the radial power spectrum.

All functions take batches of images as (B, 3, H, W) tensors in [-1, 1], the range the VAE works in.

* `psnr`: 10 log10(peak^2 / MSE) with peak-to-peak 2. Rewards getting the average right, so a blurred
  reconstruction can score well.
* `ssim`: scikit-image's structural similarity (RGB, data range 2).
* `radial_power_spectrum`: the power of the 2-D Fourier transform of the luminance, averaged over rings
  of equal spatial frequency (cycles per pixel, 0 to 0.5). Natural images fall off roughly as 1/f^2.
* `high_freq_ratio`: the power a reconstruction has above a cut-off frequency divided by the power the
  original has there. 1 means the fine detail has the right energy; blur pushes it below 1; hallucinated
  texture or noise can push it above 1. This turns "L2 is blurry" into a number.
"""

from __future__ import annotations

import torch

_LUMA = torch.tensor([0.299, 0.587, 0.114])


def _check_images(x: torch.Tensor, param: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{param} must be a (B, 3, H, W) tensor, got {shape}")
    if x.numel() and (x.min() < -1.01 or x.max() > 1.01):
        raise ValueError(f"{param} must be in [-1, 1], got values in [{x.min():.3g}, {x.max():.3g}]")
    return x.float()


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _check_images(x, "x"), _check_images(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return x, y


def psnr(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2).

    mask: optional (B, 1, H, W) boolean, True where pixels count (e.g. outside an inpainting mask).
    """
    x, y = _check_pair(x, y)
    err = (x - y) ** 2
    if mask is None:
        mse = err.flatten(1).mean(1)
    else:
        b, _, h, w = x.shape
        if mask.shape != (b, 1, h, w) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape {(b, 1, h, w)}, got {mask.dtype} {tuple(mask.shape)}")
        m = mask.expand_as(err).to(err.dtype)
        mse = (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (scikit-image, RGB, data range 2) for images in [-1, 1]."""
    from skimage.metrics import structural_similarity  # noqa: PLC0415

    x, y = _check_pair(x, y)
    a = x.permute(0, 2, 3, 1).cpu().numpy()
    b = y.permute(0, 2, 3, 1).cpu().numpy()
    return torch.tensor([structural_similarity(p, q, channel_axis=-1, data_range=2.0) for p, q in zip(a, b)])


def radial_power_spectrum(x: torch.Tensor, n_bins: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(frequencies, power): luminance power spectrum averaged over rings and over the batch.

    The image mean is removed first (it only sets the DC term) and a Hann window suppresses the
    spurious high frequencies that the image border would otherwise add. Frequencies are in cycles per
    pixel, bin centres from 0 to 0.5.
    """
    x = _check_images(x, "x")
    _, _, H, W = x.shape
    luma = (x * _LUMA.to(x.device)[None, :, None, None]).sum(1)
    luma = luma - luma.mean((-2, -1), keepdim=True)
    window = torch.hann_window(H, periodic=False, device=x.device)[:, None] * torch.hann_window(W, periodic=False, device=x.device)[None, :]
    power = torch.fft.fftshift(torch.fft.fft2(luma * window), dim=(-2, -1)).abs() ** 2
    fy = torch.fft.fftshift(torch.fft.fftfreq(H, device=x.device))
    fx = torch.fft.fftshift(torch.fft.fftfreq(W, device=x.device))
    radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()
    n_bins = n_bins or min(H, W) // 2
    edges = torch.linspace(0, 0.5, n_bins + 1, device=x.device)
    idx = torch.bucketize(radius.flatten(), edges[1:-1])      # 0 .. n_bins-1; corners (r > 0.5) go to the last bin
    mean_power = power.mean(0).flatten()
    sums = torch.zeros(n_bins, device=x.device).index_add_(0, idx, mean_power)
    counts = torch.zeros(n_bins, device=x.device).index_add_(0, idx, torch.ones_like(mean_power))
    return (edges[:-1] + edges[1:]) / 2, sums / counts.clamp_min(1)


def high_freq_ratio(recon: torch.Tensor, original: torch.Tensor, cutoff: float = 0.25) -> float:
    """Power of `recon` above `cutoff` cycles/pixel divided by that of `original` (batch totals)."""
    recon, original = _check_pair(recon, original)
    if not 0 < cutoff < 0.5:
        raise ValueError(f"cutoff must be in (0, 0.5) cycles per pixel, got {cutoff}")
    f, p_rec = radial_power_spectrum(recon)
    _, p_org = radial_power_spectrum(original)
    band = f >= cutoff
    return float(p_rec[band].sum() / p_org[band].sum().clamp_min(1e-12))
