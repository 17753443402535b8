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
