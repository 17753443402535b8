"""Guidance rules beyond classifier-free guidance, scored on TinySD's visual defects (issue 21).

    OMP_NUM_THREADS=1 nice .venv/bin/python scripts/guidance_variants.py [--n-per-count 32] [--rows ...]

Each row samples the standard evaluation's first n prompts per count with their noise (as
`evaluate.generation_latents`: 25 DDIM steps, w = 5 unless the row says otherwise), decodes with
the shipped VAE and scores `defects.all_defects` and the parser's adherence. The loop is ldm.sample's
with the guidance formula swapped; a check first asserts that its plain-CFG rule reproduces
ldm.sample's latents. Rules:

* cfg:        eps_u + w (eps_c - eps_u), the default.
* apg ...:    adaptive projected guidance (Sadat et al., arXiv:2410.02416) on the x0 predictions,
              through diffusers' `normalized_guidance`: the guidance update's component parallel to
              the conditional x0 is weighted by eta (eta = 1 is CFG), optionally with momentum.
* freq ...:   the update split into a low band (average-pooled by k and upsampled) and the rest,
              guided with separate scales (the two-band idea of frequency-decoupled guidance).
* mask:       the update weighted by where the two predictions disagree (smoothed |eps_c - eps_u|,
              1 at its maximum): w_eff = 1 + (w - 1) m.
* auto ...:   autoguidance (Karras et al., arXiv:2406.02507): a weaker *conditional* model guides
              the main one, eps_c + (w - 1)(eps_c - eps_u) + (w_ag - 1)(eps_c - eps_weak); w = 1 is
              autoguidance alone. weak "small" is the scaling chapter's small U-Net (1.0M
              parameters, 800 steps on the same latents and text encoder); main "control" is
              the shipped U-Net continued on the CPU, guided by the shipped one as the weak model.

Writes benchmarks/guidance_variants.json and prints a markdown table (benchmarks/tinysd.md,
"Other guidance rules").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "guidance_variants.json"

ROWS = {
    "cfg (default)": {"mode": "cfg"},
    "APG, eta 0": {"mode": "apg", "eta": 0.0},
    "APG, eta 0, momentum -0.5": {"mode": "apg", "eta": 0.0, "momentum": -0.5},
    "APG, eta 2": {"mode": "apg", "eta": 2.0},
    "two bands, low 5 / high 3": {"mode": "freq", "w_lo": 5.0, "w_hi": 3.0},
    "two bands, low 5 / high 1": {"mode": "freq", "w_lo": 5.0, "w_hi": 1.0},
    "two bands, low 1 / high 5": {"mode": "freq", "w_lo": 1.0, "w_hi": 5.0},
    "masked by disagreement": {"mode": "mask"},
    "autoguidance, small U-Net, w_ag 2": {"mode": "auto", "weak": "small", "w": 1.0, "w_ag": 2.0},
    "autoguidance, small U-Net, w_ag 3": {"mode": "auto", "weak": "small", "w": 1.0, "w_ag": 3.0},
    "cfg 3 + autoguidance small, w_ag 2": {"mode": "auto", "weak": "small", "w": 3.0, "w_ag": 2.0},
    "cfg 4 + autoguidance small, w_ag 2": {"mode": "auto", "weak": "small", "w": 4.0, "w_ag": 2.0},
    "cfg 5 + autoguidance small, w_ag 2": {"mode": "auto", "weak": "small", "w": 5.0, "w_ag": 2.0},
    "cfg 3 + autoguidance small, w_ag 1.5": {"mode": "auto", "weak": "small", "w": 3.0, "w_ag": 1.5},
    "cfg 4 + autoguidance small, w_ag 1.5": {"mode": "auto", "weak": "small", "w": 4.0, "w_ag": 1.5},
    "cfg 5, continued U-Net": {"mode": "cfg", "main": "control"},
    "continued U-Net, autoguided by shipped, w_ag 3": {"mode": "auto", "main": "control",
                                                     "weak": "shipped", "w": 1.0, "w_ag": 3.0},
}


def rule(cfg: dict, alphas_cumprod: torch.Tensor):
    """A guidance function (eps_u, eps_c, t, latents) -> eps for one row; state resets at each run."""
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance  # noqa: PLC0415

    from ldm_tutorial.guidance import combine, x0_from_eps  # noqa: PLC0415

    w, state = cfg.get("w", 5.0), {}

    def low(e, k):
        return F.interpolate(F.avg_pool2d(e, k), scale_factor=k, mode="bilinear")

    def guide(eu, ec, t, x, first, ew=None):
        d = ec - eu
        if cfg["mode"] == "auto":
            return ec + (w - 1) * d + (cfg["w_ag"] - 1) * (ec - ew)
        if cfg["mode"] == "cfg":
            return combine(eu, ec, w)
        if cfg["mode"] == "apg":
            if first:
                state["m"] = MomentumBuffer(cfg["momentum"]) if "momentum" in cfg else None
            a = alphas_cumprod[int(t)]
            x0 = normalized_guidance(x0_from_eps(x, ec, a), x0_from_eps(x, eu, a), w, state["m"], cfg["eta"])
            return (x - a.sqrt() * x0) / (1 - a).sqrt()
        if cfg["mode"] == "freq":
            lo = low(d, cfg.get("k", 2))
            return eu + cfg["w_lo"] * lo + cfg["w_hi"] * (d - lo)
        if cfg["mode"] == "mask":
            m = F.avg_pool2d(d.abs().mean(1, keepdim=True), 3, 1, 1, count_include_pad=False)
            return eu + (1 + (w - 1) * m / m.amax((2, 3), keepdim=True).clamp_min(1e-12)) * d
        raise ValueError(f"mode must be cfg, apg, freq, mask or auto, got {cfg['mode']!r}")

    return guide


@torch.no_grad()
def latents_for(pipe, scenes: list, n_per_count: int, guide, batch: int = 16,
                unet=None, weak=None) -> torch.Tensor:
    """evaluate.generation_latents' prompts and noise, with `guide` as the guidance formula.

    unet replaces the pipeline's U-Net; weak (a U-Net) adds its conditional prediction as `ew`."""
    from diffusers.utils.torch_utils import randn_tensor  # noqa: PLC0415

    from ldm_tutorial.sampling import encode_prompt  # noqa: PLC0415
    from ldm_tutorial.tinysd import evaluate as ev, shapes  # noqa: PLC0415

    unet = unet or pipe.unet
    sch, size, out = pipe.scheduler, unet.config.sample_size, []
    batch = min(batch, n_per_count)
    for start in tqdm(range(0, len(scenes), batch), desc="generating", mininterval=10):
        chunk = scenes[start:start + batch]
        g = torch.Generator().manual_seed(ev.DEFECT_SEED + start % n_per_count)
        sch.set_timesteps(25)
        x = randn_tensor((len(chunk), 4, size, size), generator=g) * sch.init_noise_sigma
        emb = torch.cat([encode_prompt(pipe.tokenizer, pipe.text_encoder, [""] * len(chunk), "cpu"),
                         encode_prompt(pipe.tokenizer, pipe.text_encoder,
                                       [shapes.describe(s) for s in chunk], "cpu")])
        for i, t in enumerate(sch.timesteps):
            eu, ec = unet(sch.scale_model_input(torch.cat([x] * 2), t), t,
                          encoder_hidden_states=emb).sample.chunk(2)
            ew = None if weak is None else weak(sch.scale_model_input(x, t), t,
                                                encoder_hidden_states=emb[len(chunk):]).sample
            x = sch.step(guide(eu, ec, t, x, i == 0, ew), t, x).prev_sample
        out.append(x)
    return torch.cat(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-per-count", type=int, default=32)
    p.add_argument("--rows", nargs="*", default=list(ROWS), help=f"any of {list(ROWS)}")
    p.add_argument("--out", type=Path, default=OUT, help="JSON file to update (default: %(default)s)")
    a = p.parse_args(argv)
    bad = [r for r in a.rows if r not in ROWS]
    if bad or a.n_per_count < 1:
        p.error(f"--rows must be among {list(ROWS)} and --n-per-count >= 1, got {bad or a.n_per_count}")
    torch.set_num_threads(1)
    from ldm_tutorial.models import load_pipeline  # noqa: PLC0415
    from ldm_tutorial.tinysd import defects  # noqa: PLC0415
    from ldm_tutorial.runtime import cpu_name  # noqa: PLC0415
    from ldm_tutorial.tinysd.evaluate import (_adherence, decode_latents, defect_reference,  # noqa: PLC0415
                                              defect_scenes, generation_latents)

    pipe = load_pipeline("tiny", verbose=False)
    ac = pipe.scheduler.alphas_cumprod
    # the loop is ldm.sample's: its CFG rule reproduces ldm.sample on two prompts per count
    check = defect_scenes(2)
    mine = latents_for(pipe, check, 2, rule(ROWS["cfg (default)"], ac))
    theirs = generation_latents(pipe, check, n_per_count=2, batch=2)
    assert torch.allclose(mine, theirs, atol=1e-5), (mine - theirs).abs().max()

    scenes = defect_scenes(a.n_per_count)
    ref, ref_parsed = defect_reference(256)
    out = a.out
    result = json.loads(out.read_text()) if out.exists() else {}
    result.update(n_per_count=a.n_per_count, machine=cpu_name(),
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    rows = result.setdefault("rows", {})
    from ldm_tutorial.tinysd import load_autoguidance_unet, load_flow_unet  # noqa: PLC0415
    loaders = {"shipped": lambda: pipe.unet, "control": lambda: load_flow_unet(control=True)[0],
               "small": lambda: load_autoguidance_unet(pipe)}
    unets: dict = {}                                   # each U-Net loaded once, when a row needs it

    def unet_named(key):
        if key not in unets:
            unets[key] = loaders[key]()
        return unets[key]

    for name in a.rows:
        t0, cfg = time.time(), ROWS[name]
        main_unet = unet_named(cfg.get("main", "shipped"))
        weak = unet_named(cfg["weak"]) if "weak" in cfg else None
        images = decode_latents(pipe.vae, latents_for(pipe, scenes, a.n_per_count, rule(cfg, ac),
                                                      unet=main_unet, weak=weak))
        row = defects.all_defects(images, scenes, train_reference=ref, train_parsed=ref_parsed)
        rows[name] = {"rule": ROWS[name], "adherence": _adherence(images, scenes, a.n_per_count),
                      "seconds": round(time.time() - t0, 1), **row}
        out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))


def markdown(result: dict) -> str:
    head = ("| rule | 1 object | 2 objects | fringe px / object | objects fringed | bg std x train | "
            "bg flat | stripes | small squares misdrawn | more objects than asked |")
    lines = [head, "|" + "---|" * 10]
    for name, r in result["rows"].items():
        a = r["adherence"]
        lines.append(f"| {name} | {a['1_object']['fully_correct']:.1%} | {a['2_object']['fully_correct']:.1%} | "
                     f"{r['fringe_px_per_object']:.2f} | {r['objects_fringed']:.0%} | {r['bg_std_ratio']:.2f} | "
                     f"{r['bg_flat']:.0%} | {r['bg_stripes']:.0%} | {r['small_square_wrong']:.0%} | "
                     f"{r['more_than_asked']:.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
