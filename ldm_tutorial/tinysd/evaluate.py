"""Measure TinySD and print one JSON object of the figures.

    python -m ldm_tutorial.tinysd.evaluate [--quick] [--out FILE]

Figures (all on held-out data the training never saw: scene seeds >= 10_000, held-out photos):
* parser accuracy on generated scenes (exact match of every object's colour, shape, size, position)
* tiny CLIP zero-shot retrieval on one-object scenes: the true caption against the 17 captions that
  differ from it in exactly one attribute (chance 1/18), overall and per attribute
* VAE: PSNR / SSIM of the round trip on held-out shapes and photos, parser accuracy on the
  reconstructed shapes, latent std before and after the scaling factor
* TAESD, the preview decoder: closeness to the VAE's decode, parser accuracy, decode speed-up
* load, encode and decode times on this machine's CPU
* with --generation: prompt adherence by number of objects, inpainting, seconds per image
* with --defects (alone): the visual-defect metrics of `defects` (corner smudge, edge fringe,
  background texture, extra objects, misdrawn small squares) for rendered scenes, the VAE round trip,
  TAESD, constant latents and text-to-image; --diagnose adds guidance / sampler settings, and
  --candidate-vae DIR measures another decoder on the same latents (`defect_study`)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..metrics import psnr, ssim  # noqa: F401 - re-exported: evaluate.psnr / evaluate.ssim
from ..runtime import cpu_name
from . import WEIGHTS_DIR, data, load_clip, load_taesd, load_vae, objective_comparison, parser, shapes

EVAL_SEED = 10_000          # training scenes come from seeds below this


def read_back(images: torch.Tensor, scenes: list) -> float:
    """Share of images the parser reads as exactly their scene (every object's colour, shape, size, cell)."""
    return float(np.mean([parser.scene_matches(parser.parse_scene(im), s) for im, s in zip(images, scenes)]))


def parser_accuracy(n: int = 500, seed: int = EVAL_SEED) -> float:
    scenes = shapes.sample_scenes(n, seed=seed)
    return read_back(shapes.render(scenes), scenes)


@torch.no_grad()
def clip_retrieval(n: int = 300, seed: int = EVAL_SEED + 1, model=None, tokenizer=None) -> dict:
    """Top-1 of the true caption among it and its 17 one-attribute variants, one-object scenes."""
    if model is None:
        model, tokenizer = load_clip()
    scenes = shapes.sample_scenes(n, seed=seed, n_objects=1)
    images = shapes.render(scenes)
    feats = model.get_image_features(pixel_values=images)
    img = F.normalize(getattr(feats, "pooler_output", feats), dim=-1)
    top1, per_attr = [], {a: [] for a in ("colour", "shape", "size", "position")}
    for i, s in enumerate(scenes):
        variants = shapes.one_attribute_variants(s.objects[0])
        texts = [s.objects[0].phrase()] + [v.phrase() for _, v in variants]
        ids = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        tf = model.get_text_features(input_ids=ids)
        sim = img[i] @ F.normalize(getattr(tf, "pooler_output", tf), dim=-1).T
        top1.append(bool(sim.argmax() == 0))
        for attr in per_attr:
            rivals = [j + 1 for j, (a, _) in enumerate(variants) if a == attr]
            per_attr[attr].append(bool(sim[0] > sim[rivals].max()))
    return {"top1_of_18": float(np.mean(top1)), "chance": 1 / 18,
            "per_attribute": {a: float(np.mean(v)) for a, v in per_attr.items()}, "n": n}


@torch.no_grad()
def vae_metrics(n_shapes: int = 128, seed: int = EVAL_SEED + 2, vae=None) -> dict:
    vae = vae if vae is not None else load_vae()
    scenes = shapes.sample_scenes(n_shapes, seed=seed)
    x = shapes.render(scenes)
    photos = data.heldout_photo_crops()
    out = {}
    for name, imgs in (("shapes", x), ("photos", photos)):
        t0 = time.perf_counter()
        post = vae.encode(imgs).latent_dist
        t1 = time.perf_counter()
        rec = vae.decode(post.mode()).sample.clamp(-1, 1)
        t2 = time.perf_counter()
        out[name] = {"psnr_db": float(psnr(imgs, rec).mean()), "psnr_db_min": float(psnr(imgs, rec).min()),
                     "ssim": float(ssim(imgs, rec).mean()), "n": len(imgs),
                     "encode_ms_per_image": 1000 * (t1 - t0) / len(imgs),
                     "decode_ms_per_image": 1000 * (t2 - t1) / len(imgs)}
        if name == "shapes":
            out[name]["parser_accuracy_on_reconstructions"] = read_back(rec, scenes)
            z = post.sample(generator=torch.Generator().manual_seed(0))
            sf = vae.config.scaling_factor
            out["latents"] = {"std": float(z.std()), "mean": float(z.mean()), "scaling_factor": sf,
                              "scaled_std": float((z * sf).std()), "shape": list(z.shape[1:])}
    return out


@torch.no_grad()
def taesd_metrics(n_shapes: int = 64, seed: int = EVAL_SEED + 5, vae=None, taesd=None) -> dict:
    """The preview decoder against the VAE it was distilled from, on held-out shapes.

    Both decode the same scaled latents (the VAE's posterior mode): how close the preview is to the
    VAE's own decode, how close each is to the original image, whether the parser still reads the
    previews, how far TAESD's encoder lands from the VAE's latents, and the decode times.
    """
    vae = vae if vae is not None else load_vae()
    taesd = taesd if taesd is not None else load_taesd()
    scenes = shapes.sample_scenes(n_shapes, seed=seed)
    x = shapes.render(scenes)
    sf = vae.config.scaling_factor
    z = vae.encode(x).latent_dist.mode() * sf
    vae.decode(z[:2] / sf), taesd.decode(z[:2])                     # warm-up
    t0 = time.perf_counter()
    full = vae.decode(z / sf).sample.clamp(-1, 1)
    t1 = time.perf_counter()
    preview = taesd.decode(z).sample.clamp(-1, 1)
    t2 = time.perf_counter()
    z_hat = taesd.encode(x).latents
    return {"n": n_shapes,
            "psnr_preview_vs_vae_decode_db": float(psnr(full, preview).mean()),
            "psnr_vs_original_db": {"vae": float(psnr(x, full).mean()), "taesd": float(psnr(x, preview).mean())},
            "parser_accuracy": {"vae": read_back(full, scenes), "taesd": read_back(preview, scenes)},
            "encoder_relative_error": float((z_hat - z).norm() / z.norm()),
            "decode_ms_per_image": {"vae": 1000 * (t1 - t0) / n_shapes, "taesd": 1000 * (t2 - t1) / n_shapes},
            "decode_speedup": (t1 - t0) / (t2 - t1)}


def seconds_per_image(steps: int = 25, guidance_scale: float = 5.0, repeats: int = 3) -> float:
    """Wall seconds for one 128x128 image (batch 1, CFG) on this machine: best of `repeats`."""
    from ldm_tutorial.models import load_pipeline  # noqa: PLC0415

    pipe = load_pipeline("tiny", verbose=False)
    pipe("a red circle in the centre", num_inference_steps=2)  # warm-up
    best = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        pipe("a small red circle on the left", num_inference_steps=steps, guidance_scale=guidance_scale,
             generator=torch.Generator().manual_seed(r))
        best = min(best, time.perf_counter() - t0)
    return best


def fully_correct(parsed: list, wanted: list[shapes.SceneObject]) -> bool:
    """Every requested object is there (colour, shape, position) and nothing else is."""
    return all(parser.objects_present(parsed, wanted)) and len(parsed) == len(wanted)


def _fully_correct_share(scenes: list, generate, batch: int) -> list[bool]:
    """generate(prompts, first_index) -> images in [-1, 1]; whether each image is exactly its scene's prompt."""
    ok = []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i:i + batch]
        images = generate([shapes.describe(s) for s in chunk], i)
        ok += [fully_correct(parser.parse_scene(im), s.objects) for im, s in zip(images, chunk)]
    return ok


@torch.no_grad()
def prompt_adherence(pipe=None, n_per_count: int = 48, counts: tuple[int, ...] = (1, 2), steps: int = 25,
                     guidance_scale: float = 5.0, batch: int = 16, seed: int = EVAL_SEED + 3) -> dict:
    """Share of generated images the parser reads as exactly the prompt, by number of objects."""
    from ldm_tutorial.models import load_pipeline  # noqa: PLC0415

    pipe = pipe or load_pipeline("tiny", verbose=False)
    out = {"steps": steps, "guidance_scale": guidance_scale, "scheduler": type(pipe.scheduler).__name__}
    for k in counts:
        scenes = shapes.sample_scenes(n_per_count, seed=seed + k, n_objects=k)
        t0 = time.perf_counter()
        ok = _fully_correct_share(scenes, lambda prompts, i: pipe(
            prompts, num_inference_steps=steps, guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(seed + i), output_type="pt").images * 2 - 1, batch)
        out[f"{k}_object"] = {"fully_correct": float(np.mean(ok)), "n": n_per_count,
                              "seconds_per_image_batched": (time.perf_counter() - t0) / n_per_count}
        if k == 1:   # where the errors sit: small objects span 2.5 latent cells, large ones 4
            for size in shapes.SIZES:
                hits = [o for o, s in zip(ok, scenes) if s.objects[0].size == size]
                out["1_object"][f"fully_correct_{size}"] = float(np.mean(hits)) if hits else None
                out["1_object"][f"n_{size}"] = len(hits)
    return out


@torch.no_grad()
def steps_sweep(pipes: dict, steps: tuple[int, ...] = (2, 4, 8, 16, 25), n_per_count: int = 48,
                counts: tuple[int, ...] = (1, 2), guidance_scale: float = 5.0, batch: int = 48,
                seed: int = EVAL_SEED + 6, flow_spacing: str = "flux") -> dict:
    """Prompt adherence against the number of sampling steps, for several models on the same prompts and noise.

    pipes: name -> a text-to-image pipeline (any scheduler `ldm.sample` drives, flow ones included).
    flow_spacing: for flow-matching schedulers, "flux" (n equal steps, `flux_sigmas`: every model call
        is a real step) or "diffusers" (the scheduler's own spacing, whose last step is 0.001 -> 0).
    Returns {name: {steps: {"1_object": share fully correct, ...}}} with the sample sizes under "n".
    """
    from ldm_tutorial.sampling import sample, sigmas_for  # noqa: PLC0415

    if flow_spacing not in ("flux", "diffusers"):
        raise ValueError(f"flow_spacing must be 'flux' or 'diffusers', got {flow_spacing!r}")
    if not pipes:
        raise ValueError("pipes must name at least one pipeline, got an empty dict")
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be positive integers, got {steps}")
    scenes = {k: shapes.sample_scenes(n_per_count, seed=seed + k, n_objects=k) for k in counts}
    out: dict = {"n": {f"{k}_object": n_per_count for k in counts}, "guidance_scale": guidance_scale}
    for name, pipe in pipes.items():
        out[name] = {"scheduler": type(pipe.scheduler).__name__}
        for n_steps in tqdm(steps, desc=f"steps sweep: {name}", mininterval=5):
            sigmas = sigmas_for(pipe.scheduler, n_steps) if flow_spacing == "flux" else None
            row = {}
            for k, sc in scenes.items():
                ok = _fully_correct_share(sc, lambda prompts, i: sample(
                    pipe, prompts, num_inference_steps=n_steps, guidance_scale=guidance_scale, sigmas=sigmas,
                    generator=torch.Generator().manual_seed(seed + 100 * k + i)).images, batch)
                row[f"{k}_object"] = float(np.mean(ok))
            out[name][n_steps] = row
    return out


@torch.no_grad()
def inpaint_metrics(pipe=None, n: int = 32, steps: int = 25, guidance_scale: float = 5.0, batch: int = 16,
                    seed: int = EVAL_SEED + 4) -> dict:
    """Paint a new object into an empty cell: adherence inside the mask, PSNR outside it."""
    from ldm_tutorial.models import load_pipeline  # noqa: PLC0415

    pipe = pipe or load_pipeline("tiny", task="inpaint", verbose=False)
    rng = np.random.default_rng(seed)
    cases = []
    for scene in shapes.sample_scenes(n, seed=seed, n_objects=None):
        scene.objects = scene.objects[:2]
        scene.jitter = scene.jitter[:2]
        free = [p for p in shapes.POSITIONS if p not in {o.position for o in scene.objects}]
        used = {o.colour for o in scene.objects}
        new = shapes.SceneObject(rng.choice([c for c in shapes.COLOURS if c not in used]),
                                 rng.choice(shapes.SHAPES), "large", rng.choice(free))
        cases.append((scene, new))
    ok, psnrs, ceiling = [], [], []
    size = shapes.IMAGE_SIZE
    for i in range(0, n, batch):
        chunk = cases[i:i + batch]
        images = shapes.render([s for s, _ in chunk])
        masks = torch.zeros(len(chunk), 1, size, size)
        for j, (_, new) in enumerate(chunk):
            cx, cy = shapes.cell_centre(new.position)
            h = size // 6 + 2
            masks[j, :, max(0, int(cy) - h):int(cy) + h, max(0, int(cx) - h):int(cx) + h] = 1
        prompts = [shapes.describe(shapes.Scene(s.objects + [new])) for s, new in chunk]
        result = pipe(prompts, image=(images + 1) / 2, mask_image=masks, num_inference_steps=steps,
                      guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed + i),
                      output_type="pt", height=size, width=size).images * 2 - 1
        # the ceiling: the pipeline decodes every pixel through the VAE, so outside the mask it can at
        # best match the VAE's own round trip of the image
        round_trip = pipe.vae.decode(pipe.vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
        ok += [parser.objects_present(parser.parse_scene(r), [new])[0] for r, (_, new) in zip(result, chunk)]
        psnrs += psnr(result, images, mask=masks < 0.5).tolist()
        ceiling += psnr(round_trip, images, mask=masks < 0.5).tolist()
    return {"adherence_inside_mask": float(np.mean(ok)), "psnr_outside_mask_db": float(np.mean(psnrs)),
            "psnr_outside_mask_vae_round_trip_db": float(np.mean(ceiling)), "n": n,
            "steps": steps, "guidance_scale": guidance_scale}


# ----------------------------------------------------------------------------- visual defects (issue 21)
DEFECT_SEED = EVAL_SEED + 3     # prompt_adherence's prompts and noise: the standard evaluation's
DEFECT_REFERENCE_SEED = 1       # rendered training scenes (seeds below EVAL_SEED): the reference
DEFECT_SETTINGS: dict[str, dict] = {   # the diagnosis rows: name -> ldm.sample settings (+ "scheduler")
    "guidance 1 (no guidance)": {"guidance_scale": 1.0},
    "guidance 3": {"guidance_scale": 3.0},
    "guidance 5 (default)": {},
    "guidance 7.5": {"guidance_scale": 7.5},
    "guidance interval t in [200, 700]": {"guidance_interval": (200, 700)},
    "guidance interval t in [0, 700]": {"guidance_interval": (0, 700)},      # no guidance at high noise
    "guidance interval t in [200, 1000]": {"guidance_interval": (200, 1000)},  # none at low noise
    "guidance_rescale 0.7": {"guidance_rescale": 0.7},
    "DDIM eta 1": {"eta": 1.0},
    "DPM-Solver++ (25 steps)": {"scheduler": "DPM-Solver++"},
    "50 DDIM steps": {"num_inference_steps": 50},
    "DDIM, trailing timesteps": {"scheduler": "DDIM trailing"},   # starts at t = 999, not 961
    # autoguidance (ldm.sample's autoguidance_unet): the small U-Net of load_autoguidance_unet
    "guidance 3 + autoguidance 2": {"guidance_scale": 3.0, "autoguidance": 2.0},
    "guidance 4 + autoguidance 2": {"guidance_scale": 4.0, "autoguidance": 2.0},
    "guidance 4 + autoguidance 3": {"guidance_scale": 4.0, "autoguidance": 3.0},
    # signal-leak initial latents (ldm.signal_leak_latents, TinySD's shipped leak model)
    "guidance 5 + signal leak": {"signal_leak": True},
    "guidance 4 + autoguidance 2 + signal leak": {"guidance_scale": 4.0, "autoguidance": 2.0,
                                                  "signal_leak": True},
    "guidance 4 + autoguidance 3 + signal leak": {"guidance_scale": 4.0, "autoguidance": 3.0,
                                                  "signal_leak": True},
}


def defect_scenes(n_per_count: int = 32, counts: tuple[int, ...] = (1, 2), seed: int = DEFECT_SEED) -> list:
    """The first n_per_count scenes of each count of the standard evaluation (`prompt_adherence`)."""
    if n_per_count < 1:
        raise ValueError(f"n_per_count must be a positive integer, got {n_per_count}")
    return [s for k in counts for s in shapes.sample_scenes(n_per_count, seed=seed + k, n_objects=k)]


def defect_reference(n: int = 256, seed: int = DEFECT_REFERENCE_SEED) -> tuple[torch.Tensor, list]:
    """Rendered training-distribution scenes (seed below EVAL_SEED) and their parses."""
    if seed >= EVAL_SEED:
        raise ValueError(f"seed must be below {EVAL_SEED} (training scenes), got {seed}")
    x = shapes.render(shapes.sample_scenes(n, seed=seed))
    return x, [parser.parse_scene(im) for im in x]


@torch.no_grad()
def generation_latents(pipe, scenes: list, setting: dict | None = None, batch: int = 16,
                       seed: int = DEFECT_SEED, n_per_count: int | None = None) -> torch.Tensor:
    """Final (scaled) latents of `ldm.sample` for each scene's canonical prompt, before decoding.

    The noise is prompt_adherence's: one CPU generator seeded seed + i for the batch starting at
    the i-th prompt of each count (n_per_count prompts per count), so the first images of each count
    are the standard evaluation's. setting: ldm.sample keyword arguments, plus "scheduler" (a name
    for `ldm_tutorial.perf.make_scheduler`), "autoguidance" (an autoguidance_scale, with
    `load_autoguidance_unet` as the weak model) and "signal_leak" (True: the initial latents are
    `ldm.signal_leak_latents` from the same generator: the same eps plus TinySD's leak); 25 steps
    and guidance 5 unless it says otherwise.
    Decoding them with any VAE (`decode_latents`) is the same generation with that decoder.
    """
    from ldm_tutorial.perf import with_scheduler  # noqa: PLC0415
    from ldm_tutorial.sampling import sample  # noqa: PLC0415

    setting = dict(setting or {})
    if "scheduler" in setting:
        pipe = with_scheduler(pipe, setting.pop("scheduler"))
    if "autoguidance" in setting:
        from . import load_autoguidance_unet  # noqa: PLC0415

        setting.update(autoguidance_scale=setting.pop("autoguidance"),
                       autoguidance_unet=load_autoguidance_unet(pipe))
    leak = None
    if setting.pop("signal_leak", False):
        from ldm_tutorial.signal_leak import signal_leak_latents  # noqa: PLC0415
        from . import load_signal_leak  # noqa: PLC0415

        leak = load_signal_leak()
    kw = {"num_inference_steps": 25, "guidance_scale": 5.0, **setting}
    n_per_count = n_per_count or len(scenes)
    out = []
    for start in tqdm(range(0, len(scenes), batch), desc="generating", mininterval=10):
        chunk = scenes[start:start + batch]
        i = start % n_per_count
        if i + len(chunk) > n_per_count and n_per_count % batch:
            raise ValueError(f"batch must divide n_per_count ({n_per_count}), got {batch}")
        gen = torch.Generator().manual_seed(seed + i)
        if leak is not None:
            kw["latents"] = signal_leak_latents(pipe, len(chunk), kw["num_inference_steps"], gen, leak)
        res = sample(pipe, [shapes.describe(s) for s in chunk], generator=gen, **kw)
        out.append(res.latents)
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] through `vae` (its own scaling factor undone)."""
    sf = vae.config.scaling_factor
    return torch.cat([vae.decode(latents[i:i + batch] / sf).sample.clamp(-1, 1)
                      for i in range(0, len(latents), batch)])


@torch.no_grad()
def defect_metrics(vae=None, taesd=None, pipe=None, n_per_count: int = 32, n_reference: int = 256,
                   generation: bool = True, latents: torch.Tensor | None = None) -> dict:
    """Every defect metric (`defects.all_defects`) for the book's image sources, on the same scenes.

    Rows: "rendered" (the held-out scenes themselves: the reference), "VAE round trip" (posterior
    mode), "TAESD decode" (of the VAE's scaled latents), "constant latents" (each image's latent
    replaced by its spatial mean, decoded: what the decoder draws whatever the latents), and, with
    generation, "text-to-image" (25 DDIM steps, guidance 5, the standard evaluation's prompts and
    noise; pass `latents` from `generation_latents` to reuse them) and the same latents decoded by
    TAESD (a defect both decoders draw is in the latents, so the U-Net's). Round-trip rows are judged
    against their inputs, the others against n_reference rendered training scenes.
    vae / taesd / pipe: the components to measure (default: the shipped ones); a pipe's own VAE is
    replaced by `vae` for decoding, so a candidate decoder is measured on the same latents.
    Returns {"n": images per row, "n_per_count", "n_reference", "rows": {name: metrics}}.
    """
    from . import defects  # noqa: PLC0415

    vae = vae if vae is not None else load_vae()
    taesd = taesd if taesd is not None else load_taesd()
    scenes = defect_scenes(n_per_count)
    ref, ref_parsed = defect_reference(n_reference)
    x = shapes.render(scenes)
    sf = vae.config.scaling_factor
    z = torch.cat([vae.encode(x[i:i + 64]).latent_dist.mode() for i in range(0, len(x), 64)])
    rows = {}

    def row(name, images, inputs=None, with_scenes=True):
        rows[name] = defects.all_defects(images, scenes if with_scenes else None, inputs=inputs,
                                         train_reference=ref, train_parsed=ref_parsed)

    row("rendered", x)
    row("VAE round trip", decode_latents(vae, z * sf), x)
    row("TAESD decode", torch.cat([taesd.decode(z[i:i + 64] * sf).sample.clamp(-1, 1) for i in range(0, len(z), 64)]), x)
    row("constant latents", decode_latents(vae, z.mean((2, 3), keepdim=True).expand_as(z) * sf), with_scenes=False)
    if generation:
        if latents is None:
            from ldm_tutorial.models import load_pipeline  # noqa: PLC0415
            latents = generation_latents(pipe or load_pipeline("tiny", verbose=False), scenes,
                                         n_per_count=n_per_count)
        row("text-to-image", decode_latents(vae, latents))
        # the same latents through the preview decoder: a defect that stays is in the latents (U-Net)
        row("text-to-image, TAESD decode", torch.cat([taesd.decode(latents[i:i + 64]).sample.clamp(-1, 1)
                                                      for i in range(0, len(latents), 64)]))
    return {"n": len(scenes), "n_per_count": n_per_count, "n_reference": n_reference, "rows": rows}


def constant_latent_chroma(vae, n_per_count: int = 32) -> dict:
    """Decode each held-out scene's spatially constant mean latent: mean chroma at the top-left
    6x6 corner against the image's centre 6x6 (the decoder's own corner, whatever the latents)."""
    from . import defects  # noqa: PLC0415

    x = shapes.render(defect_scenes(n_per_count))
    z = vae.encode(x).latent_dist.mode()
    images = decode_latents(vae, z.mean((2, 3), keepdim=True).expand_as(z) * vae.config.scaling_factor)
    c = defects.chroma(images)
    h, w = c.shape[1:]
    return {"top_left": float(c[:, :6, :6].mean()), "centre": float(c[:, h // 2 - 3:h // 2 + 3, w // 2 - 3:w // 2 + 3].mean()),
            "n": len(x)}


def _adherence_from_latents(vae, latents: torch.Tensor, scenes: list, n_per_count: int) -> dict:
    return _adherence(decode_latents(vae, latents), scenes, n_per_count)


def _adherence(images: torch.Tensor, scenes: list, n_per_count: int) -> dict:
    """{"<k>_object": {"fully_correct", "n"}} for images of defect_scenes (n_per_count per count)."""
    ok = [fully_correct(parser.parse_scene(im), s.objects) for im, s in zip(images, scenes)]
    out = {}
    for j, k in enumerate(sorted({len(s.objects) for s in scenes})):
        part = ok[j * n_per_count:(j + 1) * n_per_count]
        out[f"{k}_object"] = {"fully_correct": float(np.mean(part)), "n": len(part)}
    return out


@torch.no_grad()
def defect_study(candidate_vae: str | None = None, diagnose: bool = True, adherence: tuple[str, ...] = (),
                 n_per_count: int = 32, n_adherence: int = 96, latents_file: str | None = None, log=print) -> dict:
    """The issue-21 study: defect metrics before (shipped decoder) and, given `candidate_vae` (a
    diffusers AutoencoderKL or FixedNormAutoencoderKL folder), after; the diagnosis across
    DEFECT_SETTINGS; and the standard prompt adherence (n_adherence per count) for the default and
    for each setting named in `adherence`. Generated latents are cached in `latents_file` (a torch
    file), so a later run with a candidate decoder only decodes: the same prompts and noise, by
    construction.
    """
    from ldm_tutorial.models import load_pipeline  # noqa: PLC0415
    from . import defects  # noqa: PLC0415
    from .fixed_norm import vae_class  # noqa: PLC0415

    cache = torch.load(latents_file) if latents_file and os.path.exists(latents_file) else {}

    def cached(key, scenes, setting, per_count):
        if key not in cache:
            t0 = time.perf_counter()
            cache[key] = generation_latents(pipe, scenes, setting, n_per_count=per_count)
            log(f"{key}: {time.perf_counter() - t0:.0f} s for {len(scenes)} images")
            if latents_file:
                torch.save(cache, latents_file)
        return cache[key]

    pipe = load_pipeline("tiny", verbose=False)
    vaes = {"shipped": pipe.vae}
    if candidate_vae:
        vaes["candidate"] = vae_class(candidate_vae).from_pretrained(candidate_vae, torch_dtype=torch.float32).eval()
        ship, cand = pipe.vae.state_dict(), vaes["candidate"].state_dict()
        enc = [k for k in ship if not k.startswith(("decoder.", "post_quant_conv."))]
    taesd = load_taesd()
    scenes = defect_scenes(n_per_count)
    ref, ref_parsed = defect_reference()
    res: dict = {"machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__},
                 "date": str(datetime.date.today()), "n_per_count": n_per_count, "n_reference": len(ref),
                 "candidate_vae": candidate_vae, "seed": DEFECT_SEED}
    if candidate_vae:   # a decoder fine-tune must leave the encoder (so every U-Net's latents) as it was
        res["candidate_encoder_max_abs_diff"] = max(float((ship[k].float() - cand[k].float()).abs().max()) for k in enc)
        res["candidate_scaling_factor"] = vaes["candidate"].config.scaling_factor
    default = cached(f"guidance 5 (default)/{n_per_count}", scenes, {}, n_per_count)
    res["sources"] = {name: defect_metrics(v, taesd, pipe, n_per_count, latents=default)
                      for name, v in vaes.items()}
    res["constant_latent_chroma"] = {name: constant_latent_chroma(v, n_per_count) for name, v in vaes.items()}
    log("sources done")
    if diagnose:
        res["diagnosis"] = {name: {} for name in vaes}
        for key, setting in DEFECT_SETTINGS.items():
            lat = cached(f"{key}/{n_per_count}", scenes, setting, n_per_count)
            for name, v in vaes.items():
                res["diagnosis"][name][key] = defects.all_defects(decode_latents(v, lat), scenes,
                                                                  train_reference=ref, train_parsed=ref_parsed)
            log(f"diagnosis row done: {key}")
    res["adherence"] = {name: {} for name in vaes}
    full = defect_scenes(n_adherence)
    for key in ("guidance 5 (default)", *adherence):
        lat = cached(f"{key}/{n_adherence}", full, DEFECT_SETTINGS[key], n_adherence)
        for name, v in vaes.items():
            res["adherence"][name][key] = _adherence_from_latents(v, lat, full, n_adherence)
            res["adherence"][name][key]["defects"] = defects.all_defects(
                decode_latents(v, lat), full, train_reference=ref, train_parsed=ref_parsed)
        log(f"adherence done: {key}")
    # small squares through each decoder's round trip, on more scenes than a row holds
    sq_scenes = shapes.sample_scenes(256, seed=EVAL_SEED + 2)
    sq_x = shapes.render(sq_scenes)
    res["round_trip_small_squares"] = {}
    for name, v in vaes.items():
        rec = decode_latents(v, torch.cat([v.encode(sq_x[i:i + 64]).latent_dist.mode() for i in range(0, 256, 64)])
                             * v.config.scaling_factor)
        res["round_trip_small_squares"][name] = defects.shape_confusion([parser.parse_scene(im) for im in rec],
                                                                        sq_scenes, "small", "square")
    if candidate_vae:
        res["vae_metrics"] = {name: vae_metrics(vae=v) for name, v in vaes.items()}
    return res


@torch.no_grad()
def margin_study(margin: int = 1, n_per_count: int = 96, latents: torch.Tensor | None = None,
                 log=print) -> dict:
    """The GroupNorm decoder (`load_vae(groupnorm=True)`, the one with the corner spike) with and
    without `defects.margin_decode`, on the same latents (generated by the shipped pipeline).

    Rows (all_defects): the VAE round trip of the first 32 held-out scenes per count (posterior
    mode), their constant latents, and text-to-image on the standard evaluation's n_per_count
    prompts per count and noise (25 DDIM steps, guidance 5), each decoded plainly and with a
    `margin`-cell margin at the top-left corner. Also the standard adherence of both decodes and
    the decode time of one batch of 16 (median of 5, this machine).
    """
    from ldm_tutorial.models import load_pipeline  # noqa: PLC0415

    from . import defects  # noqa: PLC0415

    if not isinstance(margin, int) or isinstance(margin, bool) or margin < 1:
        raise ValueError(f"margin must be an int >= 1 (latent cells), got {margin!r}")
    gen_scenes = defect_scenes(n_per_count)
    if latents is not None and (not isinstance(latents, torch.Tensor) or len(latents) != len(gen_scenes)):
        got = len(latents) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must hold one scaled latent per prompt ({len(gen_scenes)}: n_per_count "
                         f"{n_per_count} per object count), got {got}")
    pipe = load_pipeline("tiny", verbose=False)
    vae = load_vae(groupnorm=True)                 # the decoder whose spike the margin moves
    sf = vae.config.scaling_factor
    ref, ref_parsed = defect_reference()
    scenes32 = defect_scenes(32)
    x = shapes.render(scenes32)
    z = torch.cat([vae.encode(x[i:i + 64]).latent_dist.mode() for i in range(0, len(x), 64)])
    if latents is None:
        t0 = time.perf_counter()
        latents = generation_latents(pipe, gen_scenes, n_per_count=n_per_count)
        log(f"generation: {time.perf_counter() - t0:.0f} s for {len(gen_scenes)} images")

    def dec(lat, m):
        return torch.cat([defects.margin_decode(vae, lat[i:i + 64], m).clamp(-1, 1) for i in range(0, len(lat), 64)])

    rows, adherence, seconds = {}, {}, {}
    for m, tag in ((0, "plain decode"), (margin, f"margin {margin}")):
        rows[f"VAE round trip, {tag}"] = defects.all_defects(dec(z, m), scenes32, inputs=x, train_reference=ref,
                                                             train_parsed=ref_parsed)
        rows[f"constant latents, {tag}"] = defects.all_defects(dec(z.mean((2, 3), keepdim=True).expand_as(z), m),
                                                               train_reference=ref, train_parsed=ref_parsed)
        images = dec(latents / sf, m)
        rows[f"text-to-image, {tag}"] = defects.all_defects(images, gen_scenes, train_reference=ref,
                                                            train_parsed=ref_parsed)
        adherence[tag] = _adherence(images, gen_scenes, n_per_count)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            defects.margin_decode(vae, latents[:16] / sf, m)
            times.append(time.perf_counter() - t0)
        seconds[tag] = float(np.median(times))
    return {"margin": margin, "n_per_count": n_per_count, "rows": rows, "adherence": adherence,
            "decode_seconds_batch16": seconds, "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads()},
            "date": str(datetime.date.today())}


DEFECT_COLUMNS = (   # (key in an all_defects row, header, format)
    ("corner_top_left", "top-left chroma", "{:.3f}"), ("corner_ratio", "x ref.", "{:.2f}"),
    ("corner_smudged_share", "smudged", "{:.0%}"), ("corner_other_regions_ratio", "other corners x ref.", "{:.2f}"),
    ("fringe_px_per_object", "fringe px / object", "{:.2f}"), ("objects_fringed", "objects fringed", "{:.0%}"),
    ("bg_std_ratio", "bg std x train", "{:.2f}"), ("bg_flat", "bg flat", "{:.0%}"), ("bg_gradient", "gradient", "{:.0%}"),
    ("bg_noise", "noise", "{:.0%}"), ("bg_stripes", "stripes", "{:.0%}"), ("bg_other", "other", "{:.0%}"),
    ("more_than_asked", "more objects than asked", "{:.1%}"), ("duplicate", "duplicate colour", "{:.1%}"),
    ("small_square_wrong", "small squares misdrawn", "{:.0%}"), ("fully_correct", "fully correct", "{:.1%}"),
)


def defect_table(rows: dict, columns=DEFECT_COLUMNS) -> list[str]:
    """Markdown lines: one row per source or setting, one column per defect metric."""
    def cell(r, key, fmt):
        v = r.get(key)
        return "" if v is None or (isinstance(v, float) and np.isnan(v)) else fmt.format(v)
    lines = ["| row | n | " + " | ".join(h for _, h, _ in columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, r in rows.items():
        sq = f" ({r['small_square_n']})" if "small_square_n" in r else ""
        lines.append(f"| {name} | {r['n']} | " + " | ".join(
            cell(r, k, f) + (sq if k == "small_square_wrong" and cell(r, k, f) else "") for k, _, f in columns) + " |")
    return lines


def defects_markdown(res: dict) -> str:
    """The committed section of benchmarks/tinysd.md for a `defect_study` result."""
    n, npc = res["n_per_count"] * 2, res["n_per_count"]
    extra = [k for k in next(iter(res.get("adherence", {}).values()), {}) if k != "guidance 5 (default)"]
    cmd = ("python -m ldm_tutorial.tinysd.evaluate --defects" + (" --diagnose" if "diagnosis" in res else "")
           + f" --threads 1 --n-per-count {npc}" + (f' --adherence-settings "{";".join(extra)}"' if extra else "")
           + (f" --candidate-vae {res['candidate_vae']}" if res.get("candidate_vae") else ""))
    out = ["## Visual defects: metrics, diagnosis, before and after", "",
           f"`{cmd}` on {res['machine']['cpu']}, "
           f"1 thread, torch {res['machine']['torch']}, {res['date']}. Metrics: `ldm_tutorial/tinysd/defects.py` "
           f"(definitions in its docstrings); raw numbers: `ldm_tutorial/results/tinysd_defects.json`. Every row "
           f"holds the same n={n} held-out scenes or prompts ({npc} one-object and {npc} two-object: the first "
           f"of the standard evaluation's, seed {res['seed']} + count, and its noise). Training reference: "
           f"{res['n_reference']} rendered scenes of seed {DEFECT_REFERENCE_SEED}.", "",
           "Columns:", "",
           "- top-left chroma: mean max - min of RGB ([0, 1]) in the 6x6 top-left corner. x ref.: over the "
           "reference (the same image's input for round trips, the training scenes otherwise).",
           "- smudged: share above 2 x input + 0.05 (round trips) or above the training scenes' 99th percentile.",
           "- other corners: the other three corners and the top edge's middle, the same ratio.",
           "- fringe: pixels within 4 px outside an object with chroma > 0.2 and hue > 30 degrees from the "
           "object's, per object; objects fringed: the share with at least 8.",
           "- background: luminance std outside the objects over the training scenes'; then the share "
           "classified as each training background (flat, gradient, noise, stripes) or as none (other).",
           "- object counts and shapes: the parser against the prompt (small squares: misdrawn share, "
           "requested ones found in brackets).", ""]
    for name, src in res["sources"].items():
        out += [f"### Image sources, {name} decoder", "", *defect_table(src["rows"]), ""]
    if "constant_latent_chroma" in res:
        c = res["constant_latent_chroma"]
        out += ["Constant latents (each scene's mean latent everywhere), mean chroma of the 6x6 top-left corner "
                "against the 6x6 centre: " + "; ".join(f"{k} decoder {v['top_left']:.3f} vs {v['centre']:.3f} "
                                                        f"(n={v['n']})" for k, v in c.items()) + ".", ""]
    for name, rows in res.get("diagnosis", {}).items():
        out += [f"### Diagnosis: text-to-image settings, {name} decoder (25 DDIM steps and guidance 5 unless "
                "the row says otherwise)", "", *defect_table(rows), ""]
    if res.get("adherence"):
        out += ["### Standard prompt adherence (fully correct, n=96 per count, the standard evaluation's prompts "
                "and noise)", "", "| decoder | setting | 1 object | 2 objects |", "|---|---|---|---|"]
        for name, rows in res["adherence"].items():
            for key, r in rows.items():
                out.append(f"| {name} | {key} | {r['1_object']['fully_correct']:.1%} | {r['2_object']['fully_correct']:.1%} |")
        out += ["", "Defect metrics on those n=192 images:", "",
                *defect_table({f"{name}, {key}": r["defects"] for name, rows in res["adherence"].items()
                               for key, r in rows.items()}), ""]
    if res.get("round_trip_small_squares"):
        out += ["Small squares through the VAE round trip (256 held-out scenes, seed 10002): " + "; ".join(
            f"{k} decoder {1 - v['correct']:.0%} misdrawn of {v['n']} (" + ", ".join(
                f"{s} {x:.0%}" for s, x in v["as"].items()) + ")" for k, v in res["round_trip_small_squares"].items())
                + ".", ""]
    if res.get("vae_metrics"):
        out += ["### vae_metrics (held-out shapes, n=128)", "", "| decoder | PSNR mean / min | SSIM | parser on "
                "reconstructions | photos PSNR |", "|---|---|---|---|---|"]
        for name, v in res["vae_metrics"].items():
            s = v["shapes"]
            out.append(f"| {name} | {s['psnr_db']:.2f} / {s['psnr_db_min']:.2f} dB | {s['ssim']:.3f} | "
                       f"{s['parser_accuracy_on_reconstructions']:.1%} | {v['photos']['psnr_db']:.2f} dB |")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m ldm_tutorial.tinysd.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller samples (for tests)")
    p.add_argument("--generation", action="store_true",
                   help="also measure text-to-image prompt adherence and inpainting (slower: a few minutes)")
    p.add_argument("--steps-sweep", action="store_true",
                   help="also measure prompt adherence against sampling steps: epsilon U-Net (DDIM leading / "
                        "trailing) vs the rectified-flow U-Net (Euler), the SD-versions chapter's comparison")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--markdown", default=None, help="also write the committed table (benchmarks/tinysd.md)")
    p.add_argument("--defects", action="store_true",
                   help="only the visual-defect study (issue 21): defect metrics of rendered scenes, VAE round "
                        "trip, TAESD, constant latents and text-to-image; standard adherence (see defect_study)")
    p.add_argument("--diagnose", action="store_true", help="with --defects: every DEFECT_SETTINGS row too")
    p.add_argument("--candidate-vae", default=None, help="with --defects: a diffusers VAE folder to measure "
                                                         "beside the shipped one (the 'after' column)")
    p.add_argument("--adherence-settings", default="", help="with --defects: semicolon-separated DEFECT_SETTINGS "
                                                            "names whose standard adherence to measure too")
    p.add_argument("--n-per-count", type=int, default=32, help="with --defects: prompts per object count")
    p.add_argument("--latents", default=None, help="with --defects: cache of generated latents (torch file)")
    p.add_argument("--margin", type=int, default=None,
                   help="with --defects: only the margin-decode study (margin_study): the shipped decoder "
                        "with and without this many latent cells of margin at its top-left corner")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args(argv)
    if a.margin is not None and not a.defects:
        p.error("--margin is for the defect study: add --defects")
    torch.manual_seed(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.defects:
        names = tuple(n.strip() for n in a.adherence_settings.split(";") if n.strip())
        unknown = [n for n in names if n not in DEFECT_SETTINGS]
        if unknown:
            raise SystemExit(f"--adherence-settings: unknown {unknown}; choose from {list(DEFECT_SETTINGS)}")
        t0 = time.perf_counter()
        if a.margin is not None:
            res = margin_study(a.margin, a.n_per_count)
        else:
            res = defect_study(a.candidate_vae, a.diagnose, names, a.n_per_count, latents_file=a.latents)
        res["seconds"] = time.perf_counter() - t0
        text = json.dumps(res, indent=1, default=float)
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text + "\n")
        return res
    res: dict = {"machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                             "torch": torch.__version__}}
    t = time.perf_counter()
    vae = load_vae()
    clip, tok = load_clip()
    res["load_seconds"] = {"vae_and_clip": time.perf_counter() - t}
    res["parser_scenes"] = 100 if a.quick else 500
    res["parser_accuracy"] = parser_accuracy(res["parser_scenes"])
    res["clip_retrieval"] = clip_retrieval(60 if a.quick else 300, model=clip, tokenizer=tok)
    res["vae"] = vae_metrics(32 if a.quick else 128, vae=vae)
    res["taesd"] = taesd_metrics(16 if a.quick else 64, vae=vae)
    if a.generation:
        res["text2img"] = prompt_adherence(n_per_count=16 if a.quick else 96)
        res["inpaint"] = inpaint_metrics(n=16 if a.quick else 64)
        res["one_image_seconds"] = seconds_per_image()
    if a.steps_sweep:
        res["steps_sweep"] = steps_sweep(objective_comparison(), steps=(1, 2, 4, 8, 25),
                                         n_per_count=16 if a.quick else 96)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown_table(res))
    return res


def sweep_markdown(sw: dict) -> list[str]:
    """Lines of the steps-sweep table (a `steps_sweep` result), one row per sampler and prompt count."""
    names = [k for k in sw if isinstance(sw[k], dict) and "scheduler" in sw[k]]
    steps = [k for k in sw[names[0]] if k != "scheduler"]
    lines = ["", f"## Prompt adherence against sampling steps (guidance {sw['guidance_scale']}, fully correct; "
             + ", ".join(f"n={n} {c.replace('_', ' ')} prompts" for c, n in sw["n"].items()) + ")", "",
             "| sampler | " + " | ".join(f"{s} steps" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for c in sw["n"]:
        for name in names:
            lines.append(f"| {name}, {c.replace('_', ' ')} | " + " | ".join(f"{sw[name][s][c]:.1%}" for s in steps) + " |")
    return lines


def markdown_table(res: dict) -> str:
    """The committed record: measured figures plus how each shipped model was trained."""
    cpu = cpu_name()
    v, c = res["vae"], res["clip_retrieval"]
    rows = [
        (f"parser accuracy, {res.get('parser_scenes', 500)} held-out scenes (exact match)", f"{res['parser_accuracy']:.1%}"),
        ("tiny CLIP top-1 of 18 (one-object scenes; chance 5.6%)", f"{c['top1_of_18']:.1%}"),
        *[(f"tiny CLIP beats every rival differing in {a}", f"{x:.1%}") for a, x in c["per_attribute"].items()],
        ("VAE PSNR, held-out shapes (mean / min)", f"{v['shapes']['psnr_db']:.2f} / {v['shapes']['psnr_db_min']:.2f} dB"),
        ("VAE SSIM, held-out shapes", f"{v['shapes']['ssim']:.3f}"),
        ("parser accuracy on VAE reconstructions", f"{v['shapes']['parser_accuracy_on_reconstructions']:.1%}"),
        ("VAE PSNR, held-out photos (mean / min)", f"{v['photos']['psnr_db']:.2f} / {v['photos']['psnr_db_min']:.2f} dB"),
        ("VAE SSIM, held-out photos", f"{v['photos']['ssim']:.3f}"),
        ("latent std before scaling / scaling factor / after", f"{v['latents']['std']:.3f} / "
         f"{v['latents']['scaling_factor']:.4f} / {v['latents']['scaled_std']:.3f}"),
        ("VAE encode / decode, ms per 128x128 image (batch)", f"{v['shapes']['encode_ms_per_image']:.1f} / "
         f"{v['shapes']['decode_ms_per_image']:.1f}"),
        ("load VAE + CLIP, seconds", f"{res['load_seconds']['vae_and_clip']:.2f}"),
    ]
    if "taesd" in res:
        ta = res["taesd"]
        rows += [(f"TAESD preview vs the VAE's decode of the same latents, PSNR (n={ta['n']})",
                  f"{ta['psnr_preview_vs_vae_decode_db']:.2f} dB"),
                 ("vs the original image: VAE / TAESD", f"{ta['psnr_vs_original_db']['vae']:.2f} / "
                  f"{ta['psnr_vs_original_db']['taesd']:.2f} dB"),
                 ("parser accuracy on decodes: VAE / TAESD", f"{ta['parser_accuracy']['vae']:.1%} / "
                  f"{ta['parser_accuracy']['taesd']:.1%}"),
                 ("TAESD encoder vs VAE latents, relative error", f"{ta['encoder_relative_error']:.3f}"),
                 ("decode ms per image (batch): VAE / TAESD / speed-up", f"{ta['decode_ms_per_image']['vae']:.1f} / "
                  f"{ta['decode_ms_per_image']['taesd']:.1f} / {ta['decode_speedup']:.1f}x")]
    if "text2img" in res:
        t, ip = res["text2img"], res["inpaint"]
        rows += [(f"text-to-image fully correct, {k.replace('_', ' ')} prompts ({t['steps']} DDIM steps, guidance "
                  f"{t['guidance_scale']}, n={t[k]['n']})", f"{t[k]['fully_correct']:.1%}") for k in t if k.endswith("_object")]
        one = t.get("1_object", {})
        if one.get("n_small") and one.get("n_large"):
            rows += [(f"... one object, by size: small (n={one['n_small']}) / large (n={one['n_large']})",
                      f"{one['fully_correct_small']:.1%} / {one['fully_correct_large']:.1%}")]
        rows += [(f"inpainting: new object right inside the mask (n={ip['n']})", f"{ip['adherence_inside_mask']:.1%}"),
                 ("inpainting: PSNR outside the mask (the VAE's round trip of the same pixels: its ceiling)",
                  f"{ip['psnr_outside_mask_db']:.2f} dB ({ip['psnr_outside_mask_vae_round_trip_db']:.2f} dB)"),
                 ("one 128x128 image, 25 steps with guidance, batch 1 (best of 3)", f"{res['one_image_seconds']:.2f} s")]
    sweep = sweep_markdown(res["steps_sweep"]) if "steps_sweep" in res else []
    out = ["# TinySD: measured figures", "",
           f"`python -m ldm_tutorial.tinysd.evaluate --markdown benchmarks/tinysd.md` on {cpu}, "
           f"{os.cpu_count()} cores, torch {res['machine']['torch']}, {datetime.date.today()}.", "",
           "| figure | value |", "|---|---|", *[f"| {k} | {val} |" for k, val in rows], *sweep, "",
           "## How the shipped weights were trained", "",
           "From `ldm_tutorial/tinysd/weights/training_log.json` (written by `python -m ldm_tutorial.tinysd.train`):",
           "", "| stage | steps | batch | seconds | device | note |", "|---|---|---|---|---|---|"]
    log_path = WEIGHTS_DIR / "training_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    for stage, r in log.items():
        dev = r.get("gpu") or r.get("device")
        out.append(f"| {stage} | {r.get('steps')} | {r.get('batch', '')} | {r.get('seconds', 0):.0f} | {dev} | "
                   f"{r.get('note', '')} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
