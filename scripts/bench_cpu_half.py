"""Half precision on the CPU: time and pixel difference of one TinySD image per dtype.

Backs `ldm.runtime.cpu_half_note` (load_pipeline's warning when float16 or bfloat16 is asked for on the
CPU). One thread, the same prompt and seed per dtype, 25 DDIM steps with guidance 5, after one warm-up
call. Writes benchmarks/cpu_half.md. Usage: `.venv/bin/python scripts/bench_cpu_half.py [--threads N]`.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time
import warnings
from pathlib import Path

import torch

import ldm_tutorial as ldm
from ldm_tutorial.runtime import cpu_name

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on the left"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows, ref = [], None
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)        # cpu_half_note: the thing measured here
            pipe = ldm.load_pipeline("tiny", device="cpu", dtype=dtype, verbose=False)

        def run():
            return pipe(PROMPT, num_inference_steps=25, guidance_scale=5.0, output_type="pt",
                        generator=torch.Generator().manual_seed(0)).images.float()

        run()
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            image = run()
            times.append(time.perf_counter() - t0)
        ref = image if ref is None else ref
        rows.append((str(dtype).removeprefix("torch."), min(times), (image - ref).abs().max().item(),
                     bool(torch.isfinite(image).all())))
        print(rows[-1], flush=True)
    base = rows[0][1]
    lines = ["# Half precision on the CPU", "",
             "Written by `scripts/bench_cpu_half.py`: one TinySD image (25 DDIM steps, guidance 5, the same",
             f"prompt and seed), the best of {a.repeats} calls after a warm-up, {a.threads} thread(s). The pixel",
             "difference is the largest absolute difference from float32 in [0, 1] pixel units.", "",
             f"- machine: {cpu_name()}, {platform.system()} {platform.machine()}, torch {torch.__version__}",
             f"- date: {datetime.date.today().isoformat()}", "",
             "| dtype | seconds per image | time vs float32 | max pixel difference | finite |",
             "|---|---:|---:|---:|---|"]
    lines += [f"| {n} | {s:.2f} | {s / base:.2f}x | {d:.4f} | {f} |" for n, s, d, f in rows]
    (ROOT / "benchmarks" / "cpu_half.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
