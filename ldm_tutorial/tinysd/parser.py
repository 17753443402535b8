"""Read a shapes-world image back into objects by plain image analysis (no learning).

Objects are saturated, backgrounds are not: a pixel whose chroma (max - min of RGB) is high
belongs to an object. Each such pixel takes the palette colour nearest in hue; connected
components of one colour are objects; the shape is the template (circle, square, triangle,
cross) whose rendering over the component's bounding box overlaps it best (IoU); the size is
the bounding-box side; the position is the 3x3 cell holding the box centre.

Every chapter that scores prompt adherence (does the image show what the prompt asked?) uses it.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .shapes import COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, Scene, SceneObject, shape_sdf

CHROMA_MIN = 0.30     # backgrounds stay below ~0.15, objects are above ~0.6
MIN_AREA_FRACTION = 60 / IMAGE_SIZE**2   # a small triangle covers ~200 px at 128x128
_PALETTE_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in COLOURS.items()}


@dataclass
class ParsedObject:
    colour: str
    shape: str
    size: str
    position: str
    box: tuple[int, int, int, int]   # x0, y0, x1, y1 (exclusive)
    mask: np.ndarray                 # (H, W) bool
    shape_iou: float

    def as_scene_object(self) -> SceneObject:
        return SceneObject(self.colour, self.shape, self.size, self.position)


def to_numpy_image(image) -> np.ndarray:
    """PIL image, HWC uint8 array, HWC float array in [0, 1], or CHW tensor in [-1, 1] -> HWC float [0, 1]."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"image tensor must be (3, H, W) in [-1, 1], got shape {tuple(t.shape)}")
        if t.min() < -1.01 or t.max() > 1.01:
            raise ValueError(f"image tensor must be in [-1, 1], got [{t.min():.2f}, {t.max():.2f}]")
        return ((t.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image array must be (H, W, 3), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255
    if arr.min() < -1e-3 or arr.max() > 1 + 1e-3:
        raise ValueError(f"float image array must be in [0, 1], got [{arr.min():.2f}, {arr.max():.2f}]")
    return arr.astype(np.float32)


def _hue(rgb: np.ndarray) -> np.ndarray:
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = np.maximum(mx - mn, 1e-6)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    h = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return h / 6


def _templates(box: tuple[int, int, int, int], shape_hw: tuple[int, int]) -> np.ndarray:
    """(len(SHAPES), H, W) bool: each shape drawn over the box."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    H, W = shape_hw
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    n = len(SHAPES)
    dx = (xs - cx).expand(n, H, W)
    dy = (ys - cy).expand(n, H, W)
    sdf = shape_sdf(torch.arange(n), dx, dy, torch.full((n,), side / 2))
    return (sdf < 0).numpy()


def parse_scene(image, min_area_fraction: float = MIN_AREA_FRACTION) -> list[ParsedObject]:
    """Objects in a shapes-world image, largest first.

    Args:
        image: PIL image, (H, W, 3) uint8 / float [0, 1] array, or (3, H, W) tensor in [-1, 1].
    Returns:
        list of ParsedObject (colour, shape, size, position, box, mask, shape_iou).
    """
    rgb = to_numpy_image(image)
    H, W, _ = rgb.shape
    scale = H / IMAGE_SIZE
    chroma = rgb.max(-1) - rgb.min(-1)
    fg = chroma > CHROMA_MIN
    hue = _hue(rgb)
    names = list(_PALETTE_HUES)
    hues = np.array([_PALETTE_HUES[n] for n in names])
    dist = np.abs(hue[..., None] - hues)
    dist = np.minimum(dist, 1 - dist)
    label_colour = dist.argmin(-1)
    min_area = min_area_fraction * H * W
    out: list[ParsedObject] = []
    for ci, name in enumerate(names):
        mask_c = fg & (label_colour == ci)
        if mask_c.sum() < min_area:
            continue
        comps, n = ndimage.label(mask_c, structure=np.ones((3, 3)))
        for k in range(1, n + 1):
            m = comps == k
            area = m.sum()
            if area < min_area:
                continue
            m = ndimage.binary_fill_holes(m)
            ys, xs = np.nonzero(m)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            side = max(box[2] - box[0], box[3] - box[1]) / scale
            temps = _templates(box, (H, W))
            inter = (temps & m).sum((1, 2))
            union = (temps | m).sum((1, 2))
            iou = inter / np.maximum(union, 1)
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            col = min(int(cx / (W / 3)), 2)
            row = min(int(cy / (H / 3)), 2)
            size = "small" if side < (SIZES["small"] + SIZES["large"]) / 2 else "large"
            out.append(ParsedObject(name, SHAPES[int(iou.argmax())], size, POSITIONS[row * 3 + col],
                                    box, m, float(iou.max())))
    out.sort(key=lambda o: -o.mask.sum())
    return out


def scene_matches(parsed: list[ParsedObject], scene: Scene | list[SceneObject], check_size: bool = True) -> bool:
    """True when the parsed objects are exactly the scene's objects (as a multiset)."""
    wanted = scene.objects if isinstance(scene, Scene) else scene
    key = (lambda o: (o.colour, o.shape, o.size, o.position)) if check_size else \
          (lambda o: (o.colour, o.shape, o.position))
    return sorted(map(key, wanted)) == sorted(key(p) for p in parsed)


def objects_present(parsed: list[ParsedObject], wanted: list[SceneObject], check_size: bool = False) -> list[bool]:
    """For each wanted object: is there a parsed object with its colour, shape and position (and size)?"""
    def key(o):
        return (o.colour, o.shape, o.position) + ((o.size,) if check_size else ())
    have = {key(p) for p in parsed}
    return [key(w) in have for w in wanted]
