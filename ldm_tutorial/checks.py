"""Argument checks shared by the sampling and editing helpers.

Each check either returns the value in the form the caller uses or raises a `ValueError` whose
message names the parameter, says what was expected and shows what was given. Callers run them
before any model is touched, so a bad argument never surfaces as a stack trace from inside torch
or diffusers, and never silently means something else (`height=0` is not "the default").
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _caller_stacklevel(skip: tuple[str, ...] = ()) -> int:
    """The `stacklevel` that attributes a warning to the first frame outside this package (and the
    directories or files in `skip`): the reader's line that called `ldm.sample`, however many package
    frames (or decorators) lie between. The outermost frame when every frame is skipped (a module run
    as a script)."""
    skip = (_PACKAGE_DIR + os.sep, *skip)
    frame, level = sys._getframe(1), 1                    # level 1: the function that calls warnings.warn
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def prompts(value, name: str = "prompt") -> list[str]:
    """A string or a non-empty list/tuple of strings -> a list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {_shown(value)}")


def negative_prompts(value, n: int, name: str = "negative_prompt") -> list[str]:
    """None or "" (the empty prompt), a string, or a list of `n` strings -> a list of `n` strings."""
    if value is None:
        return [""] * n
    if isinstance(value, str):
        return [value] * n
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        if len(value) != n:
            raise ValueError(f"{name} must be a string or a list of {n} strings (one per prompt), "
                             f"got a list of {len(value)}")
        return list(value)
    raise ValueError(f"{name} must be None, a string or a list of {n} strings, got {_shown(value)}")


def positive_int(value, name: str) -> int:
    """A positive integer (bools and 2.5 refused; numpy integers accepted) -> int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {_shown(value)}")
    return int(value)


def finite_number(value, name: str, low: float | None = None, high: float | None = None) -> float:
    """A finite real number, optionally within [low, high] -> float."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value, ok = value.item(), True
    if not ok or not math.isfinite(float(value)):
        want = "a finite number" if low is None and high is None else f"a finite number in [{low}, {high}]"
        raise ValueError(f"{name} must be {want}, got {_shown(value)}")
    value = float(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value}")
    return value


def image_size(height, width, multiple: int, default: int) -> tuple[int, int]:
    """None -> `default`; otherwise a positive integer divisible by `multiple` (the VAE's factor)."""
    out = []
    for name, v in (("height", height), ("width", width)):
        if v is None:
            out.append(default)
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 or v % multiple:
            raise ValueError(f"{name} must be None (the default, {default}) or a positive multiple of "
                             f"vae_scale_factor={multiple}, got {_shown(v)}")
        out.append(int(v))
    return out[0], out[1]


def generators(value, batch: int, name: str = "generator"):
    """None, one `torch.Generator`, or a list of `batch` generators (one per image, as diffusers takes)."""
    if value is None or isinstance(value, torch.Generator):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(g, torch.Generator) for g in value):
        if len(value) != batch:
            raise ValueError(f"{name} must be one torch.Generator or a list of {batch} (one per image), "
                             f"got a list of {len(value)}")
        if len({g.device.type for g in value}) > 1:
            raise ValueError(f"{name}: every generator must be on the same device, got "
                             f"{sorted({g.device.type for g in value})}")
        return list(value)
    raise ValueError(f"{name} must be None, a torch.Generator or a list of {batch} torch.Generators, "
                     f"got {_shown(value)}")


def interval(value, name: str = "guidance_interval") -> tuple[float, float] | None:
    """None, or (low, high) with finite low <= high."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{name} must be None or a pair (low, high) of timesteps, got {_shown(value)}")
    low, high = (finite_number(v, name) for v in value)
    if low > high:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {_shown(value)}")
    return low, high


def autoguidance_unet(weak, unet):
    """None, or a U-Net that can stand beside `unet` as autoguidance's weak model -> it (or None)."""
    if weak is None:
        return None
    config = getattr(weak, "config", None)
    if config is None or not callable(weak) or not hasattr(weak, "dtype"):
        raise ValueError(f"autoguidance_unet must be None or a diffusers UNet2DConditionModel, "
                         f"got {_shown(weak)}")
    for key in ("in_channels", "out_channels", "cross_attention_dim", "sample_size"):
        if config.get(key) != unet.config.get(key):
            raise ValueError(f"autoguidance_unet must match the pipeline's U-Net in {key} "
                             f"({unet.config.get(key)}), got {config.get(key)}")
    if weak is unet:
        raise ValueError("autoguidance_unet must be a weaker model than the pipeline's U-Net, "
                         "got the pipeline's own U-Net (that guidance term would be zero)")
    if weak.device != unet.device:
        raise ValueError(f"autoguidance_unet must be on the pipeline's device ({unet.device}), "
                         f"got {weak.device}")
    return weak


def warn_truncation(tokenizer, prompts_: list[str], name: str = "prompt") -> None:
    """Warn, once per prompt, when a prompt is longer than the text encoder's window.

    SD's tokenizer keeps `model_max_length` tokens (start and end included) and drops the rest with
    no error; the pipelines only log it. Here the warning says how many tokens were dropped and which
    words they spelled, so a reader sees why the end of a long prompt has no effect.
    """
    limit = tokenizer.model_max_length
    for i, ids in enumerate(tokenizer(prompts_, truncation=False, verbose=False).input_ids):
        if len(ids) > limit:
            dropped = ids[limit - 1:-1]                        # what truncation cuts, before the end token
            text = tokenizer.decode(dropped).strip()
            text = text if len(text) <= 120 else text[:117] + "..."
            where = f"{name}[{i}]" if len(prompts_) > 1 else name
            warnings.warn(f"{where} is {len(ids)} tokens long; the text encoder sees {limit} (start and end "
                          f"tokens included), so {len(dropped)} tokens were dropped: {text!r}",
                          UserWarning, stacklevel=_caller_stacklevel())   # the caller of sample
