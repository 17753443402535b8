"""Seconds per training step of each TinySD stage on this machine, written to benchmarks/tinysd_training.md.

    .venv/bin/python scripts/bench_training.py [--steps 4] [--threads N]

Each stage trains for a few steps from scratch (the U-Nets and TAESD against the shipped VAE and text
encoder) into a temporary folder, at its default batch size; the first step is warm-up and not
counted. With the GPU figures in benchmarks/tinysd.md this tells how long a stage takes on each device.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ldm_tutorial.tinysd import WEIGHTS_DIR, train

STAGE_BATCH = {"clip": 256, "vae": 48, "unet": 256, "inpaint": 256, "taesd": 64}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def time_stage(stage: str, steps: int, work: Path) -> float:
    out, ck = work / "w", work / "ck"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(WEIGHTS_DIR, out)
    ctx = train.Ctx(device=torch.device("cpu"), out=out, ckpt_dir=ck, n_scenes=512, ckpt_every=1e9)
    fn = {"clip": train.train_clip, "vae": train.train_vae, "unet": train.train_unet, "taesd": train.train_taesd,
          "inpaint": lambda c, b, **k: train.train_unet(c, b, inpaint=True, **k)}[stage]
    fn(ctx, train.Budget(1, None), batch=STAGE_BATCH[stage])            # warm-up (and data, model setup)
    shutil.rmtree(ck, ignore_errors=True)
    res = fn(ctx, train.Budget(steps, None), batch=STAGE_BATCH[stage])
    return res["seconds"] / res["steps"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/tinysd_training.md")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in STAGE_BATCH:
            s = time_stage(stage, a.steps, Path(tmp))
            rows.append((stage, STAGE_BATCH[stage], s))
            print(f"{stage}: {s:.2f} s/step at batch {STAGE_BATCH[stage]}", flush=True)
    lines = ["# TinySD training speed on the CPU", "",
             f"`scripts/bench_training.py --steps {a.steps}` on {cpu_name()}, {os.cpu_count()} cores, "
             f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, {datetime.date.today()}.",
             "GPU figures (steps and seconds of the shipped weights) are in benchmarks/tinysd.md.", "",
             "| stage | batch | seconds per step | steps per hour |", "|---|---|---|---|"]
    lines += [f"| {st} | {b} | {s:.2f} | {3600 / s:,.0f} |" for st, b, s in rows]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
