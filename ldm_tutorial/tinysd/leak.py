"""Fit TinySD's signal-leak model: `python -m ldm_tutorial.tinysd.leak [--out ROOT]`.

Renders LEAK_SCENES training scenes (seed LEAK_SEED, below evaluate.EVAL_SEED), encodes them with
the shipped VAE (posterior mode, times the scaling factor: the latents the U-Net was trained on)
and fits `ldm.signal_leak.fit_signal_leak` to them. Writes ROOT/tinysd-signal-leak/leak.safetensors
(default ROOT: the shipped weights/). About 3 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import SIGNAL_LEAK_FILE, WEIGHTS_DIR, load_vae, shapes

LEAK_SEED = 3          # training-distribution scenes (seeds below EVAL_SEED)
LEAK_SCENES = 4096
LEAK_RANK = 64


@torch.no_grad()
def training_latents(n: int = LEAK_SCENES, seed: int = LEAK_SEED, vae=None, batch: int = 256) -> torch.Tensor:
    """Scaled VAE latents (n, 4, 16, 16) of n rendered training scenes."""
    from .evaluate import EVAL_SEED  # noqa: PLC0415

    if seed >= EVAL_SEED:
        raise ValueError(f"seed must be below {EVAL_SEED} (training scenes), got {seed}")
    vae = vae if vae is not None else load_vae()
    scenes = shapes.sample_scenes(n, seed=seed)
    out = []
    for i in tqdm(range(0, n, batch), desc="encoding training scenes", mininterval=10):
        x = shapes.render(scenes[i:i + batch])
        out.append(vae.encode(x.to(vae.device)).latent_dist.mode().cpu())
    return torch.cat(out) * vae.config.scaling_factor


def fit(n: int = LEAK_SCENES, seed: int = LEAK_SEED, rank: int = LEAK_RANK, vae=None):
    from ldm_tutorial.signal_leak import fit_signal_leak  # noqa: PLC0415

    return fit_signal_leak(training_latents(n, seed, vae), rank=rank)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="weights root (default: the shipped one)")
    p.add_argument("--n", type=int, default=LEAK_SCENES)
    p.add_argument("--rank", type=int, default=LEAK_RANK)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    leak = fit(a.n, rank=a.rank)
    path = a.out / "tinysd-signal-leak" / SIGNAL_LEAK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    leak.save(path)
    kept = float((leak.scales ** 2).sum() / ((leak.scales ** 2).sum() + leak.residual ** 2 * (leak.mean.numel() - len(leak.scales))))
    print(f"wrote {path} ({path.stat().st_size:,} B): {leak.n} latents, rank {len(leak.scales)}, "
          f"{kept:.1%} of the variance in the components, residual std {leak.residual:.4f}")
    return path


if __name__ == "__main__":
    main()
