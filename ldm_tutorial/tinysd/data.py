"""Training and evaluation data for TinySD: rendered shapes scenes and photographs that ship offline.

Photographs come from scikit-image's bundled data module (files inside the installed package,
no download) and matplotlib's sample data. Random crops of the training photos teach the
autoencoder real texture; two whole photos (scikit-image's cat "chelsea" and matplotlib's
"grace_hopper") are held out for evaluation and never cropped for training.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from . import shapes

TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                "camera", "coins", "moon", "brick", "grass", "gravel", "clock", "cell", "colorwheel")
HELDOUT_PHOTOS = ("chelsea", "grace_hopper")


def _load_photo(name: str) -> np.ndarray:
    if name == "grace_hopper":
        import matplotlib  # noqa: PLC0415
        from PIL import Image  # noqa: PLC0415

        path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
        return np.asarray(Image.open(path).convert("RGB"))
    import skimage.data  # noqa: PLC0415

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return img[..., :3].astype(np.uint8)


def load_photos(split: str = "train") -> list[torch.Tensor]:
    """Photos as (3, H, W) float tensors in [-1, 1]. split: "train" or "heldout"."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    names = TRAIN_PHOTOS if split == "train" else HELDOUT_PHOTOS
    return [torch.from_numpy(np.array(_load_photo(n))).permute(2, 0, 1).float() / 127.5 - 1 for n in names]


def heldout_photo_crops(size: int = shapes.IMAGE_SIZE, per_photo: int = 4) -> torch.Tensor:
    """Deterministic evaluation views of the held-out photos: the whole photo resized, plus a grid of crops."""
    out = []
    for p in load_photos("heldout"):
        _, H, W = p.shape
        s = min(H, W)
        whole = p[:, (H - s) // 2:(H - s) // 2 + s, (W - s) // 2:(W - s) // 2 + s]
        out.append(F.interpolate(whole[None], size=size, mode="area")[0])
        half = F.interpolate(whole[None], size=2 * size, mode="area")[0]
        for k in range(per_photo - 1):
            y, x = (k // 2) * size // 2 + size // 4, (k % 2) * size // 2 + size // 4
            out.append(half[:, y:y + size, x:x + size])
    return torch.stack(out).clamp(-1, 1)


def random_photo_crops(photos: list[torch.Tensor], n: int, generator: torch.Generator,
                       size: int = shapes.IMAGE_SIZE) -> torch.Tensor:
    """n random crops at random scales (and flips) from the given photos: (n, 3, size, size)."""
    out = []
    for _ in range(n):
        p = photos[int(torch.randint(len(photos), (1,), generator=generator))]
        _, H, W = p.shape
        crop = int(torch.randint(size, min(H, W) + 1, (1,), generator=generator)) if min(H, W) > size else min(H, W)
        y = int(torch.randint(0, H - crop + 1, (1,), generator=generator))
        x = int(torch.randint(0, W - crop + 1, (1,), generator=generator))
        c = p[:, y:y + crop, x:x + crop]
        c = F.interpolate(c[None], size=size, mode="area")[0] if crop != size else c
        if torch.rand(1, generator=generator) < 0.5:
            c = c.flip(-1)
        out.append(c)
    return torch.stack(out).clamp(-1, 1)


def _render_chunk(args: tuple[int, int, int | None]) -> tuple[np.ndarray, list]:
    n, seed, n_objects = args
    scenes = shapes.sample_scenes(n, seed=seed, n_objects=n_objects)
    imgs = shapes.render(scenes)
    return ((imgs + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy(), scenes


def render_dataset(n: int, seed: int = 0, n_objects: int | None = None, workers: int | None = None,
                   chunk: int = 512) -> tuple[torch.Tensor, list[shapes.Scene]]:
    """n scenes rendered to uint8 (n, 3, 128, 128), in parallel; deterministic for (n, seed, chunk)."""
    jobs = [(min(chunk, n - i), seed * 100_003 + i // chunk, n_objects) for i in range(0, n, chunk)]
    workers = workers or max(1, min(len(jobs), (os.cpu_count() or 2)))
    if workers == 1 or len(jobs) == 1:
        results = [_render_chunk(j) for j in jobs]
    else:
        with ProcessPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as ex:
            results = list(ex.map(_render_chunk, jobs))
    images = torch.from_numpy(np.concatenate([r[0] for r in results]))
    scenes = [s for r in results for s in r[1]]
    return images, scenes


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1


def _caption_chunk(args: tuple) -> np.ndarray:
    scenes, seed, k, tokenizer = args
    rng = np.random.default_rng(seed)
    flat = [shapes.caption(s, rng) for s in scenes for _ in range(k)]
    return tokenizer(flat, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="np").input_ids.astype(np.int32)


def caption_bank(scenes: list, tokenizer, k: int = 8, seed: int = 0, workers: int | None = None,
                 chunk: int = 2048) -> torch.Tensor:
    """Token ids of k random paraphrases of every scene, (N, k, 77) int32, made once before training.

    Writing 256 captions and tokenising them costs tens of milliseconds per U-Net step on the CPU,
    as much as a whole training step on a GPU; indexing this bank costs nothing. Writing and
    tokenising both run in worker processes, a chunk of scenes each. Deterministic for
    (scenes, k, seed, chunk), whatever the number of workers.
    """
    if k < 1:
        raise ValueError(f"k must be a positive number of paraphrases per scene, got {k}")
    jobs = [(scenes[i:i + chunk], seed * 100_003 + i // chunk, k, tokenizer) for i in range(0, len(scenes), chunk)]
    workers = workers or max(1, min(len(jobs), (os.cpu_count() or 2)))
    if workers == 1 or len(jobs) == 1:
        results = [_caption_chunk(j) for j in jobs]
    else:
        with ProcessPoolExecutor(workers) as ex:
            results = list(ex.map(_caption_chunk, jobs))
    return torch.from_numpy(np.concatenate(results)).view(len(scenes), k, -1)
