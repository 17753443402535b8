"""Moving through the latent spaces of Stable Diffusion: interpolation, arithmetic, DDIM inversion.

Introduced in chapter 7 (latent space and inversion). Three spaces, one module:

* the *noise* space (x_T, what the sampler starts from): `lerp`, `slerp`, `interpolate`;
* the *text* space (the (B, 77, D) prompt embeddings): `interpolate_prompts`;
* the *image-latent* space (the VAE's scaled latents x_0): `encode`, `decode`, `interpolate_images`.

DDIM inversion runs the deterministic DDIM update backwards, x_0 -> x_T, with diffusers'
`DDIMInverseScheduler` (`invert`); `regenerate` runs the same schedule forwards through
`StableDiffusionPipeline.__call__`. Negative-prompt inversion (Miyake et al., arXiv 2305.16807) is
`regenerate(..., negative_prompt=<the source prompt>)`: the unconditional branch gets the source
prompt, so guidance changes nothing until the prompt changes. `diffedit_pipeline` builds
diffusers' `StableDiffusionDiffEditPipeline` from a text-to-image pipeline's components.

    python -m ldm_tutorial.inversion --sweep --threads 1    # ldm_tutorial/results/latent_space.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from . import checks

DOT_THRESHOLD = 0.9995      # |cos| above this: the vectors are parallel and slerp is lerp


# ---------------------------------------------------------------------------------------------
# 1. Interpolation
# ---------------------------------------------------------------------------------------------

def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    for name, v in (("a", a), ("b", b)):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise ValueError(f"{name} must be a floating-point torch.Tensor, got {type(v).__name__}")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def _weight(t) -> float:
    return checks.finite_number(t, "t", 0.0, 1.0)


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """(1 - t) a + t b. For two independent Gaussians the midpoint's norm is |a| / sqrt(2)."""
    a, b = _pair(a, b)
    t = _weight(t)
    return (1 - t) * a + t * b


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = DOT_THRESHOLD) -> torch.Tensor:
    """Spherical interpolation: along the great circle from a to b, the whole tensor as one vector.

    slerp(a, b, t) = sin((1 - t) theta) / sin(theta) a + sin(t theta) / sin(theta) b, with theta the
    angle between a and b. When |a| = |b| every point has that norm (lerp's shrink toward the
    centre of the Gaussian shell is what slerp avoids). Nearly parallel vectors (cos > dot_threshold)
    fall back to lerp, where sin(theta) ~ 0 would divide by zero; opposite ones have no unique great
    circle and raise.

    Args:
        a, b: tensors of the same shape (e.g. two (1, 4, 16, 16) noise latents).
        t: in [0, 1]; t = 0 returns a, t = 1 returns b (exactly).
    """
    a, b = _pair(a, b)
    t = _weight(t)
    dot_threshold = checks.finite_number(dot_threshold, "dot_threshold", 0.0, 1.0)
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    na, nb = a.double().norm(), b.double().norm()
    if na == 0 or nb == 0:
        raise ValueError("slerp needs non-zero a and b (the angle to a zero vector is undefined)")
    cos = float((a.double().flatten() @ b.double().flatten()) / (na * nb))
    if cos > dot_threshold:
        return lerp(a, b, t)
    if cos < -dot_threshold:
        raise ValueError(f"a and b point in opposite directions (cos = {cos:.6f}): no unique great circle; "
                         "use lerp or perturb one of them")
    theta = math.acos(cos)
    wa, wb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return (wa * a.double() + wb * b.double()).to(a.dtype)


def interpolate(a: torch.Tensor, b: torch.Tensor, n: int, method: str = "slerp") -> torch.Tensor:
    """n frames from a to b (both included), stacked on a new first dimension: (n, *a.shape)."""
    n = checks.positive_int(n, "n")
    if n < 2:
        raise ValueError(f"n must be at least 2 (the two endpoints), got {n}")
    fn = {"lerp": lerp, "slerp": slerp}.get(method)
    if fn is None:
        raise ValueError(f"method must be 'lerp' or 'slerp', got {method!r}")
    return torch.stack([fn(a, b, i / (n - 1)) for i in range(n)])


def frame_distances(frames: torch.Tensor) -> torch.Tensor:
    """Root-mean-square distance between consecutive frames: (n - 1,). Smooth paths have even steps."""
    if not isinstance(frames, torch.Tensor) or frames.ndim < 2 or len(frames) < 2:
        raise ValueError("frames must be a tensor of at least 2 frames stacked on dim 0, got "
                         f"{tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__}")
    return (frames[1:] - frames[:-1]).float().flatten(1).pow(2).mean(1).sqrt()


# ---------------------------------------------------------------------------------------------
# 2. Images in and out of the VAE's latent space
# ---------------------------------------------------------------------------------------------

def _as_images(image, name: str = "image") -> torch.Tensor:
    """Images as a (B, 3, H, W) float tensor in [-1, 1], through the editing helpers' one rule
    (`ldm_tutorial.editing.as_image`: PIL of any mode, uint8 arrays, float ranges checked)."""
    from .editing import as_image  # noqa: PLC0415

    return as_image(image, name=name, multiple=8)


@torch.no_grad()
def encode(pipe, image) -> torch.Tensor:
    """Scaled VAE latents (B, 4, H/8, W/8) of images: the posterior's mean times scaling_factor."""
    images = _as_images(image).to(pipe.vae.device, pipe.vae.dtype)
    return pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] from scaled latents."""
    return pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)


@torch.no_grad()
def interpolate_images(pipe, image_a, image_b, n: int, method: str = "lerp") -> torch.Tensor:
    """Decoded frames (n, 3, H, W) of a path between two images' VAE latents (no diffusion)."""
    za, zb = encode(pipe, image_a), encode(pipe, image_b)
    if za.shape != zb.shape:
        raise ValueError(f"image_a and image_b must have the same size, got latents {tuple(za.shape)} "
                         f"and {tuple(zb.shape)}")
    return decode(pipe, interpolate(za[0], zb[0], n, method))


def prompt_embeds(pipe, prompt) -> torch.Tensor:
    """(B, 77, D) text-encoder states, as `StableDiffusionPipeline.encode_prompt` makes them."""
    from .sampling import encode_prompt  # noqa: PLC0415

    with torch.no_grad():
        return encode_prompt(pipe.tokenizer, pipe.text_encoder, checks.prompts(prompt), pipe.device)


def interpolate_prompts(pipe, prompt_a: str, prompt_b: str, n: int, method: str = "slerp") -> torch.Tensor:
    """n prompt embeddings (n, 77, D) from prompt_a's to prompt_b's; feed them as `prompt_embeds`."""
    ea, eb = prompt_embeds(pipe, prompt_a)[0], prompt_embeds(pipe, prompt_b)[0]
    return interpolate(ea, eb, n, method)


# ---------------------------------------------------------------------------------------------
# 3. DDIM inversion and regeneration
# ---------------------------------------------------------------------------------------------

@dataclass
class InversionOutput:
    latents: torch.Tensor                      # (B, 4, h, w): x_T, the noise that regenerates the image
    image_latents: torch.Tensor                # (B, 4, h, w): x_0, the VAE latents inverted
    timesteps: list[int]                       # the inverse scheduler's, ascending
    trajectory: list[torch.Tensor] = field(default_factory=list)   # x after each step, x_0 first


def inverse_scheduler(pipe):
    """diffusers' DDIMInverseScheduler with the pipeline's DDIM configuration (as DiffEdit's docs build it)."""
    from diffusers import DDIMInverseScheduler  # noqa: PLC0415

    return DDIMInverseScheduler.from_config(pipe.scheduler.config)


@torch.no_grad()
def invert(pipe, image, prompt, num_inference_steps: int = 50, guidance_scale: float = 1.0,
           negative_prompt: str | list[str] | None = "", latents: torch.Tensor | None = None) -> InversionOutput:
    """DDIM inversion: the noise x_T from which DDIM with the same prompt and steps redraws `image`.

    Each step runs the U-Net at the next (higher) timestep on the current latents and moves there
    with `DDIMInverseScheduler.step`, the DDIM update solved the other way. It is exact only in the
    limit of small steps (the U-Net's prediction at t stands in for the one at t + dt) and only if
    the noise predictions are the ones regeneration will use: guidance above 1 amplifies the error.

    Args:
        pipe: a StableDiffusionPipeline (its VAE, tokenizer, text encoder, U-Net and DDIM scheduler).
        image: PIL image(s), (H, W, 3) uint8 array(s) or (B, 3, H, W) tensor in [-1, 1]
            (converted by `ldm_tutorial.editing.as_image`). Ignored when `latents` is given.
        prompt: the prompt the image is inverted under (a string or one per image).
        num_inference_steps: DDIM steps (the same count regenerates).
        guidance_scale: w of classifier-free guidance during inversion; 1 (no guidance) is standard.
        negative_prompt: the unconditional branch's prompt when guidance_scale > 1.
        latents: optional scaled VAE latents (B, 4, h, w) to invert instead of encoding `image`.
    Returns:
        InversionOutput with `latents` (x_T) and the trajectory x_0 ... x_T.
    """
    prompts = checks.prompts(prompt)
    num_inference_steps = checks.positive_int(num_inference_steps, "num_inference_steps")
    guidance_scale = checks.finite_number(guidance_scale, "guidance_scale")
    negatives = checks.negative_prompts(negative_prompt, len(prompts))
    x = encode(pipe, image) if latents is None else latents.to(pipe.unet.device, pipe.unet.dtype)
    if len(x) != len(prompts):
        if len(prompts) != 1:
            raise ValueError(f"prompt must be one string or one per image ({len(x)}), got {len(prompts)}")
        prompts, negatives = prompts * len(x), negatives * len(x)
    cond = prompt_embeds(pipe, prompts)
    do_cfg = guidance_scale > 1.0
    embeds = torch.cat([prompt_embeds(pipe, negatives), cond]) if do_cfg else cond

    scheduler = inverse_scheduler(pipe)
    scheduler.set_timesteps(num_inference_steps, device=pipe.unet.device)
    trajectory = [x.detach().cpu()]
    image_latents = x
    for t in scheduler.timesteps:                                         # ascending: 1, 21, ... 981
        latent_model_input = torch.cat([x] * 2) if do_cfg else x              # (2B, C, h, w)
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        noise_pred = pipe.unet(latent_model_input, t, encoder_hidden_states=embeds).sample
        if do_cfg:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        x = scheduler.step(noise_pred, t, x).prev_sample
        trajectory.append(x.detach().cpu())
    return InversionOutput(latents=x, image_latents=image_latents,
                           timesteps=[int(t) for t in scheduler.timesteps], trajectory=trajectory)


@torch.no_grad()
def regenerate(pipe, latents: torch.Tensor, prompt, num_inference_steps: int = 50, guidance_scale: float = 1.0,
               negative_prompt: str | list[str] | None = "", output_type: str = "pt") -> torch.Tensor:
    """DDIM from given noise latents with `StableDiffusionPipeline.__call__` (eta 0, deterministic).

    Returns images (B, 3, H, W) in [-1, 1] (output_type "pt") or scaled latents ("latent").
    `negative_prompt=<the source prompt>` is negative-prompt inversion's regeneration.
    """
    prompts = checks.prompts(prompt)
    num_inference_steps = checks.positive_int(num_inference_steps, "num_inference_steps")
    guidance_scale = checks.finite_number(guidance_scale, "guidance_scale")
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        raise ValueError("latents must be a (B, C, h, w) tensor (InversionOutput.latents), got "
                         f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
    if len(prompts) == 1 and len(latents) > 1:
        prompts = prompts * len(latents)
    negatives = checks.negative_prompts(negative_prompt, len(prompts))
    if output_type not in ("pt", "latent"):
        raise ValueError(f"output_type must be 'pt' or 'latent', got {output_type!r}")
    out = pipe(prompt_embeds=prompt_embeds(pipe, prompts), negative_prompt_embeds=prompt_embeds(pipe, negatives),
               latents=latents, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
               output_type="latent", eta=0.0)
    return out.images if output_type == "latent" else decode(pipe, out.images)


def negative_prompt_inversion(pipe, image, prompt, target_prompt=None, num_inference_steps: int = 50,
                              guidance_scale: float = 7.5) -> torch.Tensor:
    """Negative-prompt inversion (Miyake et al., arXiv 2305.16807): invert without guidance, then
    regenerate with guidance whose negative prompt is the source prompt.

    With `target_prompt` None it reconstructs: the two branches see the same prompt, so the guided
    prediction equals the conditional one and guidance cannot push the path off the inverted one.
    With a target prompt, guidance pushes from the source prompt toward the target: an edit.
    Costs nothing beyond plain inversion (null-text inversion's per-step optimisation is skipped).
    Returns images (B, 3, H, W) in [-1, 1].
    """
    inv = invert(pipe, image, prompt, num_inference_steps=num_inference_steps, guidance_scale=1.0)
    return regenerate(pipe, inv.latents, prompt if target_prompt is None else target_prompt,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      negative_prompt=prompt)


# ---------------------------------------------------------------------------------------------
# 4. DiffEdit
# ---------------------------------------------------------------------------------------------

def diffedit_pipeline(pipe):
    """diffusers' StableDiffusionDiffEditPipeline on a text-to-image pipeline's own components.

    It needs the DDIM scheduler (to denoise) and a DDIMInverseScheduler (to invert); the pipeline
    sits in diffusers' `deprecated` folder since 0.33, so its import warning is silenced here.
    """
    from diffusers.utils import logging as diffusers_logging  # noqa: PLC0415

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()          # its constructor logs "has been deprecated"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from diffusers import StableDiffusionDiffEditPipeline  # noqa: PLC0415

            edit = StableDiffusionDiffEditPipeline(
                vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                scheduler=pipe.scheduler, inverse_scheduler=inverse_scheduler(pipe), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
    finally:
        diffusers_logging.set_verbosity(level)
    edit.set_progress_bar_config(disable=True)
    return edit


def diffedit_mask(edit, image, source_prompt: str, target_prompt: str, num_inference_steps: int = 50,
                  seed: int = 0, **kwargs) -> np.ndarray:
    """DiffEdit's inferred mask (h, w) bool on the latent grid, for one image in [-1, 1] (3, H, W).

    `generate_mask` adds noise at `mask_encode_strength`, predicts it under both prompts and keeps
    the latent cells where the predictions differ most. diffusers wants tensor images in [0, 1].
    """
    images = _as_images(image)
    if len(images) != 1:
        raise ValueError(f"image must be one image, got a batch of {len(images)}")
    mask = edit.generate_mask(image=(images + 1) / 2, source_prompt=source_prompt, target_prompt=target_prompt,
                              num_inference_steps=checks.positive_int(num_inference_steps, "num_inference_steps"),
                              generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    return mask[0] > 0.5


def mask_iou(a, b) -> float:
    """Intersection over union of two boolean masks of the same shape (1.0 when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks must have the same shape, got {a.shape} and {b.shape}")
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def object_mask_latent(mask: np.ndarray, factor: int = 8, min_fraction: float = 0.25) -> np.ndarray:
    """A pixel mask (H, W) down to the latent grid (H/f, W/f): a cell is in when >= min_fraction of it is."""
    mask = np.asarray(mask, dtype=float)
    h, w = mask.shape
    if h % factor or w % factor:
        raise ValueError(f"mask's sides must be multiples of factor={factor}, got {mask.shape}")
    cells = mask.reshape(h // factor, factor, w // factor, factor).mean((1, 3))
    return cells >= min_fraction


# ---------------------------------------------------------------------------------------------
# 5. The committed sweep
# ---------------------------------------------------------------------------------------------

SWEEP_SEED = 12_000          # held-out scenes (TinySD trained on seeds below 10_000)


def _psnr(a, b) -> list[float]:
    from .metrics import psnr  # noqa: PLC0415

    return [round(float(v), 3) for v in psnr(a, b)]


def _summary(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": round(float(v.mean()), 3), "std": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 3),
            "min": round(float(v.min()), 3), "n": int(len(v))}


def recolour_pairs(n: int, seed: int, source: str = "blue", target: str = "red", n_objects: int = 1,
                   position: str | None = None, shape: str | None = None, size: str | None = None):
    """n (scene, scene with object 0 recoloured source -> target) pairs, everything else equal.

    Object 0 takes `position`, `shape` and `size` when given (backgrounds and the other objects stay
    random; no other object shares its cell, and none is `source` or `target` coloured).
    """
    from .tinysd import shapes  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < n:
        (scene,) = shapes.sample_scenes(1, seed=int(rng.integers(1 << 30)), n_objects=n_objects)
        if any(o.colour in (source, target) for o in scene.objects):
            continue
        objs = list(scene.objects)
        first = {"shape": shape or objs[0].shape, "size": size or objs[0].size,
                 "position": position or objs[0].position}
        if any(o.position == first["position"] for o in objs[1:]):
            continue
        a, b = shapes.SceneObject(source, **first), shapes.SceneObject(target, **first)
        pairs.append((shapes.Scene(**{**scene.__dict__, "objects": [a] + objs[1:]}),
                      shapes.Scene(**{**scene.__dict__, "objects": [b] + objs[1:]})))
    return pairs


DIRECTION_OBJECT = {"shape": "circle", "size": "large", "position": "centre"}


def sweep(pipe=None, n: int = 16, steps: tuple[int, ...] = (10, 25, 50),
          scales: tuple[float, ...] = (1.0, 2.0, 4.0, 7.5), edit_steps: int = 25, batch: int = 8,
          n_direction: int = 16, n_diffedit: int = 16, seed: int = SWEEP_SEED) -> dict:
    """The latent-space chapter's committed measurements (see benchmarks/latent_space.md)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    from .models import load_pipeline  # noqa: PLC0415
    from .tinysd import parser, shapes  # noqa: PLC0415
    from .metrics import psnr  # noqa: PLC0415
    from .tinysd.evaluate import fully_correct  # noqa: PLC0415

    pipe = load_pipeline("tiny", verbose=False) if pipe is None else pipe
    pipe.set_progress_bar_config(disable=True)
    t_start = time.perf_counter()
    scenes = shapes.sample_scenes(n, seed=seed)
    images = shapes.render(scenes)
    prompts = [shapes.describe(s) for s in scenes]
    chunks = [slice(i, i + batch) for i in range(0, n, batch)]
    z0 = torch.cat([encode(pipe, images[c]) for c in chunks])
    ceiling = _psnr(decode(pipe, z0), images)
    out: dict = {"n_scenes": n, "scene_seed": seed, "vae_ceiling": _summary(ceiling)}

    def round_trip(k, inv_w, gen_w, neg_is_source=False):
        vals = []
        for c in chunks:
            inv = invert(pipe, None, prompts[c], k, inv_w, latents=z0[c])
            rec = regenerate(pipe, inv.latents, prompts[c], k, gen_w,
                             negative_prompt=prompts[c] if neg_is_source else "")
            vals += _psnr(rec, images[c])
        return vals

    jobs = [("steps", k, 1.0) for k in steps] + [("scales", edit_steps, w) for w in scales if w != 1.0]
    bar = tqdm(total=len(jobs) + len([w for w in scales if w != 1.0]) + 4, desc="latent_space sweep")
    out["psnr_vs_steps"] = {}
    for _, k, _ in jobs[:len(steps)]:
        out["psnr_vs_steps"][str(k)] = _summary(round_trip(k, 1.0, 1.0))
        bar.update()
    out["psnr_vs_guidance"] = {"steps": edit_steps, "invert_and_regenerate_at_w": {},
                               "invert_at_1_regenerate_at_w": {}, "negative_prompt_inversion": {}}
    base = out["psnr_vs_steps"].get(str(edit_steps)) or _summary(round_trip(edit_steps, 1.0, 1.0))
    for w in scales:
        g = out["psnr_vs_guidance"]
        if w == 1.0:
            for key in g:
                if key != "steps":
                    g[key]["1.0"] = base
            continue
        g["invert_and_regenerate_at_w"][str(w)] = _summary(round_trip(edit_steps, w, w))
        bar.update()
        g["invert_at_1_regenerate_at_w"][str(w)] = _summary(round_trip(edit_steps, 1.0, w))
        bar.update()
        if w == max(scales):           # equal to w = 1 by construction; measured once to show it
            g["negative_prompt_inversion"][str(w)] = _summary(round_trip(edit_steps, 1.0, w, True))
            bar.update()

    # Edits: change one object's colour in the prompt after inverting (one-object scenes)
    pairs = recolour_pairs(n, seed + 1)
    src = shapes.render([a for a, _ in pairs])
    src_p = [shapes.describe(a) for a, _ in pairs]
    tgt_p = [shapes.describe(b) for _, b in pairs]
    edits = {}
    inverted = [invert(pipe, src[c], src_p[c], edit_steps, 1.0).latents for c in chunks]   # once
    for name, w, neg_src in (("ddim_w1", 1.0, False), ("ddim_w7.5", 7.5, False), ("npi_w7.5", 7.5, True)):
        ok, keep = [], []
        for c, x_T in zip(chunks, inverted):
            img = regenerate(pipe, x_T, tgt_p[c], edit_steps, w,
                             negative_prompt=src_p[c] if neg_src else "")
            for im, s, (_, b) in zip(img, src[c], pairs[c]):
                ok.append(fully_correct(parser.parse_scene(im), b.objects))
                objs = parser.parse_scene(s)
                bg = ~torch.from_numpy(np.any([o.mask for o in objs], 0) if objs else np.zeros(im.shape[1:], bool))
                keep.append(round(float(psnr(im[None], s[None], mask=bg[None, None])), 3))
        edits[name] = {"edit_correct": round(float(np.mean(ok)), 3), "background_psnr": _summary(keep), "n": n}
    out["prompt_edit"] = {"steps": edit_steps, "source": "blue", "target": "red", **edits}
    bar.update()

    # DiffEdit: the inferred mask against the parser's object mask (latent grid)
    edit = diffedit_pipeline(pipe)
    ious = []
    for (a, b), s in zip(pairs[:n_diffedit], src[:n_diffedit]):
        mask = diffedit_mask(edit, s, shapes.describe(a), shapes.describe(b), edit_steps)
        truth = object_mask_latent(parser.parse_scene(s)[0].mask, pipe.vae_scale_factor)
        ious.append(round(mask_iou(mask, truth), 3))
    out["diffedit_iou"] = {**_summary(ious), "values": ious, "steps": edit_steps}
    bar.update()

    out["direction"] = colour_direction_study(pipe, n_direction, seed + 2, edit_steps, batch)
    bar.update()
    bar.close()
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    return out


@torch.no_grad()
def colour_direction(pipe, pairs, space: str = "vae", num_inference_steps: int = 25, batch: int = 8) -> torch.Tensor:
    """Mean latent difference (target minus source) over pairs of scenes: (4, h, w).

    space "vae": the VAE latents x_0; "noise": the DDIM-inverted x_T (no guidance, each scene's prompt).
    """
    from .tinysd import shapes  # noqa: PLC0415

    if space not in ("vae", "noise"):
        raise ValueError(f"space must be 'vae' or 'noise', got {space!r}")
    diffs = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        za = encode(pipe, shapes.render([a for a, _ in chunk]))
        zb = encode(pipe, shapes.render([b for _, b in chunk]))
        if space == "noise":
            za = invert(pipe, None, [shapes.describe(a) for a, _ in chunk], num_inference_steps, latents=za).latents
            zb = invert(pipe, None, [shapes.describe(b) for _, b in chunk], num_inference_steps, latents=zb).latents
        diffs.append(zb - za)
    return torch.cat(diffs).mean(0)


def colour_direction_study(pipe, n: int, seed: int, num_inference_steps: int = 25, batch: int = 8) -> dict:
    """A blue -> red direction from n pairs of a large circle in the centre (backgrounds vary), added
    to new scenes in the VAE latents and in the inverted noise; the parser scores each result.

    Test sets: "matched" (a large blue circle in the centre, new backgrounds), "other_cell" (the
    same circle in another cell) and "two_objects" (the matched circle plus one other object).
    """
    from .tinysd import parser, shapes  # noqa: PLC0415
    from .tinysd.evaluate import fully_correct  # noqa: PLC0415

    train = recolour_pairs(n, seed, **DIRECTION_OBJECT)
    tests = {"matched": recolour_pairs(n, seed + 1, **DIRECTION_OBJECT),
             "other_cell": recolour_pairs(n, seed + 2, shape="circle", size="large",
                                          position=str(np.random.default_rng(seed).choice(
                                              ["top left", "top right", "bottom left", "bottom right"]))),
             "two_objects": recolour_pairs(n, seed + 3, n_objects=2, **DIRECTION_OBJECT)}
    res = {"n_pairs": n, "object": DIRECTION_OBJECT, "steps": num_inference_steps}
    for space in ("vae", "noise"):
        d = colour_direction(pipe, train, space, num_inference_steps, batch)
        res[space] = {"direction_rms": round(float(d.pow(2).mean().sqrt()), 4)}
        for name, test in tests.items():
            ok, unchanged = [], []
            for i in range(0, n, batch):
                chunk = test[i:i + batch]
                z = encode(pipe, shapes.render([a for a, _ in chunk]))
                if space == "noise":
                    prompts = [shapes.describe(a) for a, _ in chunk]
                    z = invert(pipe, None, prompts, num_inference_steps, latents=z).latents
                    img = regenerate(pipe, z + d, prompts, num_inference_steps)
                else:
                    img = decode(pipe, z + d)
                for im, (a, b) in zip(img, chunk):
                    parsed = parser.parse_scene(im)
                    ok.append(fully_correct(parsed, b.objects))
                    unchanged.append(fully_correct(parsed, a.objects))
            res[space][name] = {"edited": round(float(np.mean(ok)), 3), "unchanged": round(float(np.mean(unchanged)), 3)}
    return res


def markdown(res: dict, seconds: float, machine: str, date: str | None = None) -> str:
    lines = ["# Latent space and inversion: the committed sweep", "",
             f"`python -m ldm_tutorial.inversion --sweep --threads 1` on {machine}, "
             f"{date or datetime.date.today().isoformat()}, {seconds:.0f} s in all. TinySD, held-out scenes "
             f"(seed {res['scene_seed']}), n = {res['n_scenes']} per cell. PSNR in dB against the source image.", "",
             f"VAE round trip (the ceiling): {res['vae_ceiling']['mean']:.2f} dB "
             f"(std {res['vae_ceiling']['std']:.2f}).", "",
             "## DDIM inversion without guidance, against the number of steps", "",
             "| steps | PSNR mean | std | min |", "|---|---|---|---|"]
    for k, s in res["psnr_vs_steps"].items():
        lines.append(f"| {k} | {s['mean']:.2f} | {s['std']:.2f} | {s['min']:.2f} |")
    g = res["psnr_vs_guidance"]
    lines += ["", f"## Against the guidance scale w ({g['steps']} steps)", "",
              "| w | invert and regenerate at w | invert at 1, regenerate at w | negative-prompt inversion |",
              "|---|---|---|---|"]
    for w in g["invert_and_regenerate_at_w"]:
        npi = g["negative_prompt_inversion"].get(w)
        lines.append(f"| {w} | {g['invert_and_regenerate_at_w'][w]['mean']:.2f} | "
                     f"{g['invert_at_1_regenerate_at_w'][w]['mean']:.2f} | "
                     + (f"{npi['mean']:.2f}" if npi else "(= w 1)") + " |")
    e = res["prompt_edit"]
    lines += ["", f"## Edit by prompt after inversion ({e['source']} -> {e['target']}, one object)", "",
              "| regeneration | edit correct (parser) | background PSNR |", "|---|---|---|"]
    for k in ("ddim_w1", "ddim_w7.5", "npi_w7.5"):
        lines.append(f"| {k} | {e[k]['edit_correct']:.2f} | {e[k]['background_psnr']['mean']:.2f} |")
    d = res["diffedit_iou"]
    lines += ["", f"## DiffEdit mask against the parser's object mask (16x16 grid, n = {d['n']})", "",
              f"IoU mean {d['mean']:.3f}, std {d['std']:.3f}, min {d['min']:.3f}.", ""]
    c = res["direction"]
    lines += [f"## A blue -> red direction from {c['n_pairs']} pairs ({c['object']}), added to new scenes", "",
              "Share the parser reads as the edited scene (and as the unchanged source).", "",
              "| space | matched | other cell | two objects |", "|---|---|---|---|"]
    for sp in ("vae", "noise"):
        lines.append(f"| {sp} | " + " | ".join(f"{c[sp][k]['edited']:.2f} ({c[sp][k]['unchanged']:.2f})"
                                              for k in ("matched", "other_cell", "two_objects")) + " |")
    load = res.get("load_average")
    lines += ["", "## Notes", ""]
    if load:
        lines.append(f"- Load average when the sweep ended: {', '.join(f'{v:.1f}' for v in load)} (1, 5, 15 min) "
                     f"on {os.cpu_count()} cores: the seconds are those of a shared machine.")
    lines += [
              "- Every run is deterministic (DDIM, eta 0; VAE posterior means; fixed scene seeds), so a rerun "
              "on any CPU gives the same figures up to float rounding.",
              "- Negative-prompt inversion is measured at the largest w only: with the source prompt as the "
              "negative, both branches predict the same noise, so it equals the w = 1 row at every w "
              "(the chapter asserts this live).",
              "- Edits: scenes with one blue object, inverted without guidance under their prompt and "
              "regenerated under the prompt with 'red'; 'edit correct' is the parser reading exactly the "
              "target scene; background PSNR is outside the parser's object masks of the source.",
              "- DiffEdit: `generate_mask` with its defaults (10 noise maps, mask_encode_strength 0.5, "
              "threshold ratio 3), seed 0; the truth is the parser's object mask, a latent cell counted "
              "when a quarter of its 8x8 pixels are object.",
              "- The direction: mean latent difference over pairs of the same large circle in the centre, "
              "red minus blue, on random backgrounds; 'matched' tests put a new such circle on a "
              "new background, 'other_cell' moves it to a corner, 'two_objects' adds a second object. In "
              "brackets: the share still read as the unedited source."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from .results import path  # noqa: PLC0415
    from .runtime import cpu_name  # noqa: PLC0415

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="run the chapter's committed sweep")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=24, help="scenes per cell")
    ap.add_argument("--out", default=str(path("latent_space")))
    ap.add_argument("--markdown", default="benchmarks/latent_space.md")
    ap.add_argument("--report", action="store_true", help="rewrite --markdown from the committed JSON")
    args = ap.parse_args(argv)
    if args.report:
        with open(args.out) as f:
            res = json.load(f)
        with open(args.markdown, "w") as f:
            f.write(markdown(res, res["seconds"], res["machine"], res.get("date")))
        return res
    if not args.sweep:
        ap.error("nothing to do: pass --sweep (or --report)")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    res = sweep(n=args.n)
    res["machine"] = f"{cpu_name()}, {args.threads} thread(s)"
    res["date"] = datetime.date.today().isoformat()
    res["load_average"] = [round(v, 2) for v in os.getloadavg()]
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    with open(args.markdown, "w") as f:
        f.write(markdown(res, res["seconds"], res["machine"], res["date"]))
    print(json.dumps({k: res[k] for k in ("vae_ceiling", "psnr_vs_steps", "seconds")}, indent=1))
    return res


if __name__ == "__main__":
    main()
