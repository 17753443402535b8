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
    pipe("a red circle", num_inference_steps=2)            # warm-up
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
    a = p.parse_args(argv)
    torch.manual_seed(0)
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
