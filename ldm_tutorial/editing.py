"""Image editing with Stable Diffusion: img2img (SDEdit) and inpainting (chapter 6).

`img2img` and `inpaint` check every input before diffusers sees it, run the real diffusers
pipelines (`StableDiffusionImg2ImgPipeline`, `StableDiffusionInpaintPipeline`) and say what they
did. Their input rules are small public functions that other helpers reuse:

* `as_image(image)` -> a (B, 3, H, W) float32 tensor in [-1, 1], the range the VAE encodes.
  - PIL images of any mode: RGB as is; L, 1, P, CMYK... converted to RGB with a note naming the
    mode; a mode with alpha (RGBA, LA, PA, P with transparency) is composited over WHITE (a
    transparent pixel becomes white, as an image viewer shows it; PIL's and diffusers'
    `convert("RGB")` would instead keep the colour stored under it, often black).
  - uint8 (or any integer) arrays/tensors hold 0..255 and are scaled to [-1, 1].
  - float arrays/tensors are read as [-1, 1], the package's convention (what `shapes.render`
    and `vae.decode` give); values outside it raise, with the range found. A float image with no
    negative value is accepted but noted: a [0, 1] image read as [-1, 1] is a washed-out one
    (pass `image * 2 - 1`).
  - layouts: torch (3, H, W) or (B, 3, H, W); numpy HWC (H, W, 3) or (B, H, W, 3), the layout
    PIL and matplotlib use; a list of PIL images or arrays of one size is a batch. Anything
    with 1 or 4 channels raises: a 4-channel tensor is what diffusers takes for latents.
  - size: height and width must be multiples of the VAE's factor (8). Other sizes raise with
    the nearest valid sizes below and above; nothing is resized or cropped silently.
* `as_mask(mask, size)` -> a (B, 1, H, W) float32 tensor of 0s and 1s; 1 (white) = repaint,
  0 (black) = keep, as diffusers' mask processor reads it.
  - PIL "L" or "1"; bool arrays/tensors; integer arrays/tensors 0..255 (a 0/1 integer mask
    raises: divided by 255 it would repaint nothing); float arrays/tensors in [0, 1].
  - soft values are thresholded at 0.5 exactly as diffusers does (`< 0.5` -> 0, else 1), with a
    note counting them: the pipeline never sees a soft mask.
  - layouts (H, W), (B, H, W), numpy (H, W, 1), (B, 1, H, W). The mask must have the image's
    height and width; another size or aspect ratio raises with the shape seen.
* `as_strength(strength)`: a finite number in [0, 1]. diffusers runs int(steps * strength)
  denoising steps; when that is 0 (strength 0, or below 1 / steps) diffusers fails, so `img2img`
  and `inpaint` return the VAE round trip of the image (encode, decode: no step runs) and say so.

Notes go to `warnings.warn` (UserWarning), or into a list when the caller passes `notes=`.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from . import checks

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_PIL_MODES = ("RGB", "RGBA", "L", "LA", "1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")


def _note(message: str, notes: list[str] | None) -> None:
    if notes is None:
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        notes.append(message)


def _check_size(h: int, w: int, name: str, multiple: int) -> None:
    bad = [(d, v) for d, v in (("height", h), ("width", w)) if v % multiple or v < multiple]
    if bad:
        def near(v):
            lo, hi = (v // multiple) * multiple, -(-v // multiple) * multiple
            return [s for s in sorted({lo, hi}) if s >= multiple] or [multiple]
        options = " or ".join(f"{a}x{b}" for a in near(h) for b in near(w))
        raise ValueError(f"{name} is {h}x{w} (height x width); both must be multiples of {multiple} "
                         f"(the VAE's downsampling factor): crop or resize it to {options}")


def _pil_to_array(im, name: str, notes: list[str] | None) -> np.ndarray:
    """A PIL image -> float64 (H, W, 3) in 0..255."""
    mode = im.mode
    if mode not in _PIL_MODES:
        raise ValueError(f"{name}: PIL mode {mode!r} is not an 8-bit image; convert it to 'RGB' first "
                         f"(modes read here: {', '.join(_PIL_MODES)})")
    has_alpha = mode in _ALPHA_MODES or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float64)
        alpha = rgba[..., 3:] / 255.0
        out = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        n_clear = int((alpha[..., 0] < 1).sum())
        _note(f"{name}: PIL mode {mode!r} converted to RGB; its alpha was composited over white "
              f"({n_clear} of {alpha[..., 0].size} pixels not fully opaque)", notes)
        return out
    if mode != "RGB":
        _note(f"{name}: PIL mode {mode!r} converted to RGB", notes)
    return np.asarray(im.convert("RGB"), dtype=np.float64)


def _to_tensor_bchw(value, name: str) -> tuple[torch.Tensor, bool]:
    """An array/tensor -> (float64 tensor (B, 3, H, W) with its values untouched, was_integer)."""
    is_numpy = isinstance(value, np.ndarray)
    t = torch.from_numpy(np.array(value)) if is_numpy else value.detach().cpu()
    shape = tuple(t.shape)
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold uint8 0..255 or floats in [-1, 1], got dtype {t.dtype}")
    if is_numpy:
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[-1] != 3:
            hint = " (4 channels: RGBA or latents? drop or composite the alpha)" if t.ndim == 4 and \
                t.shape[-1] == 4 else ""
            raise ValueError(f"{name}: a numpy image must be (H, W, 3) or (B, H, W, 3), got shape "
                             f"{shape}{hint}")
        t = t.permute(0, 3, 1, 2)
    else:
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[1] != 3:
            hint = ""
            if t.ndim == 4 and t.shape[1] == 4:
                hint = (" (4 channels: diffusers would take this for latents and skip the VAE; "
                        "drop or composite the alpha channel)")
            elif t.ndim == 4 and t.shape[-1] == 3:
                hint = " (channels last? use image.permute(0, 3, 1, 2))"
            raise ValueError(f"{name}: a torch image must be (3, H, W) or (B, 3, H, W), got shape "
                             f"{shape}{hint}")
    return t.to(torch.float64), not (t.is_floating_point())


def as_image(image, name: str = "image", multiple: int = 8,
             notes: list[str] | None = None) -> torch.Tensor:
    """Any image the book meets -> (B, 3, H, W) float32 in [-1, 1] (rules in the module docstring).

    Args:
        image: a PIL image, a numpy array, a torch tensor, or a list of PIL images/arrays.
        name: the parameter's name, used in messages.
        multiple: height and width must be multiples of it (the VAE's factor, 8 in SD).
        notes: where conversion notes go; None sends them to `warnings.warn`.
    Raises:
        ValueError naming `name`: wrong type, layout, dtype, value range or size.
    """
    import PIL.Image  # noqa: PLC0415

    multiple = checks.positive_int(multiple, "multiple")
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError(f"{name} must be an image or a non-empty list of images, got an empty list")
    parts = []
    for i, item in enumerate(items):
        where = f"{name}[{i}]" if isinstance(image, (list, tuple)) else name
        if isinstance(item, PIL.Image.Image):
            arr = _pil_to_array(item, where, notes)
            t = torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1.0
        elif isinstance(item, (np.ndarray, torch.Tensor)):
            t, is_int = _to_tensor_bchw(item, where)
            if t.numel() == 0:
                raise ValueError(f"{where} is empty, shape {tuple(item.shape)}")
            lo, hi = float(t.min()), float(t.max())
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"{where} holds NaN or infinite values")
            if is_int:
                if lo < 0 or hi > 255:
                    raise ValueError(f"{where}: integer images must hold 0..255, found range "
                                     f"[{lo:g}, {hi:g}]")
                t = t / 127.5 - 1.0
            else:
                if lo < -1 or hi > 1:
                    raise ValueError(f"{where}: float images must be in [-1, 1], found range "
                                     f"[{lo:.4g}, {hi:.4g}]"
                                     + (" (0..255 values? pass them as uint8)" if hi > 1.5 else ""))
                if lo >= 0:
                    _note(f"{where}: float values all in [0, 1] (range [{lo:.3g}, {hi:.3g}]) are read "
                          f"as [-1, 1], a bright image; if it is a [0, 1] image pass image * 2 - 1",
                          notes)
        else:
            raise ValueError(f"{where} must be a PIL image, a numpy array or a torch tensor, got "
                             f"{type(item).__name__}")
        parts.append(t)
    sizes = {tuple(p.shape[-2:]) for p in parts}
    if len(sizes) > 1:
        raise ValueError(f"{name}: every image of a batch must have one size, got {sorted(sizes)}")
    out = torch.cat(parts).to(torch.float32)
    _check_size(out.shape[-2], out.shape[-1], name, multiple)
    return out


def as_mask(mask, size: tuple[int, int], name: str = "mask",
            notes: list[str] | None = None) -> torch.Tensor:
    """A mask -> (B, 1, H, W) float32 of 0s and 1s; 1 (white) = repaint (rules in the module docstring).

    Args:
        mask: a PIL image ("L" or "1"), a numpy array or a torch tensor, or a list of them.
        size: (height, width) of the image the mask belongs to.
        name: the parameter's name, used in messages.
        notes: where notes go; None sends them to `warnings.warn`.
    Raises:
        ValueError naming `name`: wrong type, mode, dtype, value range, layout or size.
    """
    import PIL.Image  # noqa: PLC0415

    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"size must be (height, width) as two positive integers, got {size!r}")
    items = list(mask) if isinstance(mask, (list, tuple)) else [mask]
    if not items:
        raise ValueError(f"{name} must be a mask or a non-empty list of masks, got an empty list")
    parts = []
    for i, item in enumerate(items):
        where = f"{name}[{i}]" if isinstance(mask, (list, tuple)) else name
        if isinstance(item, PIL.Image.Image):
            if item.mode not in ("L", "1"):
                raise ValueError(f"{where}: a PIL mask must be mode 'L' or '1' (white = repaint), got "
                                 f"mode {item.mode!r}; use mask.convert('L')")
            item = np.asarray(item.convert("L"))
        if not isinstance(item, (np.ndarray, torch.Tensor)):
            raise ValueError(f"{where} must be a PIL image, a numpy array or a torch tensor, got "
                             f"{type(item).__name__}")
        is_numpy = isinstance(item, np.ndarray)
        t = torch.from_numpy(np.array(item)) if is_numpy else item.detach().cpu()
        shape = tuple(t.shape)
        if is_numpy and t.ndim == 3 and t.shape[-1] == 1:
            t = t[..., 0]
        if t.ndim == 2:
            t = t[None]
        if t.ndim == 4 and t.shape[1] == 1:
            t = t[:, 0]
        if t.ndim != 3:
            raise ValueError(f"{where} must be (H, W), (B, H, W) or (B, 1, H, W), got shape {shape}")
        if tuple(t.shape[-2:]) != tuple(size):
            raise ValueError(f"{where} is {t.shape[-2]}x{t.shape[-1]} (shape {shape}) but the image is "
                             f"{size[0]}x{size[1]} (height x width); draw or resize the mask to the "
                             f"image's size")
        if t.dtype == torch.bool:
            t = t.to(torch.float64)
        elif not t.is_floating_point():
            t = t.to(torch.float64)
            lo, hi = float(t.min()), float(t.max())
            if lo < 0 or hi > 255:
                raise ValueError(f"{where}: integer masks must hold 0..255, found range [{lo:g}, {hi:g}]")
            if hi == 1:
                raise ValueError(f"{where}: an integer mask holding only 0 and 1 is ambiguous (read as "
                                 f"0..255 it repaints nothing); pass it as bool or scale it to 0/255")
            t = t / 255.0
        else:
            t = t.to(torch.float64)
            lo, hi = float(t.min()), float(t.max())
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi > 1:
                raise ValueError(f"{where}: float masks must be in [0, 1] (1 = repaint), found range "
                                 f"[{lo:.4g}, {hi:.4g}]")
        soft = int(((t > 0) & (t < 1)).sum())
        if soft:
            _note(f"{where}: {soft} soft mask values thresholded at 0.5 (< 0.5 keep, >= 0.5 repaint), "
                  f"as diffusers' mask processor does", notes)
        parts.append((t >= 0.5).to(torch.float32)[:, None])
    return torch.cat(parts)


def as_strength(strength, name: str = "strength") -> float:
    """A finite number in [0, 1] -> float (0 is valid: `img2img` then returns the VAE round trip)."""
    return checks.finite_number(strength, name, 0.0, 1.0)


def steps_run(num_inference_steps: int, strength: float) -> int:
    """How many denoising steps img2img/inpainting runs: int(steps * strength), as diffusers' get_timesteps."""
    return min(int(num_inference_steps * strength), num_inference_steps)


@dataclass
class EditOutput:
    """What `img2img` / `inpaint` return.

    images: (B, 3, H, W) float32 in [-1, 1]. timesteps: the timesteps the U-Net ran at (empty when
    no step runs). notes: every conversion or decision, in words.
    """

    images: torch.Tensor
    timesteps: list[int]
    strength: float
    num_inference_steps: int
    notes: list[str] = field(default_factory=list)
    mask: torch.Tensor | None = None

    @property
    def steps_run(self) -> int:
        return len(self.timesteps)


def _batch(images: torch.Tensor, prompts: list[str], name: str) -> tuple[torch.Tensor, list[str]]:
    b, n = images.shape[0], len(prompts)
    if b == n:
        return images, prompts
    if b == 1:
        return images.expand(n, -1, -1, -1), prompts
    if n == 1:
        return images, prompts * b
    raise ValueError(f"{name}: {b} images and {n} prompts; give one of either, or as many of each")


def _common(pipe, prompt, negative_prompt, num_inference_steps, guidance_scale, strength):
    prompts = checks.prompts(prompt)
    steps = checks.positive_int(num_inference_steps, "num_inference_steps")
    guidance = checks.finite_number(guidance_scale, "guidance_scale")
    return prompts, steps, guidance, as_strength(strength)


@torch.no_grad()
def _vae_round_trip(pipe, x: torch.Tensor) -> torch.Tensor:
    vae = pipe.vae
    z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode()
    return vae.decode(z).sample.clamp(-1, 1).float().cpu()


def _say(out: EditOutput, verbose: bool) -> EditOutput:
    if verbose:
        for n in out.notes:
            print(f"note: {n}")
    return out


def img2img(pipe, image, prompt: str | list[str], strength: float = 0.6, num_inference_steps: int = 25,
            guidance_scale: float = 7.5, negative_prompt: str | list[str] | None = None,
            generator=None, verbose: bool = False) -> EditOutput:
    """SDEdit: noise `image` to the timestep `strength` points at, then denoise it towards `prompt`.

    Runs diffusers' `StableDiffusionImg2ImgPipeline` after checking every input here. It runs
    int(num_inference_steps * strength) steps, the last ones of the schedule; when that is 0 the
    VAE round trip of the image is returned (diffusers would fail) and a note says so.

    Args:
        pipe: a `StableDiffusionImg2ImgPipeline` (`ldm.load_pipeline(..., task="img2img")`).
        image: anything `as_image` reads; one image for several prompts, or one per prompt.
        prompt, negative_prompt, guidance_scale, generator: as in diffusers.
        strength: a finite number in [0, 1].
        verbose: print the notes.
    Returns:
        EditOutput with images (B, 3, H, W) in [-1, 1] and the timesteps that ran.
    """
    from diffusers import StableDiffusionImg2ImgPipeline  # noqa: PLC0415

    if not isinstance(pipe, StableDiffusionImg2ImgPipeline):
        raise ValueError(f"pipe must be a StableDiffusionImg2ImgPipeline (load_pipeline(..., task="
                         f"'img2img'), or StableDiffusionImg2ImgPipeline.from_pipe(pipe)), got "
                         f"{type(pipe).__name__}")
    notes: list[str] = []
    x = as_image(image, "image", pipe.vae_scale_factor, notes)
    prompts, steps, guidance, strength = _common(pipe, prompt, negative_prompt, num_inference_steps,
                                                 guidance_scale, strength)
    x, prompts = _batch(x, prompts, "image")
    negatives = checks.negative_prompts(negative_prompt, len(prompts))
    generator = checks.generators(generator, len(prompts))
    n_run = steps_run(steps, strength)
    if n_run == 0:
        notes.append(f"strength={strength:g} with {steps} steps runs int({steps} * {strength:g}) = 0 "
                     f"denoising steps (diffusers fails there); returned the VAE round trip")
        return _say(EditOutput(_vae_round_trip(pipe, x), [], strength, steps, notes), verbose)
    device = pipe.device
    out = pipe(prompt=prompts, negative_prompt=negatives, image=((x + 1) / 2).to(device),
               strength=strength, num_inference_steps=steps, guidance_scale=guidance,
               generator=generator, output_type="pt")
    timesteps = [int(t) for t in pipe.scheduler.timesteps[(steps - n_run) * pipe.scheduler.order:]]
    notes.append(f"ran {n_run} of {steps} steps, from t={timesteps[0]} down to t={timesteps[-1]}")
    images = out.images.float().cpu() * 2 - 1
    return _say(EditOutput(images, timesteps, strength, steps, notes), verbose)


def inpaint(pipe, image, mask, prompt: str | list[str], strength: float = 1.0,
            num_inference_steps: int = 25, guidance_scale: float = 7.5,
            negative_prompt: str | list[str] | None = None, generator=None,
            padding_mask_crop: int | None = None, verbose: bool = False) -> EditOutput:
    """Repaint where `mask` is 1 (white), keep where it is 0, with diffusers' inpainting pipeline.

    With a 9-channel U-Net (TinySD's inpainting model, SD's inpainting checkpoints) the U-Net sees
    the noisy latents, the mask at latent size and the masked image's latents; with a 4-channel one
    diffusers blends the known region back at every step (a note says which). The pipeline does
    not paste the original back outside the mask: those pixels are the VAE's reconstruction.

    Args:
        pipe: a `StableDiffusionInpaintPipeline` (`ldm.load_pipeline(..., task="inpaint")`).
        image: anything `as_image` reads. mask: anything `as_mask` reads, at the image's size.
        strength: a finite number in [0, 1]; 1 starts from pure noise inside the mask.
        padding_mask_crop: None, or a margin in pixels: diffusers crops around the mask, inpaints
            the crop at full size and pastes it back (one image and one mask only).
    Returns:
        EditOutput with images (B, 3, H, W) in [-1, 1], the binary mask used and the timesteps.
    """
    import PIL.Image  # noqa: PLC0415
    from diffusers import StableDiffusionInpaintPipeline  # noqa: PLC0415

    if not isinstance(pipe, StableDiffusionInpaintPipeline):
        raise ValueError(f"pipe must be a StableDiffusionInpaintPipeline (load_pipeline(..., task="
                         f"'inpaint')), got {type(pipe).__name__}")
    notes: list[str] = []
    x = as_image(image, "image", pipe.vae_scale_factor, notes)
    m = as_mask(mask, tuple(x.shape[-2:]), "mask", notes)
    prompts, steps, guidance, strength = _common(pipe, prompt, negative_prompt, num_inference_steps,
                                                 guidance_scale, strength)
    x, prompts = _batch(x, prompts, "image")
    if m.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"mask: {m.shape[0]} masks for {x.shape[0]} images; give one mask or one per image")
    m = m.expand(x.shape[0], -1, -1, -1)
    negatives = checks.negative_prompts(negative_prompt, len(prompts))
    generator = checks.generators(generator, len(prompts))
    if padding_mask_crop is not None:
        padding_mask_crop = checks.positive_int(padding_mask_crop, "padding_mask_crop")
        if x.shape[0] != 1:
            raise ValueError(f"padding_mask_crop works on one image and one mask (diffusers' rule), "
                             f"got a batch of {x.shape[0]}")
    if float(m.sum()) == 0:
        notes.append("mask is all 0 (keep everywhere): nothing is repainted")
    in_ch = pipe.unet.config.in_channels
    notes.append("9-channel inpainting U-Net: it sees the mask and the masked image" if in_ch == 9 else
                 f"{in_ch}-channel U-Net: diffusers blends the known latents back at every step")
    n_run = steps_run(steps, strength)
    if n_run == 0:
        notes.append(f"strength={strength:g} with {steps} steps runs int({steps} * {strength:g}) = 0 "
                     f"denoising steps (diffusers refuses); returned the VAE round trip")
        return _say(EditOutput(_vae_round_trip(pipe, x), [], strength, steps, notes, m), verbose)
    kwargs = dict(prompt=prompts, negative_prompt=negatives, strength=strength,
                  num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                  height=x.shape[-2], width=x.shape[-1])
    if padding_mask_crop is None:
        out = pipe(image=((x + 1) / 2).to(pipe.device), mask_image=m.to(pipe.device),
                   output_type="pt", **kwargs).images.float().cpu() * 2 - 1
    else:  # diffusers crops only PIL inputs and pastes back into PIL outputs
        arr = ((x[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        pil_mask = PIL.Image.fromarray((m[0, 0].numpy() * 255).astype(np.uint8), "L")
        pil = pipe(image=PIL.Image.fromarray(arr), mask_image=pil_mask, padding_mask_crop=padding_mask_crop,
                   output_type="pil", **kwargs).images[0]
        out = as_image(pil.convert("RGB"), "output")
        box = pipe.mask_processor.get_crop_region(pil_mask, x.shape[-1], x.shape[-2], pad=padding_mask_crop)
        notes.append(f"padding_mask_crop={padding_mask_crop}: inpainted the crop (x1, y1, x2, y2) = "
                     f"{tuple(int(v) for v in box)} at {x.shape[-2]}x{x.shape[-1]} and pasted it back")
    timesteps = [int(t) for t in pipe.scheduler.timesteps[(steps - n_run) * pipe.scheduler.order:]]
    notes.append(f"ran {n_run} of {steps} steps, from t={timesteps[0]} down to t={timesteps[-1]}")
    return _say(EditOutput(out, timesteps, strength, steps, notes, m), verbose)


# ---- the chapter's measurements (python -m ldm_tutorial.editing --sweep) ----------------------------

def blending_pipeline(pipe):
    """diffusers' inpainting pipeline around `pipe`'s own 4-channel text-to-image U-Net.

    With a 4-channel U-Net `StableDiffusionInpaintPipeline` does latent blending: after every step
    it puts the known region back, noised to the next timestep (SDEdit-style "RePaint without
    resampling"). The components are shared with `pipe`, nothing is copied.
    """
    from .models import _quiet_torchvision_fallback  # noqa: PLC0415

    _quiet_torchvision_fallback()
    from diffusers import StableDiffusionInpaintPipeline  # noqa: PLC0415

    if pipe.unet.config.in_channels != 4:
        raise ValueError(f"pipe must have a 4-channel text-to-image U-Net for latent blending, got "
                         f"{pipe.unet.config.in_channels} input channels")
    out = StableDiffusionInpaintPipeline(**pipe.components, requires_safety_checker=False)
    out.set_progress_bar_config(disable=True)
    return out


def gradient_energy(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H, W): squared forward differences in x and y, averaged over channels."""
    dx = torch.zeros_like(images)
    dy = torch.zeros_like(images)
    dx[..., :, :-1] = images[..., :, 1:] - images[..., :, :-1]
    dy[..., :-1, :] = images[..., 1:, :] - images[..., :-1, :]
    return (dx ** 2 + dy ** 2).mean(1)


def border_band(mask: torch.Tensor, width: int = 2) -> torch.Tensor:
    """(B, 1, H, W) 0/1 mask -> (B, H, W) bool: pixels within `width` of the mask's border."""
    k = 2 * width + 1
    m = mask.float()
    dilated = torch.nn.functional.max_pool2d(m, k, stride=1, padding=width)
    eroded = -torch.nn.functional.max_pool2d(-m, k, stride=1, padding=width)
    return (dilated - eroded)[:, 0] > 0


def seam_energy(images: torch.Tensor, mask: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Mean gradient energy along the mask's border, per image (B,)."""
    g, band = gradient_energy(images.float()), border_band(mask, width)
    return torch.stack([g[i][band[i]].mean() for i in range(len(g))])


def seam_ratio(images: torch.Tensor, mask: torch.Tensor, near: int = 1, far: tuple[int, int] = (3, 5)) -> torch.Tensor:
    """Gradient energy on the mask's border over the energy a few pixels away from it, per image (B,).

    The border band holds pixels within `near` of the border; the reference band those between
    `far[0]` and `far[1]` pixels away, on both sides. A seam is an edge exactly at the border, so
    it raises the ratio; a texture that runs across the border leaves it near 1.
    """
    g = gradient_energy(images.float())
    on = border_band(mask, near)
    ref = border_band(mask, far[1]) & ~border_band(mask, far[0] - 1)
    return torch.stack([g[i][on[i]].mean() / g[i][ref[i]].mean() for i in range(len(g))])


def recoloured(scene, rng: np.random.Generator, index: int = 0):
    """The scene with object `index` given another colour ("make the circle blue")."""
    from .tinysd import shapes  # noqa: PLC0415

    obj = scene.objects[index]
    colour = rng.choice([c for c in shapes.COLOURS if c != obj.colour])
    objects = list(scene.objects)
    objects[index] = shapes.SceneObject(str(colour), obj.shape, obj.size, obj.position)
    return shapes.Scene(objects, scene.background, scene.bg_colours, scene.bg_angle, scene.bg_freq,
                        scene.bg_seed, list(scene.jitter))


def replaced(scene, rng: np.random.Generator, index: int = 0):
    """The scene with object `index` replaced by one of another colour and shape (same size, cell)."""
    from .tinysd import shapes  # noqa: PLC0415

    obj = scene.objects[index]
    colour = rng.choice([c for c in shapes.COLOURS if c != obj.colour])
    shape = rng.choice([s for s in shapes.SHAPES if s != obj.shape])
    objects = list(scene.objects)
    objects[index] = shapes.SceneObject(str(colour), str(shape), obj.size, obj.position)
    return shapes.Scene(objects, scene.background, scene.bg_colours, scene.bg_angle, scene.bg_freq,
                        scene.bg_seed, list(scene.jitter))


def object_mask(image: torch.Tensor, index: int = 0, margin: int = 6, multiple: int = 8) -> torch.Tensor:
    """(1, 1, H, W) 0/1 mask: the parser's box of object `index` (largest first), grown by `margin`
    pixels and out to the latent grid (multiples of `multiple`), so the latent mask is exact."""
    from .tinysd import parser  # noqa: PLC0415

    image = image[0] if image.ndim == 4 else image              # (3, H, W)
    objs = parser.parse_scene(image)
    if index >= len(objs):
        raise ValueError(f"index: the parser found {len(objs)} objects, asked for object {index}")
    x0, y0, x1, y1 = objs[index].box
    h, w = image.shape[-2:]
    x0, y0 = max(0, (x0 - margin) // multiple * multiple), max(0, (y0 - margin) // multiple * multiple)
    x1 = min(w, -(-(x1 + margin) // multiple) * multiple)
    y1 = min(h, -(-(y1 + margin) // multiple) * multiple)
    m = torch.zeros(1, 1, h, w)
    m[..., y0:y1, x0:x1] = 1
    return m


def _generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@torch.no_grad()
def round_trip(pipe, images: torch.Tensor) -> torch.Tensor:
    """The VAE's reconstruction (posterior mean): the ceiling of any edit's fidelity outside a mask."""
    return _vae_round_trip(pipe, images)


@torch.no_grad()
def strength_sweep(pipe, scenes: list, targets: list, strengths=(0.0, 0.25, 0.5, 0.75, 1.0),
                   num_inference_steps: int = 25, guidance_scale: float = 7.5, seed: int = 0,
                   batch: int = 8, keep_images: bool = False, progress: bool = False) -> dict:
    """img2img from each scene towards its target's caption at every strength.

    Per strength: PSNR and SSIM to the source (faithfulness), the share the parser reads as the
    target scene (the edit worked) and as the source (nothing changed). Image i uses the
    generator seeded `seed + i` at every strength, so strengths differ only in strength.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    from .metrics import psnr, ssim  # noqa: PLC0415
    from .tinysd import evaluate, parser, shapes  # noqa: PLC0415

    source = shapes.render(scenes)
    prompts_ = [shapes.describe(t) for t in targets]
    out = {"n": len(scenes), "steps": num_inference_steps, "guidance_scale": guidance_scale, "strengths": {}}
    bar = tqdm(total=len(strengths) * len(scenes), desc="strength sweep", disable=not progress)
    for s in strengths:
        images = []
        for i in range(0, len(scenes), batch):
            r = img2img(pipe, source[i:i + batch], prompts_[i:i + batch], strength=s,
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        generator=_generators(seed + i, len(prompts_[i:i + batch])))
            images.append(r.images)
            bar.update(len(r.images))
        images = torch.cat(images)
        parsed = [parser.parse_scene(im) for im in images]
        row = {"steps_run": steps_run(num_inference_steps, s),
               "psnr_db": float(psnr(images, source).mean()), "ssim": float(ssim(images, source).mean()),
               "target_correct": float(np.mean([evaluate.fully_correct(p, t.objects)
                                                for p, t in zip(parsed, targets)])),
               "source_correct": float(np.mean([evaluate.fully_correct(p, sc.objects)
                                                for p, sc in zip(parsed, scenes)]))}
        if keep_images:
            row["images"] = images
        out["strengths"][f"{s:g}"] = row
    bar.close()
    return out


@torch.no_grad()
def inpaint_compare(inpaint_pipe, text_pipe, scenes: list, targets: list, masks: torch.Tensor,
                    num_inference_steps: int = 25, guidance_scale: float = 7.5, seed: int = 0,
                    batch: int = 8, feather: int = 3, keep_images: bool = False, progress: bool = False) -> dict:
    """The inpainting U-Net against latent blending with the text U-Net, on the same masks and noise.

    Methods: "inpainting U-Net" (9 channels, diffusers' output as is), "latent blending" (the
    4-channel text U-Net in the same pipeline), and the 9-channel output pasted back into the
    source through the hard mask ("+ paste") and through a mask blurred over `feather` pixels
    ("+ feathered paste"). Measures: the parser reads the target scene (new object inside, the
    rest kept), PSNR outside the mask against the source (the VAE round trip is the ceiling),
    seam energy along the mask's border relative to the source's.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    from .metrics import psnr  # noqa: PLC0415
    from .tinysd import evaluate, parser, shapes  # noqa: PLC0415

    source = shapes.render(scenes)
    prompts_ = [shapes.describe(t) for t in targets]
    blend = blending_pipeline(text_pipe)
    runs = {"inpainting U-Net": [], "latent blending": []}
    bar = tqdm(total=2 * len(scenes), desc="inpainting", disable=not progress)
    for i in range(0, len(scenes), batch):
        sl = slice(i, i + batch)
        for name, p in (("inpainting U-Net", inpaint_pipe), ("latent blending", blend)):
            r = inpaint(p, source[sl], masks[sl], prompts_[sl], num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, generator=_generators(seed + i, len(prompts_[sl])))
            runs[name].append(r.images)
            bar.update(len(r.images))
    bar.close()
    runs = {k: torch.cat(v) for k, v in runs.items()}
    k = 2 * feather + 1
    soft = torch.nn.functional.avg_pool2d(torch.nn.functional.max_pool2d(masks, k, 1, feather), k, 1, feather)
    nine = runs["inpainting U-Net"]
    runs["+ paste"] = masks * nine + (1 - masks) * source
    runs["+ feathered paste"] = soft * nine + (1 - soft) * source
    outside = masks < 0.5
    ceiling = psnr(round_trip(inpaint_pipe, source), source, mask=outside)
    out = {"n": len(scenes), "steps": num_inference_steps, "guidance_scale": guidance_scale,
           "feather_px": feather, "seam_ratio_source": float(torch.nanmedian(seam_ratio(source, masks))),
           "seam_energy_source": float(seam_energy(source, masks).median()), "mask_share": float(masks.mean()),
           "psnr_outside_round_trip_db": float(ceiling.mean()), "methods": {}}
    for name, images in runs.items():
        parsed = [parser.parse_scene(im) for im in images]
        new_obj = [parser.objects_present(p, [t.objects[0]])[0] for p, t in zip(parsed, targets)]
        pout = psnr(images, source, mask=outside)
        row = {"target_correct": float(np.mean([evaluate.fully_correct(p, t.objects)
                                                for p, t in zip(parsed, targets)])),
               "new_object_present": float(np.mean(new_obj)),
               "psnr_outside_db": float(pout.mean()),
               "outside_exact": bool(((images - source).abs() * outside).max() == 0),
               "seam_ratio": float(torch.nanmedian(seam_ratio(images, masks))),
               "seam_energy": float(seam_energy(images, masks).median())}
        if keep_images:
            row["images"] = images
        out["methods"][name] = row
    return out


@torch.no_grad()
def outpaint(pipe, image: torch.Tensor, prompt: str, new_width: int, step: int | None = None,
             num_inference_steps: int = 25, guidance_scale: float = 7.5, seed: int = 0,
             fill: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """Widen `image` (1, 3, H, W) to `new_width` on the right with the inpainting pipeline.

    step None: one run on the whole (H, new_width) canvas (the U-Net off its training size).
    step s: several runs, each on the last W columns of the canvas, of which the right s are new
    (the U-Net at its training size, seeing W - s known columns). The known pixels are pasted
    back after every run. Returns the canvas and the x positions of the borders that were made.
    """
    x = as_image(image, "image", pipe.vae_scale_factor)
    if x.shape[0] != 1:
        raise ValueError(f"image: outpaint takes one image, got a batch of {x.shape[0]}")
    h, w = x.shape[-2:]
    new_width = checks.positive_int(new_width, "new_width")
    if new_width <= w or new_width % pipe.vae_scale_factor:
        raise ValueError(f"new_width must be a multiple of {pipe.vae_scale_factor} above the image's width "
                         f"{w}, got {new_width}")
    g = torch.Generator().manual_seed(seed)
    kw = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=g)
    if step is None:
        canvas = torch.full((1, 3, h, new_width), fill)
        canvas[..., :w] = x
        mask = torch.zeros(1, 1, h, new_width)
        mask[..., w:] = 1
        r = inpaint(pipe, canvas, mask, prompt, **kw)
        return mask * r.images + (1 - mask) * canvas, [w]
    step = checks.positive_int(step, "step")
    if step >= w or step % pipe.vae_scale_factor or (new_width - w) % step:
        raise ValueError(f"step must be a multiple of {pipe.vae_scale_factor} below {w} that divides "
                         f"new_width - width = {new_width - w}, got {step}")
    canvas, borders = x, []
    while canvas.shape[-1] < new_width:
        window = torch.cat([canvas[..., -(w - step):], torch.full((1, 3, h, step), fill)], dim=-1)
        mask = torch.zeros(1, 1, h, w)
        mask[..., w - step:] = 1
        r = inpaint(pipe, window, mask, prompt, **kw)
        borders.append(canvas.shape[-1])
        canvas = torch.cat([canvas, r.images[..., w - step:]], dim=-1)
    return canvas, borders


def border_continuity(canvas: torch.Tensor, x: int) -> float:
    """`seam_ratio` of the vertical border at column x: about 1 when nothing marks the border."""
    mask = torch.zeros(1, 1, *canvas.shape[-2:])
    mask[..., x:] = 1
    g = gradient_energy(canvas.float())[0].mean(0)          # (W,): energy per column
    on, ref = g[x - 1:x + 1].mean(), torch.cat([g[x - 6:x - 3], g[x + 3:x + 6]]).mean()
    return float(on / ref)


@torch.no_grad()
def outpaint_compare(pipe, scenes: list, new_width: int = 256, step: int = 32,
                     num_inference_steps: int = 25, guidance_scale: float = 7.5, seed: int = 0,
                     keep_images: bool = False, progress: bool = False) -> dict:
    """One large outpainting run against several small ones: continuity across every border made
    (`border_continuity`, 1 = as smooth as a typical column), the colour step across the old
    border, and the objects the parser finds in the new part."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    from .tinysd import parser, shapes  # noqa: PLC0415

    source = shapes.render(scenes)
    w = source.shape[-1]
    rows = {"one large step": [], f"steps of {step} px": []}
    images = {k: [] for k in rows}
    for i in tqdm(range(len(scenes)), desc="outpainting", disable=not progress):
        prompt = shapes.describe(scenes[i])
        for name, s in (("one large step", None), (f"steps of {step} px", step)):
            canvas, borders = outpaint(pipe, source[i:i + 1], prompt, new_width, step=s,
                                       num_inference_steps=num_inference_steps,
                                       guidance_scale=guidance_scale, seed=seed + i)
            left, right = canvas[..., w - 8:w], canvas[..., w:w + 8]
            new_part = canvas[..., -w:]
            rows[name].append({
                "old_border": border_continuity(canvas, w),
                "worst_border": max(border_continuity(canvas, b) for b in borders),
                "colour_step": float((left.mean((-1, -2)) - right.mean((-1, -2))).abs().mean()),
                "objects_in_new_part": len(parser.parse_scene(new_part[0]))})
            images[name].append(canvas)
    out = {"n": len(scenes), "new_width": new_width, "step": step, "steps": num_inference_steps, "methods": {}}
    for name, r in rows.items():
        out["methods"][name] = {k: float(np.median([x[k] for x in r])) if k != "objects_in_new_part" else
                                float(np.mean([x[k] for x in r])) for k in r[0]}
        if keep_images:
            out["methods"][name]["images"] = torch.cat(images[name])
    return out


SWEEP_STRENGTHS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SWEEP_SEED = 10_000 + 600           # held-out scenes (training used seeds below 10_000)


def sweep_scenes(n_per_count: int, counts=(1, 2), seed: int = SWEEP_SEED) -> list:
    """Held-out scenes: `n_per_count` with each number of objects in `counts`."""
    from .tinysd import shapes  # noqa: PLC0415

    return [s for k in counts for s in shapes.sample_scenes(n_per_count, seed=seed + k, n_objects=k)]


def edit_targets(scenes: list, kind: str, seed: int = SWEEP_SEED) -> list:
    """One target per scene: kind "recolour" (object 0's colour) or "replace" (its colour and shape)."""
    rng = np.random.default_rng(seed)
    fn = {"recolour": recoloured, "replace": replaced}[kind]
    return [fn(s, rng) for s in scenes]


def inpaint_targets(scenes: list, images: torch.Tensor, seed: int = SWEEP_SEED + 10) -> list:
    """For each scene, the target of the inpainting comparison: the object `object_mask` covers
    (the parser's largest) replaced by one of another colour and shape, listed first."""
    from .tinysd import parser  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    targets = []
    for sc, im in zip(scenes, images):
        big = parser.parse_scene(im)[0]
        idx = next(j for j, o in enumerate(sc.objects)
                   if (o.colour, o.shape, o.position) == (big.colour, big.shape, big.position))
        tgt = replaced(sc, rng, idx)
        tgt.objects.insert(0, tgt.objects.pop(idx))
        targets.append(tgt)
    return targets


def run_sweep(n_strength: int = 16, n_inpaint: int = 24, n_outpaint: int = 6, steps: int = 25,
              progress: bool = True) -> dict:
    """Every committed measurement of chapter 6 (results/image_editing.json)."""
    import datetime  # noqa: PLC0415
    import time  # noqa: PLC0415

    from .models import load_pipeline  # noqa: PLC0415
    from .runtime import cpu_name  # noqa: PLC0415
    from .tinysd import shapes  # noqa: PLC0415

    t0 = time.perf_counter()
    text = load_pipeline("tiny", task="img2img", verbose=False)
    inp = load_pipeline("tiny", task="inpaint", verbose=False)
    seconds = {}
    scenes = sweep_scenes(n_strength)
    t = time.perf_counter()
    sweep = strength_sweep(text, scenes, edit_targets(scenes, "recolour"), SWEEP_STRENGTHS,
                           num_inference_steps=steps, progress=progress)
    seconds["strength"] = time.perf_counter() - t
    scenes2 = sweep_scenes(n_inpaint, counts=(2,), seed=SWEEP_SEED + 10)
    source = shapes.render(scenes2)
    masks = torch.cat([object_mask(source[i:i + 1]) for i in range(len(scenes2))])
    targets = inpaint_targets(scenes2, source)
    t = time.perf_counter()
    inpainting = inpaint_compare(inp, text, scenes2, targets, masks, num_inference_steps=steps,
                                 progress=progress)
    seconds["inpainting"] = time.perf_counter() - t
    t = time.perf_counter()
    outpainting = outpaint_compare(inp, sweep_scenes(n_outpaint, counts=(1,), seed=SWEEP_SEED + 20),
                                   num_inference_steps=steps, progress=progress)
    seconds["outpainting"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    import os  # noqa: PLC0415
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"strength_sweep": sweep, "inpainting": inpainting, "outpainting": outpainting,
            "meta": {"machine": cpu_name(), "threads": torch.get_num_threads(),
                     "date": datetime.date.today().isoformat(), "seconds": seconds, "load_average_end": load,
                     "command": "python -m ldm_tutorial.editing --sweep --threads 1"}}


def markdown(result: dict) -> str:
    """benchmarks/image_editing.md from a sweep result."""
    m, s, ip, op = result["meta"], result["strength_sweep"], result["inpainting"], result["outpainting"]
    lines = ["# Image editing: the committed measurements of chapter 6", "",
             f"`{m['command']}` on {m['machine']}, {m['threads']} thread(s), {m['date']}; "
             f"seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in m["seconds"].items()) + ".",
             m.get("note") or "The machine was shared with other jobs: the seconds are an upper bound.", "",
             f"## img2img strength sweep (n = {s['n']} held-out scenes, half with one object, half with "
             f"two; object 0 recoloured; {s['steps']} DDIM steps, guidance {s['guidance_scale']})", "",
             "| strength | steps run | PSNR to source (dB) | SSIM | reads as the edit | reads as the source |",
             "|---|---|---|---|---|---|"]
    for k, r in s["strengths"].items():
        lines.append(f"| {k} | {r['steps_run']} | {r['psnr_db']:.2f} | {r['ssim']:.3f} | "
                     f"{r['target_correct']:.3f} | {r['source_correct']:.3f} |")
    lines += ["", f"## Inpainting: replace one object of two (n = {ip['n']}; mask = the object's box + 6 px, "
              f"on the latent grid, {ip['mask_share']:.1%} of the image)", "",
              f"VAE round trip PSNR outside the mask (the ceiling): {ip['psnr_outside_round_trip_db']:.2f} dB.", "",
              "| method | reads as the target | new object present | PSNR outside (dB) | seam energy (1e-4, median) | seam vs the source's |",
              "|---|---|---|---|---|---|"]
    for k, r in ip["methods"].items():
        pout = "exact" if r["outside_exact"] else f"{r['psnr_outside_db']:.2f}"
        lines.append(f"| {k} | {r['target_correct']:.3f} | {r['new_object_present']:.3f} | "
                     f"{pout} | {1e4 * r['seam_energy']:.1f} | {r['seam_energy'] / ip['seam_energy_source']:.2f} |")
    lines.append(f"| (the source itself) | | | | {1e4 * ip['seam_energy_source']:.1f} | 1 |")
    lines += ["", "Seam energy: the mean squared image gradient within 2 px of the mask's border "
              "(`editing.seam_energy`); an edge where the repainted region meets the kept one raises it."]
    lines += ["", f"## Outpainting 128 -> {op['new_width']} px wide (n = {op['n']} one-object scenes)", "",
              "| method | old border continuity (median) | worst border (median) | colour step | objects in new part |",
              "|---|---|---|---|---|"]
    for k, r in op["methods"].items():
        lines.append(f"| {k} | {r['old_border']:.2f} | {r['worst_border']:.2f} | {r['colour_step']:.3f} | "
                     f"{r['objects_in_new_part']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse  # noqa: PLC0415
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from .results import path as result_path  # noqa: PLC0415

    ap = argparse.ArgumentParser(description="Chapter 6's committed measurements")
    ap.add_argument("--sweep", action="store_true", help="run every measurement and write the results")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-strength", type=int, default=16, help="scenes per object count (1 and 2)")
    ap.add_argument("--n-inpaint", type=int, default=24)
    ap.add_argument("--n-outpaint", type=int, default=6)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--out", default=str(result_path("image_editing")))
    ap.add_argument("--markdown", default="benchmarks/image_editing.md")
    args = ap.parse_args(argv)
    if not args.sweep:
        ap.error("nothing to do: pass --sweep")
    torch.set_num_threads(checks.positive_int(args.threads, "--threads"))
    result = run_sweep(args.n_strength, args.n_inpaint, args.n_outpaint, args.steps)
    def finite(o):   # NaN (a median over empty bands) is not JSON: write null
        if isinstance(o, float) and not math.isfinite(o):
            return None
        return {k: finite(v) for k, v in o.items()} if isinstance(o, dict) else o

    Path(args.out).write_text(json.dumps(finite(result), indent=1, allow_nan=False) + "\n")
    Path(args.markdown).write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
