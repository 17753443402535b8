"""Metrics for TinySD's visual defects (issue 21): one number per defect, on batches of images.

Every function takes images as a (B, 3, H, W) tensor in [-1, 1] (the VAE's range). Chroma is
max(RGB) - min(RGB) of the image mapped to [0, 1]; the shapes world's backgrounds stay at or below
0.147 by construction (`shapes._low_sat_colour`: saturation <= 0.16, value <= 0.92) and its
objects are above 0.6, which is what the parser uses to find objects.

* `corner_chroma` / `corner_smudge`: the saturated smudge in the top-left corner. Mean chroma of
  a `size` x `size` patch in each corner and in the middle of the top edge, against either the
  same image's input (round trips: `paired=True`) or the distribution of the same statistic over
  rendered training scenes (generations).
* `edge_fringe`: the purple / magenta swirl on one edge of objects. The share of pixels in a band
  just outside each parsed object whose chroma is high (> `min_chroma`, above every background)
  and whose hue is far from the object's own palette hue. Anti-aliased edges of a rendered object
  are blends of the object's colour with a near-grey background: they keep the object's hue, so
  the metric is ~0 on rendered scenes.
* `background_texture`: luminance statistics of the pixels outside the parsed objects (within-image
  std, and the share of the background's spectral power above a cut-off frequency), compared with
  rendered training scenes (flat / gradient / noise / stripes backgrounds).
* `object_count_defects` / `shape_confusion`: more objects than the prompt asked for (a duplicate of
  a requested colour, or an extra colour), and requested (size, shape) drawn as another shape, e.g.
  small squares parsed as circles or stars.
* `all_defects`: every metric above for one batch, as one dict of floats (the `evaluate` rows).
* `corner_dependence`: why the smudge is there. How much the decoder's output far from a corner
  changes when a small block of its features in that corner is overwritten (a normalisation
  spike, StyleGAN's "droplet"); takes a VAE, not images.
* `margin_decode`: a decode that puts the spike's corner outside the picture (a workaround with
  a measured price in shape fidelity: benchmarks/tinysd.md).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from ..checks import positive_int
from ..arch import decoder_features, decoder_rest
from ..metrics import _check_images, psnr, radial_power_spectrum
from . import parser, shapes

REGIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "top_middle")
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _images(images, param: str = "images") -> np.ndarray:
    """Checked (B, 3, H, W) tensor in [-1, 1] -> (B, H, W, 3) float array in [0, 1]."""
    x = _check_images(images, param)
    if x.shape[0] == 0:
        raise ValueError(f"{param} must hold at least one image, got an empty batch")
    if min(x.shape[-2:]) < 16:
        raise ValueError(f"{param} must be at least 16x16 pixels, got {tuple(x.shape[-2:])}")
    return ((x.detach().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()


def _parsed(images: torch.Tensor, parsed: list | None, param: str = "parsed") -> list:
    if parsed is None:
        return [parser.parse_scene(im) for im in images]
    if len(parsed) != len(images):
        raise ValueError(f"{param} must hold one parse per image ({len(images)}), got {len(parsed)}")
    return parsed


def chroma(images: torch.Tensor) -> np.ndarray:
    """(B, H, W) chroma max(RGB) - min(RGB) in [0, 1] of images in [-1, 1]."""
    rgb = _images(images)
    return rgb.max(-1) - rgb.min(-1)


def object_mask(parsed_one: list, shape_hw: tuple[int, int], dilate: int = 3) -> np.ndarray:
    """(H, W) bool: the union of one image's parsed object masks, grown by `dilate` pixels."""
    m = np.zeros(shape_hw, dtype=bool)
    for o in parsed_one:
        m |= o.mask
    if dilate and m.any():
        m = ndimage.binary_dilation(m, structure=np.ones((3, 3), bool), iterations=dilate)
    return m


def _region_slices(h: int, w: int, size: int) -> dict[str, tuple[slice, slice]]:
    mid = (w - size) // 2
    return {"top_left": (slice(0, size), slice(0, size)),
            "top_right": (slice(0, size), slice(w - size, w)),
            "bottom_left": (slice(h - size, h), slice(0, size)),
            "bottom_right": (slice(h - size, h), slice(w - size, w)),
            "top_middle": (slice(0, size), slice(mid, mid + size))}


def corner_chroma(images: torch.Tensor, size: int = 6, parsed: list | None = None,
                  exclude_objects: bool = True) -> dict[str, np.ndarray]:
    """Per-image mean chroma of a size x size patch in each corner and mid top edge.

    A patch that a parsed object (grown by 3 px) covers for more than half its pixels is NaN for
    that image: a large square in the top-left cell reaches to within 2 px of the corner, and its
    colour is not a defect. The smudge itself (about 6x6 px) is far below the parser's minimum
    object area, so it is never excluded as an object.
    Returns {region: (B,) float array}, regions as in REGIONS.
    """
    size = positive_int(size, "size")
    c = chroma(images)
    _, h, w = c.shape
    if size > min(h, w) // 2:
        raise ValueError(f"size must be at most half the image side ({min(h, w) // 2}), got {size}")
    parsed = _parsed(images, parsed) if exclude_objects else None
    out = {}
    for name, (ys, xs) in _region_slices(h, w, size).items():
        vals = c[:, ys, xs].mean((1, 2)).astype(np.float64)
        if parsed is not None:
            for i, p in enumerate(parsed):
                if p and object_mask(p, (h, w))[ys, xs].mean() > 0.5:
                    vals[i] = np.nan
        out[name] = vals
    return out


def corner_smudge(images: torch.Tensor, reference: torch.Tensor, paired: bool, size: int = 6,
                  parsed: list | None = None, reference_parsed: list | None = None) -> dict:
    """Top-left corner chroma of `images` against `reference`.

    paired=True (a round trip): reference[i] is image i's input. "smudged" = the image's top-left
        chroma exceeds 2 x its input's + 0.05.
    paired=False (generations): reference is a batch of rendered training scenes. "smudged" = the
        top-left chroma exceeds the reference's 99th percentile of the same statistic.
    Returns means of the top-left patch (images, reference), their ratio, the excess (mean of
    image minus reference), the share smudged, the mean ratio of the other three corners and the
    top edge's middle (near 1 when only the top-left corner is wrong), and n (images counted).
    """
    if not isinstance(paired, bool):
        raise ValueError(f"paired must be True or False, got {paired!r}")
    if paired and (not isinstance(reference, torch.Tensor) or tuple(reference.shape) != tuple(images.shape)):
        got = tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__
        raise ValueError(f"reference must have the images' shape {tuple(images.shape)} when paired, got {got}")
    _check_images(reference, "reference")
    if paired:   # objects come from the input: a recon's corner is judged where the input's is clean
        reference_parsed = _parsed(reference, reference_parsed, "reference_parsed")
        parsed = reference_parsed
    a = corner_chroma(images, size, parsed)
    r = corner_chroma(reference, size, reference_parsed)
    tl, rtl = a["top_left"], r["top_left"]
    if paired:
        ok = ~np.isnan(tl)
        smudged = tl[ok] > 2 * rtl[ok] + 0.05
        excess = float(np.mean(tl[ok] - rtl[ok]))
        n_ref = int(ok.sum())
    else:
        ok = ~np.isnan(tl)
        threshold = float(np.nanpercentile(rtl, 99))
        smudged = tl[ok] > threshold
        excess = float(np.nanmean(tl) - np.nanmean(rtl))
        n_ref = int((~np.isnan(rtl)).sum())
    others = {k: float(np.nanmean(a[k]) / max(np.nanmean(r[k]), 1e-6)) for k in REGIONS if k != "top_left"}
    return {"top_left": float(np.nanmean(tl[ok])) if ok.any() else float("nan"),
            "reference_top_left": float(np.nanmean(rtl[ok] if paired else rtl)),
            "ratio": float(np.nanmean(tl[ok]) / max(np.nanmean(rtl[ok] if paired else rtl), 1e-6)),
            "excess": excess, "smudged_share": float(np.mean(smudged)) if ok.any() else float("nan"),
            "other_regions_ratio": float(np.mean(list(others.values()))), "n": int(ok.sum()),
            "n_reference": n_ref}


def _hue_distance(h: np.ndarray, ref: float) -> np.ndarray:
    d = np.abs(h - ref)
    return np.minimum(d, 1 - d)


FRINGE_OBJECT_PIXELS = 8   # fringe pixels that make an object count as fringed


def edge_fringe(images: torch.Tensor, parsed: list | None = None, band: int = 4, min_chroma: float = 0.2,
                min_hue_distance: float = 1 / 12, reference: torch.Tensor | None = None,
                reference_parsed: list | None = None) -> dict:
    """Colour fringe just outside objects.

    For each parsed object, its band is the pixels within `band` px outside its mask (and outside
    every other parsed object's mask). A band pixel is a fringe pixel when its chroma exceeds
    `min_chroma` (every shapes-world background is below 0.147) and its hue is more than
    `min_hue_distance` (a fraction of the colour wheel; 1/12 = 30 degrees) from the object's
    palette hue. Anti-aliased rendered edges keep the object's hue, so rendered scenes score ~0;
    a blurred edge (a halo of the object's own hue) does not count either.

    reference: for a round trip, the inputs; then bands come from the inputs' parsed objects and
        the result adds `error_chroma`: the mean chroma (max - min over RGB, in [0, 1] units) of
        the error recon - input over the band pixels, i.e. how much colour the error carries there.
    Returns {"pixels_per_object": mean fringe pixels per object, "share_of_halo": fringe pixels /
        band pixels above `min_chroma`, "objects_fringed": share of objects with at least
        FRINGE_OBJECT_PIXELS fringe pixels, "n_objects", ("error_chroma")}.
    """
    band = positive_int(band, "band")
    if not 0 < min_chroma < 1:
        raise ValueError(f"min_chroma must be in (0, 1), got {min_chroma}")
    if not 0 < min_hue_distance <= 0.5:
        raise ValueError(f"min_hue_distance must be in (0, 0.5] of the colour wheel, got {min_hue_distance}")
    rgb = _images(images)
    if reference is not None:
        if not isinstance(reference, torch.Tensor) or tuple(reference.shape) != tuple(images.shape):
            got = tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__
            raise ValueError(f"reference must have the images' shape {tuple(images.shape)}, got {got}")
        ref_rgb = _images(reference, "reference")
        parsed = _parsed(reference, reference_parsed, "reference_parsed")
    else:
        parsed = _parsed(images, parsed)
    c = rgb.max(-1) - rgb.min(-1)
    hue = parser._hue(rgb)
    struct = np.ones((3, 3), bool)
    counts, halo, ring_px = [], 0, 0
    err_sum = 0.0
    for i, objs in enumerate(parsed):
        union = np.zeros(c.shape[1:], bool)
        for o in objs:
            union |= o.mask
        for o in objs:
            ring = ndimage.binary_dilation(o.mask, structure=struct, iterations=band) & ~union
            coloured = ring & (c[i] > min_chroma)
            far = _hue_distance(hue[i], parser._PALETTE_HUES[o.colour]) > min_hue_distance
            counts.append(int((coloured & far).sum()))
            halo += int(coloured.sum())
            ring_px += int(ring.sum())
            if reference is not None:
                e = rgb[i][ring] - ref_rgb[i][ring]
                err_sum += float((e.max(-1) - e.min(-1)).sum())
    counts = np.array(counts)
    nan = float("nan")
    out = {"pixels_per_object": float(counts.mean()) if counts.size else nan,
           "share_of_halo": float(counts.sum() / halo) if halo else 0.0 if counts.size else nan,
           "objects_fringed": float(np.mean(counts >= FRINGE_OBJECT_PIXELS)) if counts.size else nan,
           "n_objects": int(counts.size)}
    if reference is not None:
        out["error_chroma"] = err_sum / ring_px if ring_px else nan
    return out


BACKGROUND_CLASSES = ("flat", "gradient", "noise", "stripes", "other")
FLAT_STD = 0.01        # luminance std below which a background looks flat (rendered flat ones: 0.000)
PLANE_R2 = 0.8         # a gradient: a plane a + b x + c y explains this share of the variance
GRAIN = 0.2            # noise: fine grain (3x3 high-pass std) / residual std above this
STRIPE_COHERENCE = 0.8  # stripes: the gradients share one direction (structure-tensor coherence)


def _background_features(lum: np.ndarray, bg: np.ndarray, cutoff: float) -> dict:
    h, w = lum.shape
    yy, xx = np.mgrid[0:h, 0:w] / h
    v = lum[bg]
    design = np.stack([np.ones(v.size), xx[bg], yy[bg]], 1)
    coef, *_ = np.linalg.lstsq(design, v, rcond=None)
    res = v - design @ coef
    r2 = 1 - res.var() / v.var() if v.var() > 1e-12 else 1.0
    resid = lum - (np.stack([np.ones(h * w), xx.ravel(), yy.ravel()], 1) @ coef).reshape(h, w)
    resid[~bg] = 0
    power = np.abs(np.fft.fft2(resid * (np.hanning(h)[:, None] * np.hanning(w)[None]))) ** 2
    power[0, 0] = 0
    total = power.sum()
    ky, kx = np.unravel_index(power.argmax(), power.shape)
    near = [((ky + a) % h, (kx + b) % w) for a in (-1, 0, 1) for b in (-1, 0, 1)]
    peak = sum(power[y, x] + power[-y % h, -x % w] for y, x in near) / max(total, 1e-12)
    cycles = float(np.hypot(min(ky, h - ky), min(kx, w - kx)))
    filled = np.where(bg, lum, v.mean())
    inner = ndimage.binary_erosion(bg, iterations=2)
    grain = (filled - ndimage.uniform_filter(filled, 3))[inner].std() / max(res.std(), 1e-9)
    x = torch.from_numpy(np.repeat(filled[None, None] * 2 - 1, 3, axis=1).astype(np.float32))
    f, p = radial_power_spectrum(x)
    hf = float(p[f >= cutoff].sum() / p[1:].sum()) if float(p[1:].sum()) > 1e-12 else 0.0
    smooth = ndimage.gaussian_filter(filled, 2.0)
    gy, gx = np.gradient(smooth)
    inner4 = ndimage.binary_erosion(bg, iterations=4)
    jxx, jyy, jxy = (gx * gx)[inner4].sum(), (gy * gy)[inner4].sum(), (gx * gy)[inner4].sum()
    coherence = float(np.hypot(jxx - jyy, 2 * jxy) / max(jxx + jyy, 1e-12))
    std = float(v.std())
    if std < FLAT_STD:
        kind = "flat"
    elif r2 >= PLANE_R2:
        kind = "gradient"
    elif grain >= GRAIN:
        kind = "noise"
    elif coherence >= STRIPE_COHERENCE:
        kind = "stripes"
    else:
        kind = "other"
    return {"std": std, "plane_r2": float(r2), "peak_share": float(peak), "peak_cycles": cycles,
            "grain": float(grain), "coherence": coherence, "high_freq_share": hf, "kind": kind}


def background_texture(images: torch.Tensor, parsed: list | None = None, cutoff: float = 0.25) -> dict:
    """Per-image luminance statistics of the background (pixels outside parsed objects grown by 3 px).

    std: within-image standard deviation of the background's luminance (in [0, 1] units).
    high_freq_share: the background's luminance (objects filled with its mean): power above
        `cutoff` cycles per pixel over its total power, DC removed (`metrics.radial_power_spectrum`).
    kind: which of the training set's backgrounds it looks like, one of BACKGROUND_CLASSES:
        "flat" (std < FLAT_STD), "gradient" (a plane explains >= PLANE_R2 of the variance),
        "noise" (fine grain: a 3x3 high-pass keeps >= GRAIN of the std left after the plane),
        "stripes" (the smoothed gradients share one direction: structure-tensor coherence >=
        STRIPE_COHERENCE), else "other" (e.g. soft blotches, which no training background has).
    mean_rgb: the background's mean colour, (B, 3) in [0, 1] (how bright and which colour it is).
    Returns {"std", "high_freq_share", "plane_r2", "peak_share", "grain", "coherence": (B,) arrays,
    "mean_rgb": a (B, 3) array, "kind": list of str}.
    """
    if not 0 < cutoff < 0.5:
        raise ValueError(f"cutoff must be in (0, 0.5) cycles per pixel, got {cutoff}")
    rgb = _images(images)
    parsed = _parsed(images, parsed)
    luma = rgb @ LUMA
    rows, means = [], []
    for i, objs in enumerate(parsed):
        bg = ~object_mask(objs, luma.shape[1:])
        if bg.sum() < 16:
            bg = np.ones_like(bg)
        rows.append(_background_features(luma[i].astype(np.float64), bg, cutoff))
        means.append(rgb[i][bg].mean(0))
    out = {k: np.array([r[k] for r in rows]) for k in ("std", "high_freq_share", "plane_r2", "peak_share", "grain", "coherence")}
    out["mean_rgb"] = np.array(means, dtype=np.float64)
    out["kind"] = [r["kind"] for r in rows]
    return out


def _colour_spread(texture: dict) -> float:
    """Std across images of the background's mean colour, averaged over R, G and B."""
    return float(texture["mean_rgb"].std(0).mean()) if len(texture["mean_rgb"]) > 1 else 0.0


def background_report(images: torch.Tensor, reference: torch.Tensor, parsed: list | None = None,
                      reference_parsed: list | None = None, cutoff: float = 0.25,
                      reference_texture: dict | None = None) -> dict:
    """`background_texture` of images against a reference batch (rendered training scenes).

    Returns the mean background std of each and their ratio, the mean high-frequency share of each
    and their ratio, the share of each background kind in each ("kinds", "reference_kinds"), and
    how much the backgrounds differ from image to image: "colour_spread", the std across images of
    the background's mean colour (averaged over R, G, B), its reference value and their ratio
    (a batch whose backgrounds are all the same grey scores near 0 however textured they are).
    """
    a = background_texture(images, parsed, cutoff)
    # reference_texture: background_texture(reference, ...) computed once for many batches
    r = reference_texture if reference_texture is not None else background_texture(reference, reference_parsed, cutoff)
    return {"std": float(np.mean(a["std"])), "reference_std": float(np.mean(r["std"])),
            "std_ratio": float(np.mean(a["std"]) / max(np.mean(r["std"]), 1e-9)),
            "high_freq_share": float(np.mean(a["high_freq_share"])),
            "reference_high_freq_share": float(np.mean(r["high_freq_share"])),
            "high_freq_ratio": float(np.mean(a["high_freq_share"]) / max(np.mean(r["high_freq_share"]), 1e-9)),
            "colour_spread": _colour_spread(a), "reference_colour_spread": _colour_spread(r),
            "colour_spread_ratio": _colour_spread(a) / max(_colour_spread(r), 1e-9),
            "kinds": {k: a["kind"].count(k) / len(a["kind"]) for k in BACKGROUND_CLASSES},
            "reference_kinds": {k: r["kind"].count(k) / len(r["kind"]) for k in BACKGROUND_CLASSES},
            "n": len(a["std"]), "n_reference": len(r["std"])}


def _wanted(scenes: list, param: str = "scenes") -> list[list[shapes.SceneObject]]:
    out = []
    for s in scenes:
        objs = s.objects if isinstance(s, shapes.Scene) else s
        if not isinstance(objs, (list, tuple)) or not all(isinstance(o, shapes.SceneObject) for o in objs):
            raise ValueError(f"{param} must be Scenes or lists of SceneObject, got {type(s).__name__}")
        out.append(list(objs))
    return out


def object_count_defects(parsed: list, scenes: list) -> dict:
    """More objects than asked for, from the parses of generated images and their scenes (prompts).

    more_than_asked: share of images with more parsed objects than the prompt names.
    duplicate: share of images where some requested colour is parsed more often than requested
        (a second copy of a requested object).
    extra_colour: share of images with a parsed object whose colour the prompt never names.
    Returns the three shares and n.
    """
    wanted = _wanted(scenes)
    if len(parsed) != len(wanted):
        raise ValueError(f"parsed must hold one parse per scene ({len(wanted)}), got {len(parsed)}")
    more, dup, extra = [], [], []
    for p, w in zip(parsed, wanted):
        asked = [o.colour for o in w]
        got = [o.colour for o in p]
        more.append(len(p) > len(w))
        dup.append(any(got.count(c) > asked.count(c) for c in set(asked)))
        extra.append(any(c not in asked for c in got))
    return {"more_than_asked": float(np.mean(more)), "duplicate": float(np.mean(dup)),
            "extra_colour": float(np.mean(extra)), "n": len(wanted)}


def shape_confusion(parsed: list, scenes: list, size: str = "small", shape: str = "square") -> dict:
    """How requested `size` `shape`s come out: the parsed shape of the object with their colour and cell.

    Returns {"n": requested objects found (their colour at their cell), "n_requested", "correct":
    share parsed as `shape`, "as": {other shape: share}}; the shares are over the found ones.
    """
    if size not in shapes.SIZES:
        raise ValueError(f"size must be one of {list(shapes.SIZES)}, got {size!r}")
    if shape not in shapes.SHAPES:
        raise ValueError(f"shape must be one of {list(shapes.SHAPES)}, got {shape!r}")
    wanted = _wanted(scenes)
    if len(parsed) != len(wanted):
        raise ValueError(f"parsed must hold one parse per scene ({len(wanted)}), got {len(parsed)}")
    found, requested = [], 0
    for p, w in zip(parsed, wanted):
        for o in w:
            if o.size != size or o.shape != shape:
                continue
            requested += 1
            match = [q for q in p if q.colour == o.colour and q.position == o.position]
            if match:
                found.append(match[0].shape)
    n = len(found)
    return {"n": n, "n_requested": requested,
            "correct": found.count(shape) / n if n else float("nan"),
            "as": {s: found.count(s) / n if n else float("nan") for s in shapes.SHAPES if s != shape}}


_TRAIN_TEXTURE: dict = {}


def all_defects(images: torch.Tensor, scenes: list | None = None, inputs: torch.Tensor | None = None,
                train_reference: torch.Tensor | None = None, train_parsed: list | None = None) -> dict:
    """Every defect metric of one batch, flattened to floats (one row of the evaluate tables).

    images: the batch to judge. scenes: what each image should show (prompts or rendered scenes),
    for the object-count and shape metrics. inputs: for round trips, the images' inputs (corner and
    fringe judged against them). train_reference: rendered training scenes, the reference for the
    corner statistic of unpaired batches and for the background statistics (required).
    """
    if train_reference is None:
        raise ValueError("train_reference must be a batch of rendered training scenes, got None")
    parsed = [parser.parse_scene(im) for im in images]
    train_parsed = _parsed(train_reference, train_parsed, "train_parsed")
    row: dict = {"n": len(images)}
    if inputs is not None:
        in_parsed = [parser.parse_scene(im) for im in inputs]
        cs = corner_smudge(images, inputs, True, reference_parsed=in_parsed)
        fr = edge_fringe(images, reference=inputs, reference_parsed=in_parsed)
        row["fringe_error_chroma"] = fr["error_chroma"]
        fr_own = edge_fringe(images, parsed)
    else:
        cs = corner_smudge(images, train_reference, False, parsed=parsed, reference_parsed=train_parsed)
        fr_own = edge_fringe(images, parsed)
    row.update({"corner_top_left": cs["top_left"], "corner_reference": cs["reference_top_left"],
                "corner_ratio": cs["ratio"], "corner_smudged_share": cs["smudged_share"],
                "corner_other_regions_ratio": cs["other_regions_ratio"], "corner_n": cs["n"],
                "fringe_px_per_object": fr_own["pixels_per_object"], "fringe_share_of_halo": fr_own["share_of_halo"],
                "objects_fringed": fr_own["objects_fringed"], "fringe_n_objects": fr_own["n_objects"]})
    if _TRAIN_TEXTURE.get("ref") is not train_reference:   # the reference's backgrounds, measured once
        _TRAIN_TEXTURE.update(ref=train_reference, value=background_texture(train_reference, train_parsed))
    bg = background_report(images, train_reference, parsed, train_parsed, reference_texture=_TRAIN_TEXTURE["value"])
    row.update({"bg_std": bg["std"], "bg_std_ratio": bg["std_ratio"], "bg_high_freq_share": bg["high_freq_share"],
                "bg_high_freq_ratio": bg["high_freq_ratio"], "bg_reference_std": bg["reference_std"],
                "bg_colour_spread": bg["colour_spread"], "bg_colour_spread_ratio": bg["colour_spread_ratio"],
                **{f"bg_{k}": v for k, v in bg["kinds"].items()}})
    if scenes is not None:
        oc = object_count_defects(parsed, scenes)
        sq = shape_confusion(parsed, scenes, "small", "square")
        row.update({"more_than_asked": oc["more_than_asked"], "duplicate": oc["duplicate"],
                    "extra_colour": oc["extra_colour"], "small_square_wrong": 1 - sq["correct"],
                    "small_square_n": sq["n"],
                    "fully_correct": float(np.mean([len(p) == len(s.objects if isinstance(s, shapes.Scene) else s)
                                                    and all(parser.objects_present(p, s.objects if isinstance(s, shapes.Scene) else s))
                                                    for p, s in zip(parsed, scenes)]))})
    return row


# ----------------------------------------------------------------------------- why the smudge
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


@torch.no_grad()
def corner_dependence(vae, inputs: torch.Tensor, size: int = 4, stage: int | None = None,
                      margin: int | None = None) -> dict:
    """How much the decoder's output far from a corner depends on the features in that corner.

    Encode `inputs` (posterior mean), run the decoder up to `up_blocks[stage]` (default: the last
    stage, at full resolution), overwrite a `size` x `size` block of features in one corner with
    its diagonal neighbour block, and decode the rest. Score the PSNR (`metrics.psnr`, dB) of the
    image's interior (`margin` px from every edge, default an eighth of the side) against `inputs`.
    A decoder whose GroupNorm statistics lean on a spike it writes into one corner (StyleGAN2's
    "droplet" artefact, Karras et al. 2020, section 2) loses decibels far from that corner; a
    corner that holds only its own content changes nothing in the interior.

    Returns {"base": interior PSNR of the plain decode, corner: interior PSNR with that corner's
    features overwritten (for each of CORNERS), "stage", "size", "margin"}.
    """
    x = _check_images(inputs, "inputs")
    d = getattr(vae, "decoder", None)
    if d is None or not hasattr(d, "up_blocks"):
        raise ValueError(f"vae must be a diffusers AutoencoderKL, got {type(vae).__name__}")
    n_stages = len(d.up_blocks)
    stage = n_stages - 1 if stage is None else stage
    if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage < n_stages:
        raise ValueError(f"stage must be an int in [0, {n_stages - 1}], got {stage!r}")
    size = positive_int(size, "size")
    p = next(vae.parameters())
    z = vae.encode(x.to(p.device, p.dtype)).latent_dist.mean
    h = decoder_features(vae, z, stage)
    side = min(h.shape[-2:])
    if 2 * size > side:
        raise ValueError(f"size must be at most half the features' side at stage {stage} ({side // 2}), got {size}")
    H, W = x.shape[-2:]
    margin = min(H, W) // 8 if margin is None else positive_int(margin, "margin")
    if 2 * margin >= min(H, W):
        raise ValueError(f"margin must be under half the image side ({min(H, W) // 2}), got {margin}")

    inner = (..., slice(margin, H - margin), slice(margin, W - margin))

    def interior_psnr(out: torch.Tensor) -> float:
        return float(psnr(out.float().cpu().clamp(-1, 1)[inner], x.cpu()[inner]).mean())

    fh, fw = h.shape[-2:]
    out = {"base": interior_psnr(decoder_rest(vae, h, stage)), "stage": stage, "size": size, "margin": margin}
    for name in CORNERS:
        top, left = name.startswith("top"), name.endswith("left")
        ys = slice(0, size) if top else slice(fh - size, fh)
        xs = slice(0, size) if left else slice(fw - size, fw)
        ys2 = slice(size, 2 * size) if top else slice(fh - 2 * size, fh - size)
        xs2 = slice(size, 2 * size) if left else slice(fw - 2 * size, fw - size)
        g = h.clone()
        g[..., ys, xs] = h[..., ys2, xs2]
        out[name] = interior_psnr(decoder_rest(vae, g, stage))
    return out


@torch.no_grad()
def margin_decode(vae, latents: torch.Tensor, margin: int = 1, corner: str = "top_left") -> torch.Tensor:
    """`vae.decode(latents).sample`, decoded with a margin of repeated latents and cropped back.

    Pads `margin` latent cells (edge values repeated) on the two sides that meet at `corner`,
    decodes the larger canvas and crops the margin off again. A decoder that writes its
    normalisation spike into that corner (`corner_dependence`) then writes it into the margin,
    which is thrown away. latents: (B, C, h, w) unscaled, as `vae.decode` takes them; margin 0
    is a plain decode. Costs one more row and column of latents per margin cell to decode.
    """
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a (B, C, h, w) tensor, got {shape}")
    channels = getattr(getattr(vae, "config", None), "latent_channels", None)
    if channels is None or not hasattr(vae, "decode"):
        raise ValueError(f"vae must be a diffusers AutoencoderKL, got {type(vae).__name__}")
    if latents.shape[1] != channels:
        raise ValueError(f"latents must have the VAE's {channels} channels, got {latents.shape[1]}")
    if corner not in CORNERS:
        raise ValueError(f"corner must be one of {CORNERS}, got {corner!r}")
    if not isinstance(margin, int) or isinstance(margin, bool) or margin < 0:
        raise ValueError(f"margin must be an int >= 0 (latent cells), got {margin!r}")
    if margin == 0:
        return vae.decode(latents).sample
    top, left = corner.startswith("top"), corner.endswith("left")
    pad = (margin if left else 0, 0 if left else margin, margin if top else 0, 0 if top else margin)
    padded = torch.nn.functional.pad(latents, pad, mode="replicate")
    images = vae.decode(padded).sample
    f = images.shape[-1] // padded.shape[-1]                        # the VAE's downsampling factor
    h, w = latents.shape[-2] * f, latents.shape[-1] * f
    y0, x0 = (margin * f if top else 0), (margin * f if left else 0)
    return images[..., y0:y0 + h, x0:x0 + w]
