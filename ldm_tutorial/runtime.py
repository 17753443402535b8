"""Device and dtype choice, seeding, Colab and Hub detection (introduced in chapter 0).

Every function here is cheap and side-effect free except `seed_everything`, which seeds the
global RNGs on purpose. Nothing runs at import time.
"""
from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
import threading
from dataclasses import dataclass

import numpy as np
import torch

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUTHY = {"1", "true", "yes", "on"}


def pick_device(prefer: str | None = None) -> torch.device:
    """Choose the device a chapter runs on.

    Args:
        prefer: None (CUDA when available, else CPU), "cuda" or "cpu".
    Returns:
        A `torch.device`.
    Raises:
        ValueError: `prefer` is unknown, or "cuda" is asked without a GPU.
    """
    if prefer is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(prefer).type
    except (RuntimeError, TypeError):          # torch's own error for "tpu" and other unknown names
        kind = None
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"prefer must be None, 'cuda' (or 'cuda:N') or 'cpu', got {prefer!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("prefer='cuda' but no CUDA GPU is visible; use prefer=None or prefer='cpu'")
    return torch.device(prefer)


def pick_dtype(device: torch.device | str, prefer: torch.dtype | str | None = None) -> torch.dtype:
    """Choose the floating-point dtype for `device`.

    CUDA: float16 by default, bfloat16 when asked and supported. CPU: float32 by default; float16 and
    bfloat16 are returned when asked for (they run on the CPU; `cpu_half_note` says what they cost).

    Args:
        device: where the model will run.
        prefer: None, or one of torch.float32 / torch.float16 / torch.bfloat16 (or their names).
    Returns:
        A `torch.dtype`.
    Raises:
        ValueError: `prefer` is not one of those dtypes, or bfloat16 on a GPU without it.
    """
    device = torch.device(device)
    if isinstance(prefer, str):
        if not isinstance(getattr(torch, prefer, None), torch.dtype):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {prefer!r}")
        prefer = getattr(torch, prefer)
    if prefer is not None and prefer not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {prefer}")
    if device.type == "cuda":
        if prefer is None:
            return torch.float16
        if prefer == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ValueError("dtype=bfloat16 is not supported on this GPU; use float16")
        return prefer
    return torch.float32 if prefer is None else prefer


def cpu_half_note(dtype: torch.dtype) -> str | None:
    """What half precision on the CPU costs, in one sentence (None for float32).

    It runs: PyTorch has CPU kernels for both. It saves no time that matters: for a TinySD image on a
    2-core Xeon (torch 2.13), float16 took about 1.5 times float32's time and bfloat16 about the same
    (benchmarks/cpu_half.md, scripts/bench_cpu_half.py); CPUs without native half-precision
    instructions fall further behind. It also changes the pixels (0.005 at most for float16, 0.05
    for bfloat16, in [0, 1] units).
    """
    if dtype == torch.float32:
        return None
    name = str(dtype).removeprefix("torch.")
    return (f"dtype={name} on the CPU runs, but it is rarely faster than float32 there (slower on CPUs "
            f"without native {name} instructions) and it changes the pixels; float32 is the CPU default, "
            f"{name} pays off on a GPU")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch, and return a CPU `torch.Generator` seeded with `seed`.

    Pass the returned generator to every random call (pipelines, `torch.randn`) so a chapter's
    draws do not depend on what ran before.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator("cpu").manual_seed(seed)


def in_colab() -> bool:
    """True when running inside Google Colab."""
    return "google.colab" in sys.modules


def _offline_reason() -> str | None:
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in _TRUTHY:
            return f"{var}=1"
    return None


_PROBES: dict[tuple[str, float], bool] = {}


def _connect(host: str, timeout: float) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _probe(host: str, timeout: float) -> bool:
    """Whether `host` accepts a TCP connection on port 443, decided within `timeout` seconds in all.

    socket's own timeout covers the connection only: name resolution (getaddrinfo) can block for as
    long as the system resolver likes. So the attempt runs in a daemon thread and we wait for it at
    most `timeout` seconds; a resolver still busy then counts as unreachable. Cached per process.
    """
    key = (host, timeout)
    if key not in _PROBES:
        result: list[bool] = []
        worker = threading.Thread(target=lambda: result.append(_connect(host, timeout)), daemon=True,
                                  name=f"ldm-hub-probe-{host}")
        worker.start()
        worker.join(timeout)
        _PROBES[key] = bool(result and result[0])
    return _PROBES[key]


def hub_available(timeout: float = 2.0) -> bool:
    """True when huggingface.co answers on port 443 within `timeout` seconds, DNS included.

    False at once when HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1. The whole check takes at most
    `timeout` seconds (at most 5 allowed) and its result is cached for the life of the process.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 5:
        raise ValueError(f"timeout must be a number of seconds in (0, 5], got {timeout!r}")
    if _offline_reason() is not None:
        return False
    return _probe("huggingface.co", float(timeout))


def hub_reason(timeout: float = 2.0) -> str:
    """Why the Hub is (not) usable, in a few words: "online", "offline (HF_HUB_OFFLINE=1)", ..."""
    reason = _offline_reason()
    if reason is not None:
        return f"offline ({reason})"
    return "online" if hub_available(timeout) else "offline (huggingface.co unreachable)"


@dataclass(frozen=True)
class RuntimeInfo:
    """What `describe_runtime` found: device, dtype, Colab, Hub, and which model "auto" picks."""

    device: torch.device
    dtype: torch.dtype
    colab: bool
    hub: bool
    reason: str

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        colab = " colab" if self.colab else ""
        return f"device={self.device.type} dtype={dtype}{colab} hub={self.reason}"


def describe_runtime(timeout: float = 2.0) -> RuntimeInfo:
    """Summarise the runtime in one object; `str()` of it is one line for a chapter's first output."""
    device = pick_device()
    hub = hub_available(timeout)
    auto = "sd15" if (device.type == "cuda" and hub) else "TinySD"
    reason = f"{hub_reason(timeout)} -> {auto}"
    return RuntimeInfo(device=device, dtype=pick_dtype(device), colab=in_colab(), hub=hub, reason=reason)


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """The `from_pretrained` keyword for a dtype: diffusers renamed `torch_dtype` to `dtype` (0.36+)
    and warns on the old name; older diffusers (Colab may pin one) only knows `torch_dtype`."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401, PLC0415
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


@contextlib.contextmanager
def quiet_loading():
    """Hide diffusers' and transformers' per-file loading progress bars (noise in a rendered page)."""
    from diffusers.utils import logging as dlog  # noqa: PLC0415
    from transformers.utils import logging as tlog  # noqa: PLC0415

    d_on, t_on = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if d_on:
            dlog.enable_progress_bar()
        if t_on:
            tlog.enable_progress_bar()


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else platform's best guess: for benchmark tables."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform  # noqa: PLC0415

    return platform.processor() or platform.machine()
