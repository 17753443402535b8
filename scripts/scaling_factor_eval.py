"""Measure the scaling-factor chapter's heavier figures beforehand (book/02_scaling_factor).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/scaling_factor_eval.py [--n-per-count 48] [--parts ...]

Writes ldm_tutorial/results/scaling_factor.json (read by the chapter, shipped in the package) and benchmarks/scaling_factor.md. Parts:
* factor:     TinySD's factor computed as LDM's scale_by_std does (1/std of one training batch), over
              a held-out set, and its spread across batch sizes and draws; raw mean (the shift), per channel
* mistakes:   the shipped TinySD on the same prompts and seeds, decoded right, without dividing by the
              factor (a) and with SDXL's factor (c); img2img right and with raw latents passed in (b)
* comparison: the two small U-Nets trained on scaled and on raw latents (tinysd-scaling/), sampled
              on the same prompts and seeds (`tinysd.scaling_comparison`), with their training logs
Every image is scored by the parser (evaluate.fully_correct: every requested object, nothing else)
and by pixel statistics. Held-out scenes only (seeds >= 10_000); one CPU thread.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm_tutorial import results

ROOT = Path(__file__).resolve().parents[1]
OUT_JSON = results.path("scaling_factor")          # shipped in the package: the chapter reads it
OUT_MD = ROOT / "benchmarks" / "scaling_factor.md"
SDXL_FACTOR = 0.13025          # SDXL's VAE config (ldm.CONFIGS["sdxl-vae"])
FACTOR_SEED = 10_040           # held-out scenes for the factor's statistics
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DRAWS = 32                     # random batches per batch size


@torch.no_grad()
def encode_all(vae, images_u8: torch.Tensor, seed: int, batch: int = 64) -> torch.Tensor:
    """Posterior samples (what scale_by_std and training see) of every image: (N, 4, 16, 16)."""
    from ldm_tutorial.tinysd import data

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in tqdm(range(0, len(images_u8), batch), desc="encode", mininterval=5):
        out.append(vae.encode(data.to_float(images_u8[i:i + batch])).latent_dist.sample(generator=g))
    return torch.cat(out)


def factor_part(vae, n_heldout: int, first_batch: int) -> dict:
    from ldm_tutorial.tinysd import data

    train_u8, _ = data.render_dataset(first_batch, seed=0)          # the training set's first scenes
    z_train = encode_all(vae, train_u8, seed=0)
    held_u8, _ = data.render_dataset(n_heldout, seed=FACTOR_SEED)
    z = encode_all(vae, held_u8, seed=1)                               # (N, 4, 16, 16)
    rng = np.random.default_rng(0)
    spread = {}
    for b in BATCH_SIZES:
        if b > len(z):
            continue
        vals = [float(1 / z[torch.from_numpy(rng.choice(len(z), b, replace=False))].std()) for _ in range(DRAWS)]
        spread[b] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals)),
                     "p5": float(np.percentile(vals, 5)), "p95": float(np.percentile(vals, 95)), "values": vals}
    per_channel = z.transpose(0, 1).flatten(1)                         # (4, N * 16 * 16)
    centred = z - z.mean()
    return {"first_training_batch": {"n": first_batch, "inverse_std": float(1 / z_train.std())},
            "heldout": {"n": n_heldout, "seed": FACTOR_SEED, "inverse_std": float(1 / z.std()),
                        "raw_mean": float(z.mean()), "raw_std": float(z.std()),
                        "channel_mean": per_channel.mean(1).tolist(), "channel_std": per_channel.std(1).tolist(),
                        "inverse_rms": float(1 / z.pow(2).mean().sqrt()),
                        "centred_inverse_std": float(1 / centred.std())},
            "shipped": float(vae.config.scaling_factor), "spread": spread, "draws": DRAWS}


def pixel_stats(images: torch.Tensor) -> dict:
    """Images in [-1, 1] after the decoder's clamp: mean, std, share of channel values at the clamp."""
    return {"mean": float(images.mean()), "std": float(images.std()),
            "clipped": float((images.abs() >= 0.999).float().mean())}


def scores(images: torch.Tensor, scenes: list) -> dict:
    from ldm_tutorial.tinysd import evaluate, parser

    parsed = [parser.parse_scene(im) for im in images]
    full = [evaluate.fully_correct(p, s.objects) for p, s in zip(parsed, scenes)]
    present = [np.mean(parser.objects_present(p, s.objects)) for p, s in zip(parsed, scenes)]
    # the softest reading: a parsed object of the requested colour at the requested place, any shape
    colour_place = [np.mean([(o.colour, o.position) in {(q.colour, q.position) for q in p} for o in s.objects])
                    for p, s in zip(parsed, scenes)]
    return {"fully_correct": full, "objects_present": present, "colour_at_place": colour_place}


def summarise(per_count: dict, images_by_count: dict) -> dict:
    out = {}
    for k, sc in per_count.items():
        out[f"{k}_object"] = {"fully_correct": float(np.mean(sc["fully_correct"])),
                              "objects_present": float(np.mean(sc["objects_present"])),
                              "colour_at_place": float(np.mean(sc["colour_at_place"])),
                              "n": len(sc["fully_correct"]), **pixel_stats(images_by_count[k])}
    return out


@torch.no_grad()
def text2img_latents(pipe, scenes: list, steps: int, guidance: float, seed: int, batch: int) -> torch.Tensor:
    from ldm_tutorial.sampling import sample
    from ldm_tutorial.tinysd import shapes

    lat = []
    for i in tqdm(range(0, len(scenes), batch), desc="sample", mininterval=5):
        chunk = scenes[i:i + batch]
        lat.append(sample(pipe, [shapes.describe(s) for s in chunk], num_inference_steps=steps,
                          guidance_scale=guidance, generator=torch.Generator().manual_seed(seed + i)).latents)
    return torch.cat(lat)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, divide_by: float | None, batch: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(latents), batch):
        z = latents[i:i + batch]
        out.append(vae.decode(z if divide_by is None else z / divide_by).sample.clamp(-1, 1))
    return torch.cat(out)


def mistakes_part(n_per_count: int, counts: tuple, steps: int, guidance: float, strength: float,
                  batch: int) -> dict:
    from diffusers import StableDiffusionImg2ImgPipeline

    from ldm_tutorial.models import load_pipeline
    from ldm_tutorial.tinysd import evaluate, shapes

    pipe = load_pipeline("tiny", verbose=False)
    sf = pipe.vae.config.scaling_factor
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    seed = evaluate.EVAL_SEED + 3                  # evaluate.prompt_adherence's prompts and seeds
    ways = {"right": sf, "a_no_division": None, "c_sdxl_factor": SDXL_FACTOR}
    res = {w: {} for w in (*ways, "b_img2img_right", "b_img2img_raw_latents", "real_renders")}
    imgs = {w: {} for w in res}
    for k in counts:
        scenes = shapes.sample_scenes(n_per_count, seed=seed + k, n_objects=k)
        real = shapes.render(scenes)
        imgs["real_renders"][k], res["real_renders"][k] = real, scores(real, scenes)
        lat = text2img_latents(pipe, scenes, steps, guidance, seed, batch)
        for w, div in ways.items():
            x = decode(pipe.vae, lat, div)
            imgs[w][k], res[w][k] = x, scores(x, scenes)
        for w in ("b_img2img_right", "b_img2img_raw_latents"):
            out = []
            for i in tqdm(range(0, len(scenes), batch), desc=w, mininterval=5):
                x = real[i:i + batch]
                if w == "b_img2img_right":
                    image = (x + 1) / 2                                  # the pipeline encodes and multiplies
                else:                                                    # 4 channels: taken as already scaled
                    image = pipe.vae.encode(x).latent_dist.mode()
                out.append(img2img([shapes.describe(s) for s in scenes[i:i + batch]], image=image,
                                   strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                                   generator=torch.Generator().manual_seed(seed + i),
                                   output_type="pt").images * 2 - 1)
            x = torch.cat(out)
            imgs[w][k], res[w][k] = x, scores(x, scenes)
    return {"steps": steps, "guidance_scale": guidance, "strength": strength, "seed": seed,
            "scaling_factor": sf, "sdxl_factor": SDXL_FACTOR,
            **{w: summarise(res[w], imgs[w]) for w in res}}


def comparison_part(n_per_count: int, counts: tuple, steps: int, guidance: float, batch: int) -> dict:
    from ldm_tutorial import tinysd
    from ldm_tutorial.models import load_pipeline
    from ldm_tutorial.tinysd import evaluate, shapes

    pipe = load_pipeline("tiny", verbose=False)
    pipes = tinysd.scaling_comparison(pipe)
    seed = evaluate.EVAL_SEED + 3
    out = {"steps": steps, "guidance_scale": guidance, "seed": seed}
    for name, p in pipes.items():
        res, imgs, lat_std = {}, {}, {}
        for k in counts:
            scenes = shapes.sample_scenes(n_per_count, seed=seed + k, n_objects=k)
            lat = text2img_latents(p, scenes, steps, guidance, seed, batch)
            x = decode(p.vae, lat, p.vae.config.scaling_factor)
            imgs[k], res[k] = x, scores(x, scenes)
            lat_std[k] = float(lat.std())
        out[name] = {**summarise(res, imgs), "latent_std": lat_std, "training": training_record(name)}
    return out


def training_record(name: str) -> dict:
    """A comparison run's log.json (without its loss curve) with the training log's batch and lr."""
    from ldm_tutorial import tinysd

    log = json.loads((tinysd.WEIGHTS_DIR / "tinysd-scaling" / name / "log.json").read_text())
    stage = json.loads((tinysd.WEIGHTS_DIR / "training_log.json").read_text())[f"unet-scaling-{name}"]
    return {**{k: v for k, v in log.items() if k != "losses"}, "batch": stage["batch"], "lr": stage["lr"]}


def markdown(res: dict) -> str:
    lines = ["# The scaling factor: measured figures", "",
             f"Written by `scripts/scaling_factor_eval.py` on {res['machine']} ({res['date']}); read by "
             "book/02_scaling_factor. Held-out scenes only; the parser scores each image "
             "(fully correct: every requested object at its place, nothing else).", ""]
    if "factor" in res:
        f = res["factor"]
        h = f["heldout"]
        lines += ["## Where TinySD's factor comes from", "",
                  "| estimate | 1/std |", "|---|---|",
                  f"| shipped config (`scaling_factor`, 1/std of 4,096 training scenes' posterior samples) | {f['shipped']:.4f} |",
                  f"| first training batch ({f['first_training_batch']['n']} scenes, LDM's `scale_by_std`) | "
                  f"{f['first_training_batch']['inverse_std']:.4f} |",
                  f"| held-out set ({h['n']} scenes) | {h['inverse_std']:.4f} |", "",
                  f"Held-out raw latents: mean {h['raw_mean']:.3f}, std {h['raw_std']:.3f}; per channel mean "
                  + ", ".join(f"{m:+.2f}" for m in h["channel_mean"]) + "; std "
                  + ", ".join(f"{s:.2f}" for s in h["channel_std"]) + ".", "",
                  f"Spread of 1/std over {f['draws']} random batches per size:", "",
                  "| batch | mean | 5th pct | 95th pct | min | max |", "|---|---|---|---|---|---|"]
        lines += [f"| {b} | {s['mean']:.4f} | {s['p5']:.4f} | {s['p95']:.4f} | {s['min']:.4f} | {s['max']:.4f} |"
                  for b, s in f["spread"].items()]
        lines.append("")
    def rows(section: dict, names: dict) -> list[str]:
        counts = [k for k in next(iter(section[n] for n in names)).keys() if k.endswith("_object")]
        soft = all("colour_at_place" in section[n][c] for n in names for c in counts)
        what = "fully correct / objects present" + (" / colour at its place" if soft else "")
        head = "| set-up | " + " | ".join(f"{c.replace('_', ' ')}: {what}" for c in counts) \
               + " | pixel mean / std / clipped (1 object) |"
        out = [head, "|---" * (len(counts) + 2) + "|"]
        for n, title in names.items():
            r = section[n]
            cells = [f"{r[c]['fully_correct']:.1%} / {r[c]['objects_present']:.1%}"
                     + (f" / {r[c]['colour_at_place']:.1%}" if soft else "") + f" (n={r[c]['n']})" for c in counts]
            p = r[counts[0]]
            out.append(f"| {title} | " + " | ".join(cells) + f" | {p['mean']:+.3f} / {p['std']:.3f} / {p['clipped']:.1%} |")
        return out
    if "mistakes" in res:
        m = res["mistakes"]
        lines += ["## Forgetting the factor, with the shipped TinySD", "",
                  f"{m['steps']} DDIM steps, guidance {m['guidance_scale']}, img2img strength {m['strength']}, "
                  f"the prompts and seeds of `evaluate.prompt_adherence` (seed {m['seed']}).", ""]
        lines += rows(m, {"real_renders": "the scenes themselves (rendered)", "right": "text2img, decoded right",
                          "a_no_division": "(a) decoded without dividing by the factor",
                          "c_sdxl_factor": f"(c) decoded with SDXL's factor {m['sdxl_factor']}",
                          "b_img2img_right": "img2img, the pipeline encodes and scales",
                          "b_img2img_raw_latents": "(b) img2img from raw latents (not multiplied)"})
        lines.append("")
    if "comparison" in res:
        c = res["comparison"]
        lines += ["## Small U-Nets trained on scaled and on raw latents", "",
                  f"{c['steps']} DDIM steps, guidance {c['guidance_scale']}, same prompts and seeds.", ""]
        lines += rows(c, {"scaled": "trained on scaled latents (SD's recipe)",
                          "unscaled": "trained on raw latents (std 2.7)"})
        lines += ["", "| run | steps | seconds | final loss (mean of last 50 logged) | sampled latent std (1 / 2 objects) |",
                  "|---|---|---|---|---|"]
        for n in ("scaled", "unscaled"):
            t = c[n]["training"]
            lines.append(f"| {n} | {t['steps']} | {t['seconds']:.0f} | {t['final_loss']:.4f} | "
                         + " / ".join(f"{v:.2f}" for v in c[n]["latent_std"].values()) + " |")
        t = {**training_record("scaled"), **c["scaled"]["training"]}
        lines += ["", "Both trained with `python -m ldm_tutorial.tinysd.train unet --unet-preset small "
                  f"--latent-scale {{config,none}} --steps {t['steps']} --batch {t['batch']} --lr {t['lr']:g} "
                  f"--warmup {t['warmup']} --n-scenes {t['n_scenes']}`, one after the other, on one CPU thread "
                  "of a 2-core machine shared with other jobs: the same steps, batches, noise and initial "
                  "weights (a step budget rather than a time budget, because the machine's load changed the "
                  "seconds per step by a factor of two or more during the day). Their logs, the loss every "
                  "10 steps included, are in `ldm_tutorial/tinysd/weights/tinysd-scaling/*/log.json`.", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from ldm_tutorial.runtime import cpu_name
    from ldm_tutorial.tinysd import load_vae

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["factor", "mistakes", "comparison"],
                   choices=["factor", "mistakes", "comparison"])
    p.add_argument("--n-per-count", type=int, default=48)
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2])
    p.add_argument("--n-heldout", type=int, default=1024)
    p.add_argument("--first-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--strength", type=float, default=0.6)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT_JSON)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    new = {}
    t0 = time.time()
    if "factor" in a.parts:
        new["factor"] = factor_part(load_vae(), a.n_heldout, a.first_batch)
    if "mistakes" in a.parts:
        new["mistakes"] = mistakes_part(a.n_per_count, tuple(a.counts), a.steps, a.guidance_scale, a.strength,
                                        a.batch)
    if "comparison" in a.parts:
        new["comparison"] = comparison_part(a.n_per_count, tuple(a.counts), a.steps, a.guidance_scale, a.batch)
    # read at the end: parts not re-run (or written meanwhile by another run of this script) are kept
    res = json.loads(a.out.read_text()) if a.out.exists() else {}
    res.update(new, machine=cpu_name() + f", {a.threads} thread", date=datetime.date.today().isoformat())
    res.setdefault("seconds", {}).update({"+".join(a.parts): time.time() - t0})
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    if a.out == OUT_JSON:
        OUT_MD.write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
