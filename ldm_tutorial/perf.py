"""Where Stable Diffusion's time goes, and what makes it faster, measured (chapter 8).

Helpers of the production chapter: a torch.profiler breakdown of one image by component, FLOP
counts of the real SD 1.5 / SDXL components on the meta device (through `arch.forward_flops`) and
the compute floor they give at a published peak, written-out attention against
`F.scaled_dot_product_attention`, interleaved timing, schedulers built from a pipeline's config,
previews decoded by the tiny autoencoder through `callback_on_step_end`, and the chapter's
measurement run:

    python -m ldm_tutorial.perf --measure --threads 1     # ldm_tutorial/results/production.json
                                                          # and benchmarks/production.md
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .arch import CONFIGS, build_on_meta, count_parameters, forward_flops

# --- Published dense (no 2:4 sparsity) bfloat16 tensor-core peaks, from NVIDIA's data sheets.
# H100 SXM: the data sheet lists BFLOAT16 Tensor Core 1,979 TFLOPS "with sparsity" and says the
# figures are one half lower without it. A100 (SXM and PCIe): BFLOAT16 Tensor Core 312 TFLOPS
# (624 with sparsity).
PEAKS_BF16_DENSE = {"H100 SXM": 1979e12 / 2, "A100": 312e12}
PEAK_SOURCES = {
    "H100 SXM": "NVIDIA H100 Tensor Core GPU data sheet (BF16 Tensor Core 1,979 TFLOPS with "
                "sparsity; one half without)",
    "A100": "NVIDIA A100 Tensor Core GPU data sheet (BF16 Tensor Core 312 TFLOPS; 624 with "
            "sparsity)",
}
SCHEDULERS = ("DDIM", "DPM-Solver++", "Euler", "UniPC")
RESULTS_NAME = "production"
REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    """Seconds of repeated calls: the median and the spread (min, max), `n` calls each."""

    median: float
    low: float
    high: float
    n: int


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int = 5,
                      warmup: int = 1) -> dict[str, Timing]:
    """Time several callables A, B, A, B, ... so that a change in machine load hits all alike.

    Args:
        fns: name -> a callable without arguments.
        repeats: timed calls of each (after `warmup` untimed ones).
    Returns:
        name -> Timing (median, min, max seconds, n).
    """
    if not fns:
        raise ValueError("fns must name at least one callable, got an empty dict")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    return {name: Timing(statistics.median(s), min(s), max(s), len(s)) for name, s in seconds.items()}


def load_average() -> float:
    """The 1-minute load average (0.0 where the OS has none): recorded beside every timing."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return 0.0


# ----------------------------------------------------------------------------- 1. profiler
class _QuietNativeStderr:
    """Send file descriptor 2 to /dev/null while the profiler starts and stops: torch 2.13's
    kineto writes "profiler_start/stop" lines there from C++ (no setting turns them off), and a
    notebook would show them as stderr output. Python exceptions still propagate."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self.null, 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        os.close(self.null)
        return False


class _Label:
    """Forward hooks that open a torch.profiler `record_function` range around a module's forward."""

    def __init__(self, module: nn.Module, name: str):
        self.name, self.open = name, []
        self.handles = [module.register_forward_pre_hook(self.enter),
                        module.register_forward_hook(self.exit)]

    def enter(self, *_):
        rf = torch.profiler.record_function(self.name)
        rf.__enter__()
        self.open.append(rf)

    def exit(self, *_):
        self.open.pop().__exit__(None, None, None)

    def remove(self):
        for h in self.handles:
            h.remove()


COMPONENTS = ("text_encoder", "unet", "vae_decode")


def profile_image(pipe, prompt: str, num_inference_steps: int = 25, guidance_scale: float = 5.0,
                  seed: int = 0) -> dict:
    """torch.profiler breakdown of one `ldm.sample` image by component.

    Each of the text encoder, the U-Net and the VAE's decoder gets a `record_function` range
    (forward hooks, removed afterwards); the whole call gets one too ("image").

    Returns:
        {"total_s", "text_encoder_s", "unet_s", "vae_decode_s", "other_s" (scheduler, glue),
         "unet_calls", "unet_per_step_s", "steps", "guidance_scale"}; seconds of CPU time as the
        profiler records them (its overhead included).
    """
    from torch.profiler import ProfilerActivity, profile, record_function  # noqa: PLC0415

    from .sampling import sample  # noqa: PLC0415

    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    modules = {"text_encoder": pipe.text_encoder, "unet": pipe.unet, "vae_decode": pipe.vae.decoder}
    labels = [_Label(m, name) for name, m in modules.items()]
    try:
        sample(pipe, prompt, num_inference_steps=1)                    # first-call costs out
        with _QuietNativeStderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("image"):
                sample(pipe, prompt, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale,
                       generator=torch.Generator().manual_seed(seed))
    finally:
        for label in labels:
            label.remove()
    events = {e.key: e for e in prof.key_averages() if e.key in (*COMPONENTS, "image")}
    out = {f"{name}_s": events[name].cpu_time_total / 1e6 for name in COMPONENTS}
    out["total_s"] = events["image"].cpu_time_total / 1e6
    out["other_s"] = out["total_s"] - sum(out[f"{name}_s"] for name in COMPONENTS)
    out["unet_calls"] = events["unet"].count
    out["unet_per_step_s"] = out["unet_s"] / out["unet_calls"]
    out.update(steps=num_inference_steps, guidance_scale=guidance_scale)
    return out


def unet_batch_ratio(pipe, repeats: int = 15) -> dict:
    """Seconds of one U-Net call at batch 2 (a guided step) and at batch 1 (unguided), interleaved,
    on the pipeline's own latent size; and their ratio (2.0 would mean time follows FLOPs)."""
    unet = pipe.unet
    side, width = unet.config.sample_size, unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    inputs = {b: (torch.randn(b, unet.config.in_channels, side, side, generator=g),
                  torch.randn(b, 77, width, generator=g)) for b in (1, 2)}
    with torch.no_grad():
        t = interleaved_times({f"batch_{b}": (lambda b=b: unet(inputs[b][0], 500,
                                                                 encoder_hidden_states=inputs[b][1]))
                               for b in (1, 2)}, repeats=repeats, warmup=2)
    return {"batch_1_s": asdict(t["batch_1"]), "batch_2_s": asdict(t["batch_2"]),
            "ratio": t["batch_2"].median / t["batch_1"].median}


# ----------------------------------------------------------------------------- 1. FLOPs
class _Decode(nn.Module):
    """vae.decode(z).sample as a module, so that `forward_flops` can count it."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


SD_SPECS = {
    # model: text encoders, U-Net, VAE, image side, text width of the U-Net
    "sd15": dict(text=("clip-l-text",), unet="sd15-unet", vae="sd-vae", side=512),
    "sdxl": dict(text=("clip-l-text", "openclip-bigg-text"), unet="sdxl-base-unet", vae="sdxl-vae",
                 side=1024),
}


def flop_split(model: str = "sd15", guidance: bool = True) -> dict:
    """FLOPs of one image's parts for the real SD 1.5 or SDXL base, counted on the meta device.

    The text encoder(s) run once per prompt (twice with guidance: prompt and negative prompt), the
    U-Net once per step on a batch of 2 with guidance (1 without), the VAE decoder once. Counts
    follow `arch.forward_flops`: a multiply-add is 2 FLOPs; elementwise work and norms are not
    counted.

    Args:
        model: "sd15" (512x512, 64x64 latents) or "sdxl" (1024x1024, 128x128 latents).
        guidance: classifier-free guidance on (batch 2 through the U-Net and the text encoders).
    Returns:
        {"text_encoder": FLOPs, "unet_step": FLOPs, "vae_decode": FLOPs, "side": pixels,
         "latent_side": int, "batch": 1 or 2}
    """
    if model not in SD_SPECS:
        raise ValueError(f"model must be one of {sorted(SD_SPECS)}, got {model!r}")
    spec, b = SD_SPECS[model], 2 if guidance else 1
    meta = torch.device("meta")
    ids = torch.zeros(b, 77, dtype=torch.long, device=meta)
    text = sum(forward_flops(build_on_meta(name), ids) for name in spec["text"])
    unet = build_on_meta(spec["unet"])
    h = spec["side"] // 8
    cfg = CONFIGS[spec["unet"]].config
    kwargs = {"encoder_hidden_states": torch.zeros(b, 77, cfg["cross_attention_dim"], device=meta)}
    if cfg.get("addition_embed_type") == "text_time":               # SDXL: pooled text + 6 size ids
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(b, pooled, device=meta),
                                       "time_ids": torch.zeros(b, 6, device=meta)}
    latents = torch.zeros(b, 4, h, h, device=meta)                    # (B, 4, h, w)
    step = forward_flops(unet, latents, torch.full((b,), 500, device=meta), **kwargs)
    decode = forward_flops(_Decode(build_on_meta(spec["vae"])), torch.zeros(1, 4, h, h, device=meta))
    return {"text_encoder": text, "unet_step": step, "vae_decode": decode, "side": spec["side"],
            "latent_side": h, "batch": b}


def image_flops(split: dict, num_inference_steps: int) -> int:
    """FLOPs of one image: text encoding + `num_inference_steps` U-Net calls + one decode."""
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    return split["text_encoder"] + num_inference_steps * split["unet_step"] + split["vae_decode"]


def compute_floor(flops: float, peak_flops_per_s: float) -> float:
    """The least time `flops` can take at a device's peak: flops / peak (seconds)."""
    if not peak_flops_per_s > 0:
        raise ValueError(f"peak_flops_per_s must be positive, got {peak_flops_per_s!r}")
    if flops < 0:
        raise ValueError(f"flops must be non-negative, got {flops!r}")
    return flops / peak_flops_per_s


def taesd_parameters() -> dict:
    """TAESD's parameter counts from its published config (madebyollin/taesd, `arch.TAESD`), built
    on the meta device, and from diffusers' `AutoencoderTiny()` defaults (the same architecture)."""
    from diffusers import AutoencoderTiny  # noqa: PLC0415

    published = build_on_meta("taesd")
    with torch.device("meta"):
        default = AutoencoderTiny()
    return {"total": count_parameters(published), "encoder": count_parameters(published.encoder),
            "decoder": count_parameters(published.decoder),
            "diffusers_default_total": count_parameters(default)}


# ----------------------------------------------------------------------------- 2. attention
def attention_written_out(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V, the (tokens x tokens) score matrix made in full.

    Args:
        query, key, value: (B, heads, tokens, head_dim); key/value may have another token count.
    Returns:
        (B, heads, tokens, head_dim), what `F.scaled_dot_product_attention` returns.
    """
    if query.dim() != 4 or key.shape != value.shape or query.shape[-1] != key.shape[-1]:
        raise ValueError("query, key, value must be (B, heads, tokens, head_dim) with matching "
                         f"head_dim, got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])   # (B, heads, N, M)
    return scores.softmax(dim=-1) @ value                                 # (B, heads, N, d)


def score_matrix_bytes(tokens: int, heads: int = 8, batch: int = 1, dtype_bytes: int = 4) -> int:
    """Bytes of the attention scores written-out attention holds: batch * heads * tokens**2."""
    if tokens < 1 or heads < 1 or batch < 1:
        raise ValueError(f"tokens, heads and batch must be positive, got {tokens}, {heads}, {batch}")
    return batch * heads * tokens * tokens * dtype_bytes


def largest_op_allocation(fn: Callable[[], object]) -> int:
    """The most memory one operator allocated during `fn()`, in bytes, as torch.profiler records
    it (`profile_memory=True`, each op's own allocations). A lower bound of the peak, not the peak:
    what several live tensors hold together is not summed."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with _QuietNativeStderr(), torch.no_grad(), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([e.self_cpu_memory_usage for e in prof.events()] + [0])


def attention_sweep(tokens: tuple[int, ...] = (256, 1024, 2048, 4096), heads: int = 8,
                    head_dim: int = 64, repeats: int = 3, seed: int = 0) -> list[dict]:
    """Written-out attention against SDPA at growing token counts (batch 1, float32).

    Returns:
        one row per token count: seconds (median, min, max) of each, the profiler's largest
        single-op allocation of each, and the analytic bytes of the score matrix.
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in tqdm(tokens, desc="attention sweep", mininterval=5):
        q, k, v = (torch.randn(1, heads, n, head_dim, generator=g) for _ in range(3))
        fns = {"written_out": lambda: attention_written_out(q, k, v),
               "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
        with torch.no_grad():
            t = interleaved_times(fns, repeats=repeats)
        rows.append({"tokens": n, "heads": heads, "head_dim": head_dim,
                     **{f"{name}_s": asdict(t[name]) for name in fns},
                     **{f"{name}_largest_alloc_bytes": largest_op_allocation(fn) for name, fn in fns.items()},
                     "score_matrix_bytes": score_matrix_bytes(n, heads)})
    return rows


def set_attention(unet: nn.Module, kind: str) -> None:
    """Set every attention layer of `unet` to diffusers' `AttnProcessor2_0` ("sdpa"), the
    written-out `AttnProcessor` ("math") or `SlicedAttnProcessor(1)` ("sliced": one head at a
    time), through the attention-processor API."""
    from diffusers.models.attention_processor import (AttnProcessor, AttnProcessor2_0,  # noqa: PLC0415
                                                      SlicedAttnProcessor)

    makers = {"sdpa": AttnProcessor2_0, "math": AttnProcessor, "sliced": lambda: SlicedAttnProcessor(1)}
    if kind not in makers:
        raise ValueError(f"kind must be one of {sorted(makers)}, got {kind!r}")
    unet.set_attn_processor(makers[kind]())


# ----------------------------------------------------------------------------- 4. schedulers, previews
def make_scheduler(pipe, name: str):
    """A diffusers scheduler built `from_config(pipe.scheduler.config)`: "DDIM", "DPM-Solver++"
    (DPMSolverMultistepScheduler, its default algorithm_type dpmsolver++), "Euler" or "UniPC";
    "DDIM trailing" is DDIM with timestep_spacing="trailing" (its first step at t = 999, not 961
    for 25 steps: Lin et al., arXiv:2305.08891, section 3.3)."""
    import diffusers  # noqa: PLC0415

    classes = {"DDIM": "DDIMScheduler", "DPM-Solver++": "DPMSolverMultistepScheduler",
               "Euler": "EulerDiscreteScheduler", "UniPC": "UniPCMultistepScheduler",
               "DDIM trailing": "DDIMScheduler"}
    if name not in classes:
        raise ValueError(f"name must be one of {list(classes)}, got {name!r}")
    extra = {"timestep_spacing": "trailing"} if name == "DDIM trailing" else {}
    return getattr(diffusers, classes[name]).from_config(pipe.scheduler.config, **extra)


def with_scheduler(pipe, name: str):
    """A shallow copy of `pipe` (same modules, no memory) that samples with scheduler `name`."""
    other = copy.copy(pipe)
    other.register_modules(scheduler=make_scheduler(pipe, name))
    return other


def scheduler_sweep(pipe, steps: tuple[int, ...] = (2, 4, 8, 16, 25), n_per_count: int = 32,
                    names: tuple[str, ...] = SCHEDULERS, guidance_scale: float = 5.0) -> dict:
    """Parser adherence (share of images exactly the prompt) against steps, per scheduler.

    The same prompts and noise for every scheduler (`tinysd.evaluate.steps_sweep`). Returns its dict:
    {name: {steps: {"1_object": share, "2_object": share}}, "n": {...}}.
    """
    from .tinysd.evaluate import steps_sweep  # noqa: PLC0415

    return steps_sweep({name: with_scheduler(pipe, name) for name in names}, steps=steps,
                       n_per_count=n_per_count, guidance_scale=guidance_scale)


class PreviewCallback:
    """`callback_on_step_end` that decodes the current latents with a tiny autoencoder every
    `every` steps: cheap previews while a pipeline samples.

    TinySD's and SD's TAESD take the latents the U-Net works on (already times the scaling factor;
    its own scaling_factor is 1.0). `previews` collects (step, image in [-1, 1]) pairs.
    """

    def __init__(self, taesd: nn.Module, every: int = 5):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.taesd, self.every, self.previews = taesd, every, []

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if (step + 1) % self.every == 0:
            with torch.no_grad():
                image = self.taesd.decode(callback_kwargs["latents"]).sample.clamp(-1, 1)
            self.previews.append((step + 1, image.cpu()))
        return callback_kwargs


def decode_ratio(vae: nn.Module, taesd: nn.Module, latents: torch.Tensor, repeats: int = 5) -> dict:
    """Seconds to decode `latents` with the VAE and with TAESD, interleaved; and their ratio."""
    sf = vae.config.scaling_factor
    with torch.no_grad():
        t = interleaved_times({"vae": lambda: vae.decode(latents / sf).sample,
                               "taesd": lambda: taesd.decode(latents).sample}, repeats=repeats)
    return {"vae_s": asdict(t["vae"]), "taesd_s": asdict(t["taesd"]),
            "speedup": t["vae"].median / t["taesd"].median}


# ----------------------------------------------------------------------------- 3. precision and layout
def with_unet(pipe, unet: nn.Module):
    """The parts `ldm.sample` reads (tokenizer, text encoder, scheduler, VAE, vae_scale_factor)
    with another U-Net (a channels_last copy, a compiled one); the pipeline is left as it is."""
    from types import SimpleNamespace  # noqa: PLC0415

    return SimpleNamespace(**{**pipe.components, "unet": unet}, vae_scale_factor=pipe.vae_scale_factor)
def max_pixel_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of two image batches in [-1, 1], in [0, 1] pixel units."""
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a.float() - b.float()).abs().max() / 2)


def sample_vs_pipeline(pipe, prompt: str, num_inference_steps: int = 25, guidance_scale: float = 5.0,
                       repeats: int = 5) -> dict:
    """`ldm.sample` against the diffusers pipeline call on the same components and noise,
    interleaved: seconds of each, the ratio pipeline/ours (above 1: ours is faster), and the
    largest pixel difference between their images."""
    from .sampling import sample  # noqa: PLC0415

    latents = torch.randn(1, pipe.unet.config.in_channels, pipe.unet.config.sample_size,
                          pipe.unet.config.sample_size, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    ours = lambda: sample(pipe, prompt, latents=latents, **kw).images          # noqa: E731
    theirs = lambda: pipe(prompt, latents=latents, output_type="pt", **kw).images * 2 - 1  # noqa: E731
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        diff = max_pixel_difference(ours(), theirs())
        t = interleaved_times({"ldm_sample": ours, "pipeline": theirs}, repeats=repeats)
    return {"ldm_sample_s": asdict(t["ldm_sample"]), "pipeline_s": asdict(t["pipeline"]),
            "ratio_pipeline_over_ours": t["pipeline"].median / t["ldm_sample"].median,
            "max_pixel_difference": diff, "steps": num_inference_steps}


def precision_table(pipe, prompt: str, num_inference_steps: int = 25, guidance_scale: float = 5.0,
                    repeats: int = 3, compile_: bool = True) -> dict:
    """float32, bfloat16 autocast, channels_last and torch.compile (inductor) on one pipeline.

    Every variant samples the same prompt from the same noise with `ldm.sample`; times are
    interleaved (median and spread of `repeats`), images compared with float32's.
    The compiled U-Net's first call (compilation) is timed on its own.
    """
    from .sampling import sample  # noqa: PLC0415

    latents = torch.randn(1, 4, pipe.unet.config.sample_size, pipe.unet.config.sample_size,
                          generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, latents=latents)
    unet = pipe.unet
    cl = copy.deepcopy(unet).to(memory_format=torch.channels_last)

    def run(u, autocast=False):
        parts = with_unet(pipe, u)

        def go():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return sample(parts, prompt, **kw).images.float()
        return go

    fns = {"float32": run(unet), "bfloat16_autocast": run(unet, True), "channels_last": run(cl)}
    out: dict = {}
    if compile_:
        compiled = torch.compile(copy.deepcopy(unet))
        t0 = time.perf_counter()
        with torch.no_grad():
            run(compiled)()
        out["compile_first_call_s"] = time.perf_counter() - t0
        fns["torch_compile"] = run(compiled)
    with torch.no_grad():
        ref = fns["float32"]()
        images = {name: fn() for name, fn in fns.items()}
        t = interleaved_times(fns, repeats=repeats)
    base = t["float32"].median
    out["rows"] = {name: {"seconds": asdict(t[name]), "speedup_vs_float32": base / t[name].median,
                          "max_pixel_difference": max_pixel_difference(images[name], ref)}
                   for name in fns}
    return out


# ----------------------------------------------------------------------------- 2. VAE tiling
def vae_tiling(vae: nn.Module, grid: int = 4, seed: int = 0) -> dict:
    """Decode one large image's latents whole and tiled (`vae.enable_tiling()`): seconds, the
    largest single-op allocation (torch.profiler), and the pixel difference between the two.

    The image is a grid x grid mosaic of shapes-world scenes (grid=4: 512x512 from TinySD's 128x128
    scenes), encoded once (posterior mode), so the latents are ones a real image has.
    """
    from .tinysd import shapes  # noqa: PLC0415

    if not isinstance(grid, int) or grid < 2:
        raise ValueError(f"grid must be an int >= 2, got {grid!r}")
    tiles = shapes.render(shapes.sample_scenes(grid * grid, seed=seed))           # (g*g, 3, 128, 128)
    side = tiles.shape[-1]
    mosaic = tiles.view(grid, grid, 3, side, side).permute(2, 0, 3, 1, 4)         # (3, g, H, g, W)
    mosaic = mosaic.reshape(1, 3, grid * side, grid * side)                       # (1, 3, gH, gW)
    vae.disable_tiling()
    with torch.no_grad():
        z = vae.encode(mosaic).latent_dist.mode()                                 # (1, 4, gH/8, gW/8)
    out, images = {}, {}
    for tiled in (False, True):
        vae.enable_tiling() if tiled else vae.disable_tiling()
        name = "tiled" if tiled else "whole"
        with torch.no_grad():
            t0 = time.perf_counter()
            images[name] = vae.decode(z).sample.clamp(-1, 1)
            out[f"{name}_s"] = time.perf_counter() - t0
        out[f"{name}_largest_alloc_bytes"] = largest_op_allocation(lambda: vae.decode(z))
    vae.disable_tiling()
    out["max_pixel_difference"] = max_pixel_difference(images["tiled"], images["whole"])
    out["mean_pixel_difference"] = float((images["tiled"] - images["whole"]).abs().mean() / 2)
    out["image_side"] = grid * side
    return out


# ----------------------------------------------------------------------------- 4. training latents
def training_step_times(steps: int = 12, batch: int = 16, n_scenes: int = 512, pool: int = 256,
                        threads: int = 1) -> dict:
    """Seconds per training step of the inpainting stage with the VAE encode inside the step,
    and with it precomputed (`--pool`, pre-encoded latents), both through the training CLI into a
    copy of the weights. Returns the two runs' steps and training-loop seconds (setup excluded).
    """
    import shutil  # noqa: PLC0415

    from .tinysd import WEIGHTS_DIR  # noqa: PLC0415

    out = {"steps": steps, "batch": batch, "n_scenes": n_scenes, "pool": pool}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights"
        shutil.copytree(WEIGHTS_DIR, weights, ignore=shutil.ignore_patterns("vae-lab", "tinysd-scaling"))
        for name, extra in (("encode_each_step", []), ("pre_encoded", ["--pool", str(pool)])):
            cmd = [sys.executable, "-m", "ldm_tutorial.tinysd.train", "inpaint", "--steps", str(steps),
                   "--batch", str(batch), "--n-scenes", str(n_scenes), "--threads", str(threads),
                   "--out", str(weights), "--ckpt-dir", str(Path(tmp) / f"ck_{name}"),
                   "--latents-cache", str(Path(tmp) / "latents.pt"), *extra]
            subprocess.run(cmd, check=True, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            log = json.loads((weights / "training_log.json").read_text())["inpaint"]
            out[name] = {"steps": log["steps"], "seconds": log["seconds"],
                         "seconds_per_step": log["seconds"] / log["steps"]}
    out["saving"] = 1 - out["pre_encoded"]["seconds_per_step"] / out["encode_each_step"]["seconds_per_step"]
    return out


# ----------------------------------------------------------------------------- the measurement run
def machine() -> dict:
    """The machine a measurement ran on: CPU, cores, threads, torch, load average."""
    from .runtime import cpu_name  # noqa: PLC0415

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_1min": load_average()}


def measure(quick: bool = False) -> dict:
    """Every committed figure of the production chapter (a few minutes at one thread)."""
    from .models import load_pipeline  # noqa: PLC0415
    from .tinysd import load_taesd  # noqa: PLC0415

    t_start = time.time()
    pipe = load_pipeline("tiny", verbose=False)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle on the left and a small blue square in the top right corner"
    res: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "quick": quick}
    reps = 2 if quick else 5
    stage = tqdm(total=7, desc="production measurements")

    res["profile"] = {"guided": profile_image(pipe, prompt, 25, 5.0),
                      "unguided": profile_image(pipe, prompt, 25, 1.0)}
    res["unet_batch"] = unet_batch_ratio(pipe, repeats=5 if quick else 15)
    res["load_profile"] = load_average(); stage.update()

    res["attention"] = attention_sweep((256, 1024, 2048) if quick else (256, 512, 1024, 2048, 4096),
                                       repeats=reps)
    res["load_attention"] = load_average(); stage.update()

    res["vae_tiling"] = vae_tiling(pipe.vae, grid=2 if quick else 4)
    stage.update()

    res["precision"] = precision_table(pipe, prompt, repeats=reps, compile_=True)
    res["load_precision"] = load_average(); stage.update()

    taesd = load_taesd()
    lat = sample_latents = None
    from .sampling import sample  # noqa: PLC0415

    sample_latents = sample(pipe, prompt, num_inference_steps=25,
                            generator=torch.Generator().manual_seed(0)).latents
    lat = sample_latents
    res["preview"] = decode_ratio(pipe.vae, taesd, lat, repeats=reps * 2)
    res["sample_vs_pipeline"] = sample_vs_pipeline(pipe, prompt, repeats=reps + 2)
    res["load_sample_vs_pipeline"] = load_average(); stage.update()

    res["training_latents"] = training_step_times(steps=6 if quick else 16)
    res["load_training"] = load_average(); stage.update()

    sweep = scheduler_sweep(pipe, steps=(2, 4, 8) if quick else (2, 4, 8, 16, 25),
                            n_per_count=8 if quick else 48)
    res["schedulers"] = {k: ({str(s): r for s, r in v.items()} if isinstance(v, dict) and k in SCHEDULERS
                             else v) for k, v in sweep.items()}
    stage.update(); stage.close()

    res["flops"] = {m: flop_split(m) for m in SD_SPECS}
    res["taesd_parameters"] = taesd_parameters()
    res["seconds"] = time.time() - t_start
    return res


def _fmt_t(t: dict) -> str:
    return f"{t['median']:.3f} ({t['low']:.3f}-{t['high']:.3f})"


def markdown(res: dict) -> str:
    """benchmarks/production.md from a measurement's dict."""
    m = res["machine"]
    lines = ["# Production and performance: the committed measurements", "",
             "Written by `python -m ldm_tutorial.perf --measure --threads 1` (chapter 8 reads "
             "`ldm_tutorial/results/production.json`). Every time is the median of interleaved "
             "repeats (A, B, A, B, ...) with the spread (min-max) in brackets, on a machine shared "
             "with other work: ratios are the figures to trust, absolute seconds are not.", "",
             f"- machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch thread(s), torch "
             f"{m['torch']}, Python {m['python']}",
             f"- date: {res['date']}; the whole run took {res['seconds']:.0f} s",
             f"- 1-minute load average: {m['load_average_1min']} at the start, "
             f"{res['load_profile']} after the profile, {res['load_attention']} after the attention "
             f"sweep, {res['load_precision']} after the precision table, {res['load_training']} after "
             "the training steps", ""]
    p = res["profile"]
    lines += ["## 1. One TinySD image, by component (torch.profiler, 25 DDIM steps)", "",
              "| guidance | total s | text encoder s | U-Net s | U-Net calls | VAE decode s | other s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in p.items():
        lines.append(f"| {name} ({r['guidance_scale']}) | {r['total_s']:.3f} | {r['text_encoder_s']:.3f} | "
                     f"{r['unet_s']:.3f} | {r['unet_calls']} | {r['vae_decode_s']:.3f} | {r['other_s']:.3f} |")
    if "unet_batch" in res:
        ub = res["unet_batch"]
        lines += ["", f"The two profiles ran one after the other, not interleaved. Interleaved U-Net calls "
                  f"(n = {ub['batch_1_s']['n']} each): batch 1 {_fmt_t(ub['batch_1_s'])} s, batch 2 "
                  f"{_fmt_t(ub['batch_2_s'])} s: a guided step costs {ub['ratio']:.2f}x an unguided one"
                  + (f" (measured {ub['date']}, load {ub['load_average_1min']})" if "date" in ub else "") + "."]
    lines += ["", "FLOPs on the meta device (guidance on; batch 2 through the U-Net):", "",
              "| model | image | text encoder(s) GFLOP | U-Net step TFLOP | VAE decode TFLOP |",
              "|---|---:|---:|---:|---:|"]
    for name, f in res["flops"].items():
        lines.append(f"| {name} | {f['side']} | {f['text_encoder'] / 1e9:.1f} | {f['unet_step'] / 1e12:.2f} | "
                     f"{f['vae_decode'] / 1e12:.2f} |")
    lines += ["", "## 2. Attention: written out against SDPA (batch 1, 8 heads of 64, float32)", "",
              "| tokens | written-out s | SDPA s | written/SDPA | largest op allocation written / SDPA MiB | "
              "score matrix MiB |", "|---:|---:|---:|---:|---:|---:|"]
    for r in res["attention"]:
        lines.append(f"| {r['tokens']} | {_fmt_t(r['written_out_s'])} | {_fmt_t(r['sdpa_s'])} | "
                     f"{r['written_out_s']['median'] / r['sdpa_s']['median']:.2f} | "
                     f"{r['written_out_largest_alloc_bytes'] / 2**20:.1f} / {r['sdpa_largest_alloc_bytes'] / 2**20:.1f} | "
                     f"{r['score_matrix_bytes'] / 2**20:.1f} |")
    v = res["vae_tiling"]
    lines += ["", f"VAE decode at {v['image_side']}x{v['image_side']}: whole {v['whole_s']:.2f} s, largest op "
              f"allocation {v['whole_largest_alloc_bytes'] / 2**20:.1f} MiB; tiled {v['tiled_s']:.2f} s, "
              f"{v['tiled_largest_alloc_bytes'] / 2**20:.1f} MiB; max pixel difference {v['max_pixel_difference']:.4f}.",
              "", "## 3. Precision and layout (one image, 25 DDIM steps, guidance 5)", "",
              "| variant | seconds | speed-up vs float32 | max pixel difference |", "|---|---:|---:|---:|"]
    for name, r in res["precision"]["rows"].items():
        lines.append(f"| {name} | {_fmt_t(r['seconds'])} | {r['speedup_vs_float32']:.2f}x | "
                     f"{r['max_pixel_difference']:.4f} |")
    if "compile_first_call_s" in res["precision"]:
        lines.append(f"\ntorch.compile's first image (compilation included): "
                     f"{res['precision']['compile_first_call_s']:.1f} s.")
    pv, sv, tr = res["preview"], res["sample_vs_pipeline"], res["training_latents"]
    lines += ["", "## 4. Fewer steps, previews, pre-encoded latents", "",
              f"- preview decode: VAE {_fmt_t(pv['vae_s'])} s, TAESD {_fmt_t(pv['taesd_s'])} s: "
              f"{pv['speedup']:.1f}x faster",
              f"- `ldm.sample` {_fmt_t(sv['ldm_sample_s'])} s against the pipeline call "
              f"{_fmt_t(sv['pipeline_s'])} s: ratio {sv['ratio_pipeline_over_ours']:.3f} (above 1: ours is faster); "
              f"max pixel difference {sv['max_pixel_difference']:.2e}",
              f"- training step (inpaint stage, batch {tr['batch']}, {tr['steps']} steps each): VAE encode "
              f"inside the step {tr['encode_each_step']['seconds_per_step']:.3f} s, pre-encoded "
              f"{tr['pre_encoded']['seconds_per_step']:.3f} s: {100 * tr['saving']:.0f}% saved", "",
              f"Scheduler sweep: share of images the parser reads as exactly the prompt, "
              f"n = {res['schedulers']['n']} per cell, guidance {res['schedulers']['guidance_scale']}:", ""]
    steps = [s for s in res["schedulers"][SCHEDULERS[0]] if s != "scheduler"]
    lines += ["| scheduler | " + " | ".join(f"{s} steps (1 / 2 objects)" for s in steps) + " |",
              "|---|" + "---:|" * len(steps)]
    for name in SCHEDULERS:
        row = res["schedulers"][name]
        lines.append(f"| {name} | " + " | ".join(f"{row[s]['1_object']:.2f} / {row[s]['2_object']:.2f}"
                                                 for s in steps) + " |")
    tp = res["taesd_parameters"]
    lines += ["", f"TAESD (madebyollin/taesd's config, built on the meta device): {tp['total']:,} parameters "
              f"({tp['encoder']:,} encoder, {tp['decoder']:,} decoder).", ""]
    return "\n".join(lines)


# parts `--only` can re-measure on their own (vae_tiling: after a decoder change)
ONLY = {"unet_batch": unet_batch_ratio, "vae_tiling": lambda pipe: vae_tiling(pipe.vae, grid=4)}


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(prog="python -m ldm_tutorial.perf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", action="store_true", help="run every measurement and write the results")
    p.add_argument("--quick", action="store_true", help="small samples (a test of the run itself)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the chapter's setting)")
    p.add_argument("--only", choices=sorted(ONLY), default=None,
                   help="re-measure only this part and merge it into the existing results")
    p.add_argument("--json", type=Path, default=None, help="default: ldm_tutorial/results/production.json")
    p.add_argument("--markdown", type=Path, default=None, help="default: benchmarks/production.md")
    a = p.parse_args(argv)
    if not a.measure:
        p.error("nothing to do: pass --measure")
    if a.threads < 1:
        p.error(f"--threads must be positive, got {a.threads}")
    torch.set_num_threads(a.threads)
    from .results import path  # noqa: PLC0415

    json_path = a.json or path(RESULTS_NAME)
    md_path = a.markdown or REPO / "benchmarks" / "production.md"
    if a.only:          # re-measure one part and merge it into the committed results
        from .models import load_pipeline  # noqa: PLC0415

        res = json.loads(json_path.read_text())
        pipe = load_pipeline("tiny", verbose=False)
        res[a.only] = {**ONLY[a.only](pipe), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "load_average_1min": load_average()}
    else:
        res = measure(quick=a.quick)
    json_path.write_text(json.dumps(res, indent=1) + "\n")
    md_path.write_text(markdown(res))
    print(f"wrote {json_path} and {md_path}")
    return res


if __name__ == "__main__":
    main()
