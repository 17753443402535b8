"""Measure the cross-attention chapter's heavier figures beforehand (book/03_cross_attention).

    OMP_NUM_THREADS=1 nice .venv/bin/python scripts/cross_attention_eval.py [--parts daam comparison excite]

Writes ldm_tutorial/results/cross_attention.json (read by the chapter) and benchmarks/cross_attention.md.
Parts (held-out scenes only, seeds >= 10_000; one CPU thread; DDIM, guidance 5.0):
* daam:       the shipped TinySD's cross-attention maps (ldm.attention, DAAM's aggregation) against the
              parser's masks of the generated objects: mIoU per word kind at a threshold chosen on a
              separate set of scenes, the share of each word's mass inside its object, a table by layer
              and by timestep, and where the attention mass goes (start token, words, end/padding)
* comparison: the small U-Nets of the conditioning comparison (tinysd.load_conditioning_unet: cross,
              pooled and, if shipped, pooled-token), same prompts and noise: adherence by attribute
              and attribute binding (a requested colour on the other requested shape), parser-counted
* excite:     Attend-and-Excite (diffusers' StableDiffusionAttendAndExcitePipeline over TinySD's
              components) against the plain pipeline on the same two-object prompts and seeds, with
              seconds per image
"""

from __future__ import annotations

import argparse
import inspect
import datetime
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm_tutorial import results

ROOT = Path(__file__).resolve().parents[1]
OUT_JSON = results.path("cross_attention")
OUT_MD = ROOT / "benchmarks" / "cross_attention.md"
STEPS, GUIDANCE = 20, 5.0
DAAM_SEED, THRESH_SEED, COMP_SEED, EXCITE_SEED = 10_050, 10_060, 10_003, 10_070
TAUS = [round(x, 2) for x in np.arange(0.1, 0.95, 0.05)]
WORD_KINDS = ("colour", "shape", "size", "position")


def word_positions(tokenizer, scene) -> list[dict]:
    """For each object of the canonical prompt: token positions of its size, colour, shape, position words."""
    from ldm_tutorial.tinysd import shapes

    prompt = shapes.describe(scene)
    ids = tokenizer(prompt).input_ids
    out, start = [], 1
    for o in scene.objects:
        phrase = tokenizer(o.phrase(), add_special_tokens=False).input_ids
        while ids[start:start + len(phrase)] != phrase:
            start += 1
            if start > len(ids):
                raise ValueError(f"object phrase {o.phrase()!r} not found in {prompt!r}")
        pos_words = tokenizer(shapes.POSITION_PHRASES[o.position][0], add_special_tokens=False).input_ids
        out.append({"size": [start + 1], "colour": [start + 2], "shape": [start + 3],
                    "position": list(range(start + 4, start + 4 + len(pos_words)))})
        for kind, want in (("colour", o.colour), ("shape", o.shape)):
            got = tokenizer.convert_ids_to_tokens(ids[out[-1][kind][0]])
            assert got.removesuffix("</w>") == want, (got, want, prompt)
        start += len(phrase)
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@torch.no_grad()
def generate_with_maps(pipe, scenes, seed, batch, full_only=False):
    """Images and, per scene, the DAAM maps of chosen token positions: all layers/steps, per layer, per step bin."""
    from ldm_tutorial import attention
    from ldm_tutorial.sampling import sample
    from ldm_tutorial.tinysd import shapes

    out = []
    for i in tqdm(range(0, len(scenes), batch), desc="daam", mininterval=10):
        chunk = scenes[i:i + batch]
        with attention.capture_cross_attention(pipe.unet, batch_slice=slice(len(chunk), None)) as store:
            imgs = sample(pipe, [shapes.describe(s) for s in chunk], num_inference_steps=STEPS,
                          guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(seed + i)).images
        n_steps = store.steps
        bins = {"early": list(range(0, n_steps // 3)), "middle": list(range(n_steps // 3, 2 * n_steps // 3)),
                "late": list(range(2 * n_steps // 3, n_steps))}
        # where the mass goes: start token, words, end token + padding (all layers, heads, queries, steps)
        mass = []
        for j, s in enumerate(chunk):
            n_ids = len(pipe.tokenizer(shapes.describe(s)).input_ids)        # start + words + end
            tot = sum(p[j].sum((0, 1)) for calls in store.probs.values() for p in calls)   # (77,)
            tot = tot / tot.sum()
            mass.append({"start": float(tot[0]), "words": float(tot[1:n_ids - 1].sum()),
                         "end_and_padding": float(tot[n_ids - 1:].sum())})
        keep = max(len(pipe.tokenizer(shapes.describe(s)).input_ids) for s in chunk)   # the prompt's tokens
        small = lambda m: m[:, :keep].half()                                          # (B, keep, 128, 128)
        full = small(attention.token_maps(store))
        per_layer = {} if full_only else {n: small(attention.token_maps(store, layers=[n])) for n in store.layers}
        per_bin = {} if full_only else {b: small(attention.token_maps(store, steps=st)) for b, st in bins.items()}
        for j, s in enumerate(chunk):
            out.append({"scene": s, "image": imgs[j], "full": full[j], "mass": mass[j],
                        "layer": {n: m[j] for n, m in per_layer.items()}, "bin": {b: m[j] for b, m in per_bin.items()}})
        del store
    return out


def object_records(items, tokenizer):
    """Per generated object the parser found (same colour and shape as asked): its mask and word maps."""
    from ldm_tutorial.tinysd import parser

    recs = []
    for it in items:
        parsed = parser.parse_scene(it["image"])
        pos = word_positions(tokenizer, it["scene"])
        for o, p in zip(it["scene"].objects, pos):
            match = [q for q in parsed if (q.colour, q.shape) == (o.colour, o.shape)]
            if not match:
                continue
            recs.append({"mask": match[0].mask, "positions": p, "item": it, "n_objects": len(it["scene"].objects)})
    return recs


def word_map(m: torch.Tensor, positions: list[int]) -> np.ndarray:
    return m[positions].float().sum(0).numpy()


def score_records(recs, tau, source="full", key=None):
    """mIoU (map / max > tau against the mask) and mass share inside the mask, per word kind."""
    out = {}
    for kind in WORD_KINDS:
        ious, shares = [], []
        for r in recs:
            m = r["item"][source] if key is None else r["item"][source][key]
            wm = word_map(m, r["positions"][kind])
            ious.append(iou(wm / max(wm.max(), 1e-12) > tau, r["mask"]))
            shares.append(float(wm[r["mask"]].sum() / max(wm.sum(), 1e-12)))
        out[kind] = {"miou": float(np.mean(ious)), "mass_inside": float(np.mean(shares)), "n": len(recs)}
    return out


def daam_part(n_measure: int, n_thresh: int, batch: int) -> dict:
    from ldm_tutorial.models import load_pipeline
    from ldm_tutorial.tinysd import shapes

    pipe = load_pipeline("tiny", verbose=False)
    t0 = time.time()
    half = lambda n, seed: [s for k in (1, 2) for s in shapes.sample_scenes(n // 2, seed=seed + k, n_objects=k)]
    thresh_items = generate_with_maps(pipe, half(n_thresh, THRESH_SEED), THRESH_SEED, batch, full_only=True)
    thresh_recs = object_records(thresh_items, pipe.tokenizer)
    # one threshold for all words: the best mean of the colour- and shape-word mIoU on the other scenes
    sweep = {tau: score_records(thresh_recs, tau) for tau in TAUS}
    tau = max(TAUS, key=lambda t: sweep[t]["shape"]["miou"] + sweep[t]["colour"]["miou"])
    del thresh_items
    items = generate_with_maps(pipe, half(n_measure, DAAM_SEED), DAAM_SEED, batch)
    recs = object_records(items, pipe.tokenizer)
    main = score_records(recs, tau)
    # the area share of the object in the image: what a map spread evenly would put inside it
    area = float(np.mean([r["mask"].mean() for r in recs]))
    layers = list(items[0]["layer"])
    by_layer = {n: score_records(recs, tau, "layer", n) for n in layers}
    by_bin = {b: score_records(recs, tau, "bin", b) for b in ("early", "middle", "late")}
    # colour words against shape words: the distance between the two maps' centres of mass
    def centre(m):
        m = m / m.sum()
        ys, xs = np.mgrid[0:m.shape[0], 0:m.shape[1]]
        return np.array([(m * xs).sum(), (m * ys).sum()])
    gaps = [float(np.linalg.norm(centre(word_map(r["item"]["full"], r["positions"]["colour"]))
                                 - centre(word_map(r["item"]["full"], r["positions"]["shape"])))) for r in recs]
    mass = {k: float(np.mean([it["mass"][k] for it in items])) for k in ("start", "words", "end_and_padding")}
    return {"n_scenes": len(items), "n_objects_found": len(recs),
            "n_objects_asked": sum(len(it["scene"].objects) for it in items),
            "n_threshold_scenes": n_thresh, "n_threshold_objects": len(thresh_recs),
            "threshold": tau, "threshold_sweep": {str(t): {k: v["miou"] for k, v in s.items()} for t, s in sweep.items()},
            "words": main, "object_area_share": area, "by_layer": by_layer, "by_step_bin": by_bin,
            "colour_shape_centre_gap_px": {"mean": float(np.mean(gaps)), "median": float(np.median(gaps))},
            "attention_mass": mass, "daam_published_miou": 61.0,
            "daam_published_source": ("DAAM (Tang et al., arXiv:2210.04885v2 abstract): mIoU 61.0 on COCO "
                                      "caption-generated images with SD, nouns; the ACL 2023 version: 58.8-64.8 "
                                      "on two generated sets; its threshold 0.4"),
            "steps": STEPS, "guidance_scale": GUIDANCE, "seeds": {"measure": DAAM_SEED, "threshold": THRESH_SEED},
            "seconds": time.time() - t0}


# ----------------------------------------------------------------------------- conditioning comparison
def binding_scores(parsed_list, scenes) -> dict:
    """Attribute-level adherence and binding, counted from parsed scenes."""
    from ldm_tutorial.tinysd import evaluate

    rows = {k: [] for k in ("fully_correct", "colour_shape_position", "colour_shape", "colour_present",
                            "shape_present", "colour_at_place", "shape_at_place", "object_count_right")}
    swaps, eligible, both_bound = 0, 0, 0
    for parsed, s in zip(parsed_list, scenes):
        have = [(p.colour, p.shape, p.position) for p in parsed]
        rows["fully_correct"].append(evaluate.fully_correct(parsed, s.objects))
        rows["object_count_right"].append(len(parsed) == len(s.objects))
        for o in s.objects:
            rows["colour_shape_position"].append((o.colour, o.shape, o.position) in have)
            rows["colour_shape"].append(any((c, sh) == (o.colour, o.shape) for c, sh, _ in have))
            rows["colour_present"].append(any(c == o.colour for c, _, _ in have))
            rows["shape_present"].append(any(sh == o.shape for _, sh, _ in have))
            rows["colour_at_place"].append(any((c, p) == (o.colour, o.position) for c, _, p in have))
            rows["shape_at_place"].append(any((sh, p) == (o.shape, o.position) for _, sh, p in have))
        if len(s.objects) == 2:
            a, b = s.objects
            if a.colour != b.colour and a.shape != b.shape:
                eligible += 1
                pairs = {(c, sh) for c, sh, _ in have}
                swaps += bool({(a.colour, b.shape), (b.colour, a.shape)} & pairs)
                both_bound += {(a.colour, a.shape), (b.colour, b.shape)} <= pairs
    out = {k: float(np.mean(v)) for k, v in rows.items()}
    out["n_images"] = len(scenes)
    if eligible:
        out["binding"] = {"eligible_images": eligible, "swapped_images": swaps, "both_bound_images": both_bound,
                          "swapped_share": swaps / eligible, "both_bound_share": both_bound / eligible}
    return out


@torch.no_grad()
def sample_arm(unet, arm, pipe, prompts, seed, batch) -> torch.Tensor:
    """DDIM with classifier-free guidance for one conditioning arm (the text enters as the arm was trained)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    te, tok = pipe.text_encoder, pipe.tokenizer
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        ids = tok([""] * len(chunk) + chunk, padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids
        enc = te(ids)
        kw = {"encoder_hidden_states": enc.last_hidden_state}
        if arm == "pooled":
            kw["class_labels"] = enc.pooler_output
        elif arm == "pooled-token":
            kw["encoder_hidden_states"] = enc.pooler_output[:, None, :]
        g = torch.Generator().manual_seed(seed + i)
        z = torch.randn(len(chunk), 4, 16, 16, generator=g) * sched.init_noise_sigma
        sched.set_timesteps(STEPS)
        for t in sched.timesteps:
            e_u, e_c = unet(torch.cat([z, z]), t, **kw).sample.chunk(2)
            z = sched.step(e_u + GUIDANCE * (e_c - e_u), t, z).prev_sample
        images.append(pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample.clamp(-1, 1))
    return torch.cat(images)


def comparison_part(n_per_count: int, batch: int) -> dict:
    from ldm_tutorial import tinysd
    from ldm_tutorial.models import load_pipeline
    from ldm_tutorial.tinysd import parser, shapes

    pipe = load_pipeline("tiny", verbose=False)
    out = {"steps": STEPS, "guidance_scale": GUIDANCE, "seed": COMP_SEED, "n_per_count": n_per_count}
    scenes = {k: shapes.sample_scenes(n_per_count, seed=COMP_SEED + k, n_objects=k) for k in (1, 2)}
    for arm in tinysd.CONDITIONING_ARMS:
        try:
            unet, log = tinysd.load_conditioning_unet(arm)
        except FileNotFoundError:
            continue
        t0 = time.time()
        res = {}
        for k, sc in scenes.items():
            imgs = sample_arm(unet, arm, pipe, [shapes.describe(s) for s in sc], COMP_SEED + 100 * k, batch)
            res[f"{k}_object"] = binding_scores([parser.parse_scene(im) for im in tqdm(imgs, desc=f"parse {arm}",
                                                                                      mininterval=10)], sc)
        res["parameters"] = sum(p.numel() for p in unet.parameters())
        res["training"] = {k: v for k, v in log.items() if k != "losses"}
        res["training"]["last_100_steps_mean_loss"] = float(np.mean(log["losses"][-10:]))
        res["seconds"] = time.time() - t0
        out[arm] = res
    return out


# ----------------------------------------------------------------------------- Attend-and-Excite
def excite_part(n: int, save=None, every: int = 16) -> dict:
    import warnings

    from diffusers import StableDiffusionAttendAndExcitePipeline

    from ldm_tutorial.models import load_pipeline
    from ldm_tutorial.tinysd import evaluate, parser, shapes

    pipe = load_pipeline("tiny", verbose=False)
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        takes = inspect.signature(StableDiffusionAttendAndExcitePipeline.__init__).parameters
        ae = StableDiffusionAttendAndExcitePipeline(**{k: v for k, v in pipe.components.items() if k in takes},
                                                    requires_safety_checker=False)
    ae.set_progress_bar_config(disable=True)
    scenes = shapes.sample_scenes(n, seed=EXCITE_SEED, n_objects=2)
    rows = {"plain": [], "attend_and_excite": []}
    parsed = {"plain": [], "attend_and_excite": []}
    secs = {"plain": 0.0, "attend_and_excite": 0.0}
    def summary(m: int) -> dict:
        return {"n": m, "n_planned": n, "seed": EXCITE_SEED, "steps": STEPS, "guidance_scale": GUIDANCE,
            "attn_res_default": [16, 16], "tinysd_latent": [16, 16],
            "token_indices": "the two shape words (nouns), from word_positions",
            **{name: {"fully_correct": float(np.mean(rows[name][:m])), "seconds_per_image": secs[name] / m,
                      **binding_scores(parsed[name][:m], scenes[:m])} for name in rows}}

    for i, s in enumerate(tqdm(scenes, desc="attend-and-excite", mininterval=10)):
        prompt = shapes.describe(s)
        pos = word_positions(pipe.tokenizer, s)
        shape_idx = [p["shape"][0] for p in pos]                              # the two nouns, as in the paper
        for name in rows:
            g = torch.Generator().manual_seed(EXCITE_SEED + i)
            t0 = time.perf_counter()
            if name == "plain":
                img = pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=g,
                           output_type="pt").images[0]
            else:
                img = ae(prompt, token_indices=shape_idx, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                         generator=g, output_type="pt").images[0]
            secs[name] += time.perf_counter() - t0
            p = parser.parse_scene(img * 2 - 1)
            parsed[name].append(p)
            rows[name].append(evaluate.fully_correct(p, s.objects))
        if save is not None and (i + 1) % every == 0 and i + 1 < n:     # a partial result survives a stop
            save(summary(i + 1))
    return summary(n)


def markdown(res: dict, machine: str, date: str) -> str:
    L = ["# Cross-attention: measured figures", "",
         f"Written by `scripts/cross_attention_eval.py` on {date}, {machine}, one CPU thread (shared "
         "with other jobs: seconds are wall time on a loaded machine). Read by book/03_cross_attention "
         "from `ldm_tutorial/results/cross_attention.json`.", ""]
    if "daam" in res:
        d = res["daam"]
        L += ["## DAAM maps of the shipped TinySD", "",
              f"{d['n_scenes']} generated scenes (half one-object, half two-object; seed {d['seeds']['measure']}), "
              f"{d['n_objects_found']} of {d['n_objects_asked']} asked objects found by the parser (same colour "
              f"and shape); threshold {d['threshold']} chosen on {d['n_threshold_scenes']} other scenes "
              f"(seed {d['seeds']['threshold']}). {d['steps']} DDIM steps, guidance {d['guidance_scale']}. "
              f"{d['seconds']:.0f} s.", "",
              "| word | mIoU | mass inside the object |", "|---|---|---|"]
        for k, v in d["words"].items():
            L.append(f"| {k} | {v['miou']:.3f} | {v['mass_inside']:.3f} |")
        L += ["", f"Object area share of the image: {d['object_area_share']:.3f}. DAAM's published mIoU: 61.0 "
              "(COCO caption-generated images, SD, nouns; arXiv:2210.04885v2; 58.8-64.8 in the ACL 2023 version).", "", "| layer | shape mIoU | shape mass inside | colour mIoU |",
              "|---|---|---|---|"]
        for n, v in d["by_layer"].items():
            L.append(f"| {n} | {v['shape']['miou']:.3f} | {v['shape']['mass_inside']:.3f} | {v['colour']['miou']:.3f} |")
        for n, v in d["by_step_bin"].items():
            L.append(f"| steps: {n} third | {v['shape']['miou']:.3f} | {v['shape']['mass_inside']:.3f} | "
                     f"{v['colour']['miou']:.3f} |")
        m = d["attention_mass"]
        L += ["", f"Attention mass: start token {m['start']:.3f}, words {m['words']:.3f}, end + padding "
              f"{m['end_and_padding']:.3f}.", ""]
    if "comparison" in res:
        c = res["comparison"]
        arms = [a for a in ("cross", "pooled", "pooled-token") if a in c]
        L += ["## Cross-attention against pooled conditioning", "",
              f"Same {c['n_per_count']} prompts per object count (seed {c['seed']}), same noise, "
              f"{c['steps']} DDIM steps, guidance {c['guidance_scale']}.", "",
              "| measure | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms),
              "| parameters | " + " | ".join(f"{c[a]['parameters']:,}" for a in arms) + " |"]
        for k in ("1_object", "2_object"):
            for m in ("fully_correct", "colour_shape_position", "colour_shape", "colour_present", "shape_present",
                      "colour_at_place", "shape_at_place"):
                L.append(f"| {k} {m} | " + " | ".join(f"{c[a][k][m]:.3f}" for a in arms) + " |")
        L.append("| 2_object binding swapped (images) | " + " | ".join(
            f"{c[a]['2_object']['binding']['swapped_images']}/{c[a]['2_object']['binding']['eligible_images']}"
            for a in arms) + " |")
        L.append("| 2_object both bound (images) | " + " | ".join(
            f"{c[a]['2_object']['binding']['both_bound_images']}/{c[a]['2_object']['binding']['eligible_images']}"
            for a in arms) + " |")
        L.append("| final training loss (last 100 steps) | " + " | ".join(
            f"{c[a]['training']['last_100_steps_mean_loss']:.4f}" for a in arms) + " |")
        L.append("| training seconds (800 steps, 1 CPU thread) | " + " | ".join(
            f"{c[a]['training']['seconds']:.0f}" for a in arms) + " |")
        L += ["", "Training (both arms): `python -m ldm_tutorial.tinysd.train unet --unet-preset small "
              "--n-scenes 4000 --batch 32 --lr 1e-3 --warmup 100 --steps 800 --threads 1 --latent-scale config` "
              "(cross: the scaling comparison's `tinysd-scaling/scaled`; pooled: the same plus "
              "`--conditioning pooled --latents-cache` a copy of that run's latents cache, so both read the "
              "same pre-encoded latents), on the 2-core CPU shared with other jobs (load average about 7 during "
              "the pooled run). Same scenes, captions and data order (NumPy seeds); the torch draws (latent "
              "samples, noise, timesteps) differ after the different initialisations (first-batch z0 std "
              "1.00317 against 1.00325). The pooled arm lacks the transformer blocks, so it also lacks their "
              "self-attention and a third of the parameters; `--conditioning pooled-token` (same blocks, the "
              "pooled vector as the only key) is implemented but was not trained for lack of CPU time.", ""]
    if "excite" in res:
        e = res["excite"]
        L += ["## Attend-and-Excite on TinySD", "",
              f"n = {e['n']} two-object prompts (seed {e['seed']}; {e.get('n_planned', e['n'])} planned), the same "
              "seeds with and without; token_indices: the two shape words.", "",
              "| | fully correct | colour+shape+position per object | seconds per image |", "|---|---|---|---|"]
        for name in ("plain", "attend_and_excite"):
            L.append(f"| {name} | {e[name]['fully_correct']:.3f} | {e[name]['colour_shape_position']:.3f} | "
                     f"{e[name]['seconds_per_image']:.2f} |")
        L.append("")
    return "\n".join(L) + "\n"


def main() -> None:
    from ldm_tutorial.runtime import cpu_name

    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", nargs="+", default=["comparison", "daam", "excite"])
    ap.add_argument("--n-measure", type=int, default=64)
    ap.add_argument("--n-thresh", type=int, default=32)
    ap.add_argument("--n-per-count", type=int, default=64)
    ap.add_argument("--n-excite", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}
    for part in a.parts:
        t0 = time.time()
        if part == "comparison":
            res["comparison"] = comparison_part(a.n_per_count, a.batch)
        elif part == "daam":
            res["daam"] = daam_part(a.n_measure, a.n_thresh, a.batch)
        elif part == "excite":
            def save(partial):
                res["excite"] = partial
                OUT_JSON.write_text(json.dumps(res, indent=1) + "\n")
                OUT_MD.write_text(markdown(res, res.get("machine", ""), res.get("date", "")))
            res["excite"] = excite_part(a.n_excite, save)
        else:
            raise SystemExit(f"--parts: unknown part {part!r}")
        res.setdefault("seconds", {})[part] = time.time() - t0
        machine = f"{cpu_name()}, {os.cpu_count()} cores"
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        res["machine"], res["date"] = machine, date
        OUT_JSON.write_text(json.dumps(res, indent=1) + "\n")          # after each part: nothing lost
        OUT_MD.write_text(markdown(res, machine, date))
        print(f"== {part} done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
