"""The shapes world: procedurally generated, captioned scenes that TinySD is trained on.

Every scene is 128x128 RGB with one to three saturated objects on a low-saturation
background. The split between "saturated object" and "grey-ish background" is what lets
`ldm_tutorial.tinysd.parser.parse_scene` read a scene back by plain image analysis.

Caption grammar (documented here because every later chapter scores prompts with it)::

    caption   := [prefix] object_phrase { joiner object_phrase }
    prefix    := "" | "a picture of " | "an image of " | "there is "
    object    := article [size] colour shape position
    article   := "a" | "an" (before a vowel: "an orange ...")
    size      := "small" | "little" | "large" | "big"      (said with probability `p_size`)
    colour    := red | orange | yellow | green | blue | purple
    shape     := circle | square | triangle | cross
    position  := one of the phrases in POSITION_PHRASES for one of nine cells
    joiner    := " and " | ", "

Positions are the nine cells of a 3x3 grid: top left, top, top right, left, centre, right,
bottom left, bottom, bottom right. Each has two or three English phrasings ("on the left",
"at the left"; "in the top right corner", "at the top right", "in the upper right corner").
`describe(scene)` gives the canonical (first) phrasing, used for evaluation prompts.

Rendering is vectorised torch code, so a GPU renders tens of thousands of scenes a second;
the scene *specification* comes from a NumPy generator, so a seed fixes the data on any device.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 128

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (240, 130, 20),
    "yellow": (230, 200, 25),
    "green": (40, 160, 55),
    "blue": (40, 80, 215),
    "purple": (140, 50, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# bounding-box side in pixels at 128x128
SIZES: dict[str, int] = {"small": 20, "large": 34}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}

# the nine cells, row-major; (col, row) in 0..2
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the top left", "in the upper left corner"),
    "top": ("at the top", "along the top"),
    "top right": ("in the top right corner", "at the top right", "in the upper right corner"),
    "left": ("on the left", "at the left"),
    "centre": ("in the centre", "in the middle"),
    "right": ("on the right", "at the right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left corner"),
    "bottom": ("at the bottom", "along the bottom"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right corner"),
}
PREFIXES: tuple[str, ...] = ("", "", "a picture of ", "an image of ", "there is ")
JOINERS: tuple[str, ...] = (" and ", ", ")
BACKGROUNDS: tuple[str, ...] = ("flat", "gradient", "noise", "stripes")
JITTER = 3  # pixels a centre may move inside its cell


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("colour", self.colour, COLOURS), ("shape", self.shape, SHAPES),
            ("size", self.size, SIZES), ("position", self.position, POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")

    def phrase(self, rng: np.random.Generator | None = None, p_size: float = 1.0) -> str:
        """English noun phrase; canonical (size said, first phrasing) when rng is None."""
        if rng is None:
            words = f"{self.size} {self.colour} {self.shape} {POSITION_PHRASES[self.position][0]}"
        else:
            size = f"{rng.choice(SIZE_WORDS[self.size])} " if rng.random() < p_size else ""
            words = f"{size}{self.colour} {self.shape} {rng.choice(POSITION_PHRASES[self.position])}"
        return ("an " if words[0] in "aeiou" else "a ") + words


@dataclass
class Scene:
    objects: list[SceneObject]
    background: str = "flat"
    # background parameters: two RGB colours in [0, 1], an angle, a frequency, a noise seed
    bg_colours: tuple[tuple[float, float, float], tuple[float, float, float]] = ((0.5, 0.5, 0.5),) * 2
    bg_angle: float = 0.0
    bg_freq: float = 4.0
    bg_seed: int = 0
    jitter: list[tuple[int, int]] = field(default_factory=list)


def cell_centre(position: str, image_size: int = IMAGE_SIZE) -> tuple[float, float]:
    """(x, y) pixel centre of one of the nine cells."""
    idx = POSITIONS.index(position)
    col, row = idx % 3, idx // 3
    step = image_size / 3
    return (col + 0.5) * step, (row + 0.5) * step


ATTRIBUTES: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES),
                                          "position": POSITIONS}


def one_attribute_variants(obj: SceneObject) -> list[tuple[str, SceneObject]]:
    """Every object that differs from `obj` in exactly one attribute, with that attribute's name."""
    return [(attr, SceneObject(**{**obj.__dict__, attr: v}))
            for attr, values in ATTRIBUTES.items() for v in values if v != getattr(obj, attr)]


def describe(scene: Scene) -> str:
    """Canonical caption: every object with its size, first phrasing, joined by ' and '."""
    return " and ".join(o.phrase() for o in scene.objects)


def caption(scene: Scene, rng: np.random.Generator, p_size: float = 0.7) -> str:
    """A random paraphrase of the scene (objects in random order)."""
    order = rng.permutation(len(scene.objects))
    parts = [scene.objects[i].phrase(rng, p_size) for i in order]
    text = parts[0]
    for p in parts[1:]:
        text += rng.choice(JOINERS) + p
    return rng.choice(PREFIXES) + text


def _low_sat_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    v = rng.uniform(0.2, 0.92)
    s = rng.uniform(0.0, 0.16)
    return colorsys.hsv_to_rgb(rng.uniform(0, 1), s, v)


def sample_scene(rng: np.random.Generator, n_objects: int | None = None,
                 max_objects: int = 3) -> Scene:
    """One random scene: distinct cells, distinct colours (so objects never merge)."""
    if n_objects is None:
        n_objects = int(rng.integers(1, max_objects + 1))
    if not 1 <= n_objects <= 3:
        raise ValueError(f"n_objects must be in [1, 3], got {n_objects}")
    cells = rng.choice(len(POSITIONS), size=n_objects, replace=False)
    colours = rng.choice(len(COLOURS), size=n_objects, replace=False)
    names = list(COLOURS)
    objects = [
        SceneObject(names[c], SHAPES[int(rng.integers(len(SHAPES)))],
                    ("small", "large")[int(rng.integers(2))], POSITIONS[p])
        for c, p in zip(colours, cells)
    ]
    c1 = _low_sat_colour(rng)
    c2 = _low_sat_colour(rng)
    return Scene(
        objects=objects,
        background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        bg_colours=(c1, c2),
        bg_angle=float(rng.uniform(0, 2 * np.pi)),
        bg_freq=float(rng.uniform(2.0, 9.0)),
        bg_seed=int(rng.integers(2**31 - 1)),
        jitter=[tuple(int(j) for j in rng.integers(-JITTER, JITTER + 1, size=2)) for _ in objects],
    )


def sample_scenes(n: int, seed: int = 0, n_objects: int | None = None) -> list[Scene]:
    """`n` scenes, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, n_objects) for _ in range(n)]


# ----------------------------------------------------------------------------- rendering
def shape_sdf(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, negative inside) of each shape id, centred, half-size h.

    shape: (B,) long ids into SHAPES; dx, dy: (B, H, W) offsets from the centre; h: (B,).
    """
    h = h[:, None, None]
    circle = torch.sqrt(dx**2 + dy**2) - h
    square = torch.maximum(dx.abs(), dy.abs()) - h
    # upward triangle: apex (0, -h), base from (-h, h) to (h, h)
    slant = (dx.abs() - (dy + h) / 2) / np.sqrt(1.25)
    triangle = torch.maximum(torch.maximum(slant, dy - h), -h - dy)
    w = 0.36 * h
    cross = torch.minimum(torch.maximum(dx.abs() - w, dy.abs() - h), torch.maximum(dy.abs() - w, dx.abs() - h))
    stacked = torch.stack([circle, square, triangle, cross], dim=1)  # (B, 4, H, W)
    return stacked.gather(1, shape[:, None, None, None].expand(-1, 1, *dx.shape[1:]))[:, 0]


def _background(scenes: list[Scene], size: int, device: torch.device) -> torch.Tensor:
    B = len(scenes)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size, device=device),
                            torch.linspace(-1, 1, size, device=device), indexing="ij")
    c1 = torch.tensor([s.bg_colours[0] for s in scenes], device=device, dtype=torch.float32)
    c2 = torch.tensor([s.bg_colours[1] for s in scenes], device=device, dtype=torch.float32)
    ang = torch.tensor([s.bg_angle for s in scenes], device=device)[:, None, None]
    freq = torch.tensor([s.bg_freq for s in scenes], device=device)[:, None, None]
    kind = torch.tensor([BACKGROUNDS.index(s.background) for s in scenes], device=device)
    proj = xs * torch.cos(ang) + ys * torch.sin(ang)  # (B, H, W)
    t_grad = (proj + 1.4) / 2.8
    t_stripes = 0.5 + 0.5 * torch.sin(proj * freq * np.pi)
    # noise: low-frequency plus fine grain, generated on the CPU from each scene's seed
    noise = torch.empty(B, 1, size, size)
    for i, s in enumerate(scenes):
        g = torch.Generator().manual_seed(s.bg_seed)
        coarse = torch.rand(1, 1, 6, 6, generator=g)
        fine = torch.rand(1, 1, size, size, generator=g)
        noise[i] = 0.75 * F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)[0] + 0.25 * fine[0]
    noise = noise.to(device)[:, 0].clamp(0, 1)
    t = torch.zeros_like(proj)
    t = torch.where(kind[:, None, None] == 1, t_grad, t)
    t = torch.where(kind[:, None, None] == 2, noise, t)
    t = torch.where(kind[:, None, None] == 3, t_stripes, t)
    img = c1[:, :, None, None] * (1 - t[:, None]) + c2[:, :, None, None] * t[:, None]
    return img


@torch.no_grad()
def render(scenes: list[Scene], device: torch.device | str = "cpu", size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render scenes to a (B, 3, size, size) float tensor in [-1, 1]."""
    if not scenes:
        raise ValueError("scenes must be a non-empty list of Scene")
    device = torch.device(device)
    scale = size / IMAGE_SIZE
    img = _background(scenes, size, device)
    ys, xs = torch.meshgrid(torch.arange(size, device=device, dtype=torch.float32) + 0.5,
                            torch.arange(size, device=device, dtype=torch.float32) + 0.5, indexing="ij")
    max_obj = max(len(s.objects) for s in scenes)
    names = list(COLOURS)
    for k in range(max_obj):
        present = torch.tensor([k < len(s.objects) for s in scenes], device=device)
        objs = [s.objects[k] if k < len(s.objects) else s.objects[0] for s in scenes]
        jit = [s.jitter[k] if k < len(s.jitter) else (0, 0) for s in scenes]  # hand-made scenes: centred
        cx = torch.tensor([(cell_centre(o.position)[0] + j[0]) * scale for o, j in zip(objs, jit)], device=device)
        cy = torch.tensor([(cell_centre(o.position)[1] + j[1]) * scale for o, j in zip(objs, jit)], device=device)
        h = torch.tensor([SIZES[o.size] / 2 * scale for o in objs], device=device)
        shape = torch.tensor([SHAPES.index(o.shape) for o in objs], device=device)
        rgb = torch.tensor([COLOURS[o.colour] for o in objs], device=device, dtype=torch.float32) / 255
        sdf = shape_sdf(shape, xs[None] - cx[:, None, None], ys[None] - cy[:, None, None], h)
        alpha = (0.5 - sdf).clamp(0, 1) * present[:, None, None]
        img = img * (1 - alpha[:, None]) + rgb[:, :, None, None] * alpha[:, None]
    return img.clamp(0, 1) * 2 - 1


def make_batch(n: int, rng: np.random.Generator, device: torch.device | str = "cpu",
               n_objects: int | None = None, p_size: float = 0.7) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """Images (n, 3, 128, 128) in [-1, 1], random captions, and the scenes."""
    scenes = [sample_scene(rng, n_objects) for _ in range(n)]
    captions = [caption(s, rng, p_size) for s in scenes]
    return render(scenes, device), captions, scenes


def vocabulary() -> list[str]:
    """Every word the caption grammar can produce (the tiny tokenizer's word list)."""
    words: set[str] = {"a", "an", "and", ","}
    for p in PREFIXES + tuple(j.strip() for j in JOINERS):
        words.update(p.split())
    for group in (COLOURS, SHAPES):
        words.update(group)
    for ws in SIZE_WORDS.values():
        words.update(ws)
    for phrases in POSITION_PHRASES.values():
        for p in phrases:
            words.update(p.split())
    words.update({"center"})  # American spelling, so a reader's prompt still works
    words.discard("")
    return sorted(words)
