"""Figures for the chapters (introduced in chapter 0). Every function returns a matplotlib Figure."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch


def _plt():
    import matplotlib.pyplot as plt  # imported on first use: `import ldm_tutorial` stays light

    return plt


def to_uint8_images(images, param: str = "images") -> list[np.ndarray]:
    """Convert images to a list of HWC uint8 arrays (H, W, 3) or (H, W).

    Accepts a PIL image, a list of them, HWC uint8 arrays, or CHW / BCHW float tensors in [-1, 1]
    (the VAE's range) or [0, 1]. Anything else raises ValueError naming `param`.
    """
    from PIL import Image

    if isinstance(images, torch.Tensor):
        t = images.detach().to("cpu", torch.float32)
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[1] not in (1, 3):
            raise ValueError(f"{param} as a tensor must be CHW or BCHW with 1 or 3 channels, got shape {tuple(images.shape)}")
        lo, hi = float(t.min()), float(t.max())
        if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(f"{param} as a tensor must have values in [-1, 1] or [0, 1], got [{lo:.3g}, {hi:.3g}]")
        if lo < 0:
            t = (t + 1) / 2  # [-1, 1] -> [0, 1]
        arr = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
        return [a[..., 0] if a.shape[-1] == 1 else a for a in arr]
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    if not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError(f"{param} must be a PIL image, an array, a tensor or a non-empty list of them, got {type(images).__name__}")
    out = []
    for i, im in enumerate(images):
        if isinstance(im, Image.Image):
            out.append(np.asarray(im.convert("RGB")))
        elif isinstance(im, np.ndarray):
            if im.dtype != np.uint8:
                raise ValueError(f"{param}[{i}] as an array must be uint8 HWC in [0, 255], got dtype {im.dtype}")
            if not (im.ndim == 2 or (im.ndim == 3 and im.shape[-1] in (1, 3, 4))):
                raise ValueError(f"{param}[{i}] as an array must be HW or HWC with 1, 3 or 4 channels, got shape {im.shape}")
            out.append(im)
        elif isinstance(im, torch.Tensor):
            out.extend(to_uint8_images(im, f"{param}[{i}]"))
        else:
            raise ValueError(f"{param}[{i}] must be a PIL image, a uint8 array or a tensor, got {type(im).__name__}")
    return out


def show_images(images, captions: Sequence[str] | None = None, ncols: int = 4, size: float = 3.0):
    """Show images in a grid of `ncols` columns, `size` inches per image.

    Args:
        images: PIL image(s), HWC uint8 array(s), or CHW / BCHW tensors in [-1, 1] or [0, 1].
        captions: one title per image, or None.
    Returns:
        The matplotlib Figure (one axis per grid cell; unused cells are blank).
    """
    arrays = to_uint8_images(images)
    if captions is not None and len(captions) != len(arrays):
        raise ValueError(f"captions must have one entry per image ({len(arrays)}), got {len(captions)}")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, len(arrays))
    nrows = math.ceil(len(arrays) / ncols)
    plt = _plt()
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(arrays):
            ax.imshow(arrays[k], cmap="gray" if arrays[k].ndim == 2 else None)
            if captions is not None:
                ax.set_title(captions[k], fontsize=9)
    fig.tight_layout()
    return fig


def overlay_heatmap(image, heat, alpha: float = 0.5, size: float = 4.0, cmap: str = "jet"):
    """Draw `heat` (a 2-D map, any size, any range) over `image`, stretched to the image's size.

    Returns:
        The matplotlib Figure.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    (arr,) = to_uint8_images(image, "image")[:1]
    heat = heat.detach().float().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, float)
    if heat.ndim != 2:
        raise ValueError(f"heat must be a 2-D map (H, W), got shape {heat.shape}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(arr)
    h, w = arr.shape[:2]
    ax.imshow(heat, cmap=cmap, alpha=alpha, extent=(0, w, h, 0), interpolation="bilinear")
    ax.axis("off")
    fig.tight_layout()
    return fig


def plot_curves(series: Mapping[str, Sequence[float] | tuple[Sequence[float], Sequence[float]]],
                xlabel: str, ylabel: str, logy: bool = False, size: tuple[float, float] = (6.0, 4.0),
                title: str | None = None):
    """Plot named curves on one axis (points marked when a curve has at most 30 of them).

    Args:
        series: name -> y values (x = 0, 1, ...) or name -> (x values, y values).
        logy: logarithmic y axis.
        title: optional axis title.
    Returns:
        The matplotlib Figure.
    """
    if not series:
        raise ValueError("series must hold at least one curve")
    plt = _plt()
    fig, ax = plt.subplots(figsize=size)
    for name, values in series.items():
        if isinstance(values, tuple) and len(values) == 2:
            x, y = values
        else:
            y = values
            x = range(len(y))
        y = list(y)
        ax.plot(list(x), y, marker="o" if len(y) <= 30 else None, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


_SLIDER_TEMPLATE = """<div class="ldm-slider" id="{uid}" style="display:inline-block;text-align:center">
<div class="ldm-slider-label" style="font-family:sans-serif;margin:4px">{label0}</div>
<img src="{src0}" alt="{alt}" width="{width}" style="image-rendering:pixelated;display:block;margin:auto">
<input type="range" min="0" max="{last}" step="1" value="0" aria-label="{alt}" style="width:{width}px">
<script>
(function () {{
  var box = document.getElementById("{uid}");
  var frames = {frames}, labels = {labels};
  var img = box.querySelector("img"), label = box.querySelector(".ldm-slider-label");
  box.querySelector("input").addEventListener("input", function (e) {{
    var i = parseInt(e.target.value, 10);
    img.src = frames[i]; label.textContent = labels[i];
  }});
}})();
</script>
</div>"""


def slider_html(images, labels: Sequence[str], width: int = 256, alt: str = "explorer") -> str:
    """A kernel-free explorer: one picture per setting and a slider that moves between them.

    `images`: anything `to_uint8_images` reads (e.g. an (F, 3, H, W) tensor in [-1, 1]), one frame per
    label. The HTML embeds every frame as a PNG and needs no kernel, no widget library and no network:
    the rendered book shows it as it is, and `scripts/check_book.py` moves each slider in Chromium and
    checks that the picture changes. In Jupyter or Colab, show it with `IPython.display.HTML`.
    """
    import base64
    import html
    import io
    import json
    import uuid

    from PIL import Image

    frames = to_uint8_images(images)
    labels = [str(x) for x in labels]
    if len(frames) != len(labels):
        raise ValueError(f"labels must name each of the {len(frames)} frames, got {len(labels)}")
    if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
        raise ValueError(f"width must be a positive int (pixels), got {width!r}")
    srcs = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="PNG")
        srcs.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
    return _SLIDER_TEMPLATE.format(
        uid=f"ldm-slider-{uuid.uuid4().hex[:12]}", label0=html.escape(labels[0]), src0=srcs[0],
        alt=html.escape(alt, quote=True), width=width, last=len(frames) - 1,
        frames=json.dumps(srcs), labels=json.dumps(labels).replace("</", "<\\/"))
