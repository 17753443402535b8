"""Classifier-free guidance, written out, and the measurements of the guidance chapter (chapter 4).

    python -m ldm_tutorial.guidance --sweep --threads 1     # writes benchmarks/guidance.{json,md}

* `combine` is Ho & Salimans' formula (arXiv 2207.12598) on noise predictions, with Lin et al.'s
  rescale (arXiv 2305.08891, diffusers' `rescale_noise_cfg`); `x0_from_eps` / `score_from_eps`
  restate it for predicted clean latents and for scores.
* `guided_sample` is `ldm.sample`'s loop with the knobs the chapter turns: the batch order of the two
  branches, the chunk-swap bug, the rescale, a guidance interval (Kynkäänniemi et al., arXiv
  2404.07724) and any real w (ldm.sample and diffusers switch guidance off for w <= 1). It also
  returns the decoder's output before the clamp. `tests/test_guidance.py` checks it against
  `ldm.sample` and `StableDiffusionPipeline`.
* `image_metrics` / `diversity` / `sweep` score images with the shapes-world parser.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

BATCH_ORDERS = ("negative_first", "prompt_first")
SWEEP_SCALES = (0.0, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0)
EVAL_SEED = 20_000          # scene seeds for the sweep; TinySD trained on seeds below 10_000


# ----------------------------------------------------------------------------- the formula

def combine(noise_pred_uncond: torch.Tensor, noise_pred_text: torch.Tensor, guidance_scale: float,
            guidance_rescale: float = 0.0) -> torch.Tensor:
    """eps_uncond + w * (eps_text - eps_uncond), then Lin et al.'s rescale by phi = guidance_rescale.

    The rescale matches the per-sample std of the guided prediction to that of eps_text and mixes:
    phi * rescaled + (1 - phi) * guided (diffusers' `rescale_noise_cfg`). Shapes (B, C, h, w).
    """
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    if noise_pred_uncond.shape != noise_pred_text.shape:
        raise ValueError("noise_pred_uncond and noise_pred_text must have one shape, got "
                         f"{tuple(noise_pred_uncond.shape)} and {tuple(noise_pred_text.shape)}")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg  # noqa: PLC0415

    guided = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
    if guidance_rescale > 0:                    # diffusers' own rescale, as ldm.sample and the pipeline use
        guided = rescale_noise_cfg(guided, noise_pred_text, guidance_rescale)
    return guided


def x0_from_eps(latents: torch.Tensor, noise_pred: torch.Tensor, alpha_prod_t: float | torch.Tensor) -> torch.Tensor:
    """Predicted clean latents: (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t), a_t = alphas_cumprod[t]."""
    a = torch.as_tensor(alpha_prod_t, dtype=latents.dtype)
    return (latents - (1 - a).sqrt() * noise_pred) / a.sqrt()


def score_from_eps(noise_pred: torch.Tensor, alpha_prod_t: float | torch.Tensor) -> torch.Tensor:
    """The score grad log p_t(x_t) that an epsilon prediction implies: -eps / sqrt(1 - a_t)."""
    a = torch.as_tensor(alpha_prod_t, dtype=noise_pred.dtype)
    return -noise_pred / (1 - a).sqrt()


# ----------------------------------------------------------------------------- the loop

@dataclass
class GuidedOutput:
    images: torch.Tensor          # (B, 3, H, W) clamped to [-1, 1], as ldm.sample returns them
    raw: torch.Tensor             # (B, 3, H, W) the decoder's output before the clamp
    latents: torch.Tensor         # (B, C, h, w) final scaled latents
    timesteps: list[int]


@torch.no_grad()
def guided_sample(pipe, prompt: str | list[str], negative_prompt: str | list[str] = "",
                  guidance_scale: float = 5.0, num_inference_steps: int = 25,
                  generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                  batch_order: str = "negative_first", swap_chunks: bool = False,
                  guidance_rescale: float = 0.0,
                  guidance_interval: tuple[float, float] | None = None) -> GuidedOutput:
    """`ldm.sample`'s DDIM loop with every guidance knob exposed (chapter 4).

    Args:
        pipe: a StableDiffusionPipeline with a DDPM-family scheduler (TinySD, SD 1.5).
        guidance_scale: any real w, applied as written: w = 0 is the unconditional model, w = 1 the
            conditional one (ldm.sample and diffusers instead switch guidance off for w <= 1); or a
            (B, 1, 1, 1) tensor, one w per image (one batch for a grid over scales).
        batch_order: "negative_first" stacks [negative, prompt] (diffusers); "prompt_first" stacks
            [prompt, negative] and reads the second chunk as the unconditional one.
        swap_chunks: the bug: read the chunks the wrong way round for the batch order.
        guidance_rescale: Lin et al.'s phi in [0, 1] (0: off).
        guidance_interval: (lo, hi) in timestep units; steps with lo <= t <= hi are guided, the
            others use the conditional prediction alone (w = 1). None: every step.
        latents: initial noise (B, C, h, w); else drawn from `generator`.
    Returns:
        GuidedOutput with clamped images, the unclamped decoder output, final latents, timesteps.
    """
    from . import checks  # noqa: PLC0415 - the argument checks ldm.sample uses
    from .sampling import encode_prompt  # noqa: PLC0415

    if batch_order not in BATCH_ORDERS:
        raise ValueError(f"batch_order must be one of {BATCH_ORDERS}, got {batch_order!r}")
    prompts = checks.prompts(prompt)
    negatives = checks.negative_prompts(negative_prompt, len(prompts))
    num_inference_steps = checks.positive_int(num_inference_steps, "num_inference_steps")
    if not isinstance(guidance_scale, torch.Tensor):
        guidance_scale = checks.finite_number(guidance_scale, "guidance_scale")
    elif not torch.isfinite(guidance_scale).all():
        raise ValueError(f"guidance_scale must hold finite numbers, got {guidance_scale.flatten().tolist()}")
    guidance_rescale = checks.finite_number(guidance_rescale, "guidance_rescale", 0.0, 1.0)
    guidance_interval = checks.interval(guidance_interval)
    generator = checks.generators(generator, len(prompts))
    device, dtype = pipe.unet.device, pipe.unet.dtype
    vsf = pipe.vae_scale_factor
    size = pipe.unet.config.sample_size
    shape = (len(prompts), pipe.unet.config.in_channels, size, size)               # (B, C, h, w)
    if latents is None:            # as ldm.sample: a list of generators seeds image by image
        from diffusers.utils.torch_utils import randn_tensor  # noqa: PLC0415

        latents = randn_tensor(shape, generator=generator, dtype=dtype, device=torch.device("cpu"))
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")

    text = encode_prompt(pipe.tokenizer, pipe.text_encoder, prompts, device)           # (B, 77, D)
    uncond = encode_prompt(pipe.tokenizer, pipe.text_encoder, negatives, device)       # (B, 77, D)
    pair = [uncond, text] if batch_order == "negative_first" else [text, uncond]
    embeds = torch.cat(pair)                                                            # (2B, 77, D)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_inference_steps, device=device)
    latents = latents.to(device, dtype) * scheduler.init_noise_sigma
    # w = 1 needs only the conditional branch, w = 0 only the unconditional one
    only = None
    if guidance_interval is None and isinstance(guidance_scale, (int, float)):
        only = {1.0: "text", 0.0: "uncond"}.get(float(guidance_scale))

    for t in scheduler.timesteps:
        guided = guidance_interval is None or guidance_interval[0] <= int(t) <= guidance_interval[1]
        if only is not None or not guided:
            branch = text if (only == "text" or not guided) else uncond
            model_input = scheduler.scale_model_input(latents, t)
            noise_pred = pipe.unet(model_input, t, encoder_hidden_states=branch).sample
        else:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)       # (2B, C, h, w)
            noise_pred = pipe.unet(model_input, t, encoder_hidden_states=embeds).sample
            first, second = noise_pred.chunk(2)
            if batch_order == "negative_first":
                noise_pred_uncond, noise_pred_text = first, second
            else:
                noise_pred_text, noise_pred_uncond = first, second
            if swap_chunks:
                noise_pred_uncond, noise_pred_text = noise_pred_text, noise_pred_uncond
            noise_pred = combine(noise_pred_uncond, noise_pred_text, guidance_scale, guidance_rescale)
        latents = scheduler.step(noise_pred, t, latents).prev_sample

    raw = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample              # (B, 3, H, W)
    assert raw.shape[-1] == size * vsf
    return GuidedOutput(images=raw.clamp(-1, 1), raw=raw, latents=latents,
                        timesteps=[int(t) for t in scheduler.timesteps])


def timestep_for_sigma(scheduler, sigma: float) -> int:
    """The training timestep whose noise level sqrt((1 - a_t) / a_t) is closest to `sigma`."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    acp = scheduler.alphas_cumprod
    sigmas = ((1 - acp) / acp).sqrt()
    return int((sigmas - sigma).abs().argmin())


# ----------------------------------------------------------------------------- measurements

def hsv_saturation(images: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation (max - min) / max per image, images (B, 3, H, W) in [-1, 1] -> (B,)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    x = (images.clamp(-1, 1) + 1) / 2
    mx, mn = x.max(1).values, x.min(1).values
    return ((mx - mn) / mx.clamp_min(1e-6)).mean((1, 2))


def out_of_range_share(raw: torch.Tensor) -> torch.Tensor:
    """Share of values the clamp to [-1, 1] changes, per image: raw (B, 3, H, W) -> (B,)."""
    return (raw.abs() > 1).float().flatten(1).mean(1)


def background_std(image: torch.Tensor, parsed: list, dilate: int = 3) -> float:
    """Std of the pixels outside the parser's objects (masks grown by `dilate` px), mean over RGB.

    image (3, H, W) in [-1, 1]; the shapes world's backgrounds are flat, gradients, noise or
    stripes, so this reads how much texture (or noise) a sample puts behind its objects.
    """
    fg = np.zeros(image.shape[-2:], dtype=bool)
    for p in parsed:
        fg |= p.mask
    if dilate:
        fg = ndimage.binary_dilation(fg, iterations=dilate)
    bg = ~fg
    if bg.sum() < 100:
        return float("nan")
    x = image.clamp(-1, 1).float().cpu().numpy()[:, bg]          # (3, n_background_pixels)
    return float(x.std(axis=1).mean())


def pairwise_rms(x: torch.Tensor) -> float:
    """Mean over pairs (i < j) of the RMS difference between x[i] and x[j]; x (S, ...), S >= 2."""
    if x.shape[0] < 2:
        raise ValueError(f"pairwise_rms needs at least 2 samples along dim 0, got {x.shape[0]}")
    flat = x.flatten(1).float()
    return float(np.mean([((flat[i] - flat[j]) ** 2).mean().sqrt().item()
                          for i, j in itertools.combinations(range(len(flat)), 2)]))


def image_metrics(out: GuidedOutput, scenes: list) -> dict[str, list]:
    """Per image: exactly the prompt (parser), HSV saturation, clamped share, background std."""
    from .tinysd import evaluate, parser  # noqa: PLC0415

    parsed = [parser.parse_scene(im) for im in out.images]
    return {"correct": [bool(evaluate.fully_correct(p, s.objects)) for p, s in zip(parsed, scenes)],
            "saturation": hsv_saturation(out.images).tolist(),
            "out_of_range": out_of_range_share(out.raw).tolist(),
            "background_std": [background_std(im, p) for im, p in zip(out.images, parsed)]}


def start_noise(n_prompts: int, seeds: int, shape: tuple[int, ...], seed: int = EVAL_SEED) -> torch.Tensor:
    """(seeds, n_prompts, C, h, w) starting noise, one fixed draw per (seed, prompt) for every setting."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((seeds, n_prompts) + tuple(shape), generator=g)


def sweep_scenes(n_per_count: int = 32, counts: tuple[int, ...] = (1, 2), seed: int = EVAL_SEED) -> list:
    """The sweep's prompts: `n_per_count` held-out scenes with each number of objects."""
    from .tinysd import shapes  # noqa: PLC0415

    return [s for k in counts for s in shapes.sample_scenes(n_per_count, seed=seed + k, n_objects=k)]


@torch.no_grad()
def measure(pipe, scenes: list, noise: torch.Tensor, batch: int = 64, progress: str | None = None,
            negative_prompt: str | list[str] = "", keep_images: bool = False, **guidance) -> dict:
    """One guidance setting over every (seed, prompt): adherence, diversity, saturation, background.

    noise: (S, P, C, h, w) from `start_noise`; guidance: keyword arguments of `guided_sample`.
    Returns means (and n) of: fully_correct, saturation, out_of_range, background_std, and the
    diversity between the S seeds of one prompt (RMS, pixels in [-1, 1] and scaled latents).
    keep_images adds "images": the (S, P, 3, H, W) clamped images (not JSON: for live use).
    """
    from . import checks  # noqa: PLC0415
    from .tinysd import shapes  # noqa: PLC0415

    S, P = noise.shape[:2]
    if P != len(scenes):
        raise ValueError(f"noise must hold one draw per scene ({len(scenes)}), got {P}")
    negatives = checks.negative_prompts(negative_prompt, P)
    prompts = [shapes.describe(s) for s in scenes]
    per = {"correct": [], "saturation": [], "out_of_range": [], "background_std": []}
    images = torch.empty(S, P, 3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    lat = torch.empty_like(noise)
    jobs = [(s, i) for s in range(S) for i in range(0, P, batch)]
    t0 = time.perf_counter()
    for s, i in tqdm(jobs, desc=progress, disable=progress is None, mininterval=10):
        out = guided_sample(pipe, prompts[i:i + batch], negatives[i:i + batch],
                            latents=noise[s, i:i + batch], **guidance)
        for k, v in image_metrics(out, scenes[i:i + batch]).items():
            per[k] += v
        images[s, i:i + batch], lat[s, i:i + batch] = out.images, out.latents
    seconds = time.perf_counter() - t0
    row = {k: float(np.nanmean(v)) for k, v in per.items()}
    row["fully_correct_by_count"] = {
        f"{k}_object": float(np.mean([c for c, sc in zip(per["correct"], scenes * S) if len(sc.objects) == k]))
        for k in sorted({len(sc.objects) for sc in scenes})}
    if S >= 2:
        row["diversity_pixels"] = float(np.mean([pairwise_rms(images[:, p]) for p in range(P)]))
        row["diversity_latents"] = float(np.mean([pairwise_rms(lat[:, p]) for p in range(P)]))
    row.update(n_images=S * P, n_prompts=P, n_seeds=S, seconds=seconds)
    if keep_images:
        row["images"] = images
    return row


SWEEP_EXTRAS = (
    {"name": "swapped chunks, w=7.5", "guidance_scale": 7.5, "swap_chunks": True},
    {"name": "rescale 0.7, w=7.5", "guidance_scale": 7.5, "guidance_rescale": 0.7},
    {"name": "rescale 0.7, w=15", "guidance_scale": 15.0, "guidance_rescale": 0.7},
    {"name": "interval, w=7.5", "guidance_scale": 7.5, "interval": True},
    {"name": "interval, w=15", "guidance_scale": 15.0, "interval": True},
)
INTERVAL = (200, 700)       # timesteps guided in the sweep's interval rows (TinySD, 25 DDIM steps)


def negative_prompt_cases() -> dict[str, list]:
    """Prompts for the negative-prompt measurement: a blue square and a red square, every size and cell."""
    from .tinysd import shapes  # noqa: PLC0415

    return {colour: [shapes.Scene([shapes.SceneObject(colour, "square", size, pos)], jitter=[(0, 0)])
                     for size in shapes.SIZES for pos in shapes.POSITIONS]
            for colour in ("blue", "red")}


def sweep(pipe, scales=SWEEP_SCALES, n_per_count: int = 32, seeds: int = 2, steps: int = 25,
          batch: int = 64, extras=SWEEP_EXTRAS, negatives: bool = True, on_row=None) -> dict:
    """The chapter's guidance sweep: every scale, then the extras, on the same prompts and noise."""
    scenes = sweep_scenes(n_per_count)
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    noise = start_noise(len(scenes), seeds, shape)
    result = {"steps": steps, "scheduler": type(pipe.scheduler).__name__, "n_prompts": len(scenes),
              "n_per_count": n_per_count, "seeds": seeds, "interval": list(INTERVAL), "scales": {},
              "extras": {}, "negative_prompts": {}}
    for w in scales:
        result["scales"][str(w)] = measure(pipe, scenes, noise, batch, f"w={w}", guidance_scale=w,
                                           num_inference_steps=steps)
        on_row and on_row(result)
    for ex in extras or ():
        kw = {k: v for k, v in ex.items() if k not in ("name", "interval")}
        if ex.get("interval"):
            kw["guidance_interval"] = INTERVAL
        result["extras"][ex["name"]] = {**measure(pipe, scenes, noise, batch, ex["name"],
                                                  num_inference_steps=steps, **kw),
                                        "settings": {k: (list(v) if isinstance(v, tuple) else v)
                                                     for k, v in kw.items()}}
        on_row and on_row(result)
    if negatives:
        for colour, sc in negative_prompt_cases().items():
            nz = start_noise(len(sc), seeds, shape, seed=EVAL_SEED + 7)
            for neg in ("", "a red circle"):
                result["negative_prompts"][f"{colour} square, negative {neg!r}"] = measure(
                    pipe, sc, nz, batch, f"{colour}/{neg!r}", negative_prompt=neg, guidance_scale=5.0,
                    num_inference_steps=steps)
                on_row and on_row(result)
    return result


def markdown(result: dict) -> str:
    """The committed table: one row per setting."""
    from .runtime import cpu_name  # noqa: PLC0415

    m = result.get("meta", {})
    lines = ["# Classifier-free guidance sweep (TinySD)", "",
             f"`python -m ldm_tutorial.guidance --sweep --threads {m.get('threads', 1)}` on {m.get('machine', cpu_name())},"
             f" {m.get('date', '')}, {m.get('seconds', 0):.0f} s in all. {result['n_prompts']} held-out prompts"
             f" ({result['n_per_count']} with one object, {result['n_per_count']} with two) x {result['seeds']} seeds"
             f" = {result['n_prompts'] * result['seeds']} images per row; {result['steps']} DDIM steps; the same starting"
             " noise in every row. Diversity: mean RMS difference between the seeds of one prompt (pixels in"
             " [-1, 1]; scaled latents). Out of range: share of decoder outputs outside [-1, 1] before the clamp."
             f" Background std: pixels outside the parser's objects. Interval rows guide only {result['interval'][0]}"
             f" <= t <= {result['interval'][1]} (w = 1 elsewhere). Read by `book/04_guidance/guidance.md`.", "",
             "| setting | fully correct | 1 object | 2 objects | diversity px | diversity latents |"
             " saturation | out of range | background std | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def row(name, r):
        by = r["fully_correct_by_count"]
        return (f"| {name} | {r['correct']:.3f} | {by.get('1_object', float('nan')):.3f} |"
                f" {by.get('2_object', float('nan')):.3f} | {r.get('diversity_pixels', float('nan')):.3f} |"
                f" {r.get('diversity_latents', float('nan')):.3f} | {r['saturation']:.3f} | {r['out_of_range']:.4f} |"
                f" {r['background_std']:.3f} | {r['seconds']:.0f} |")

    lines += [row(f"w={w}", r) for w, r in result["scales"].items()]
    lines += [row(name, r) for name, r in result["extras"].items()]
    if result["negative_prompts"]:
        lines += ["", f"Negative prompts (w = 5, one square at each size and cell, {result['seeds']} seeds):", "",
                  "| prompt, negative | fully correct | n |", "|---|---|---|"]
        lines += [f"| {k} | {r['correct']:.3f} | {r['n_images']} |" for k, r in result["negative_prompts"].items()]
    return "\n".join(lines) + "\n"


def load_sweep(path: str | Path | None = None) -> dict:
    """The committed sweep: `ldm.results.load("guidance")`, or the JSON file at `path`."""
    from . import results  # noqa: PLC0415

    if path is None:
        return results.load("guidance")
    if not Path(path).exists():
        raise FileNotFoundError(f"no guidance sweep at {path}; run python -m ldm_tutorial.guidance --sweep")
    return json.loads(Path(path).read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="run the sweep and write --out / --markdown")
    ap.add_argument("--n-per-count", type=int, default=32, help="prompts with one object, and with two")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scales", type=str, default=",".join(map(str, SWEEP_SCALES)))
    ap.add_argument("--no-extras", action="store_true")
    ap.add_argument("--out", default=None, help="default: ldm_tutorial/results/guidance.json (shipped)")
    ap.add_argument("--markdown", default="benchmarks/guidance.md")
    a = ap.parse_args(argv)
    if not a.sweep:
        ap.error("nothing to do: pass --sweep")
    torch.set_num_threads(a.threads)
    from .models import load_pipeline  # noqa: PLC0415
    from .runtime import cpu_name  # noqa: PLC0415

    pipe = load_pipeline("tiny", device="cpu", verbose=False)
    t0 = time.perf_counter()
    meta = {"machine": f"{cpu_name()}, {a.threads} thread(s) of {os.cpu_count()}", "threads": a.threads,
            "date": datetime.date.today().isoformat(), "torch": torch.__version__}

    def write(result):
        result["meta"] = {**meta, "seconds": time.perf_counter() - t0}
        from . import results  # noqa: PLC0415

        Path(a.out or results.path("guidance")).write_text(json.dumps(result, indent=1) + "\n")
        Path(a.markdown).write_text(markdown(result))

    scales = tuple(float(s) for s in a.scales.split(","))
    result = sweep(pipe, scales, a.n_per_count, a.seeds, a.steps, a.batch,
                   extras=() if a.no_extras else SWEEP_EXTRAS, negatives=not a.no_extras, on_row=write)
    write(result)
    print(markdown(result))


if __name__ == "__main__":
    main()
