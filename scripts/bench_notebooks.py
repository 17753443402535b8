"""Execute each chapter notebook on its own and record wall time and peak memory.

Each notebook runs in a fresh `python -m pytest --nbmake` child; its process tree (pytest and the
kernel it starts) is polled with psutil for the peak sum of resident memory. Writes
benchmarks/notebooks.md. Usage: `make bench` (or `python scripts/bench_notebooks.py [notebooks...]`).
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil

from ldm_tutorial.runtime import cpu_name as cpu_model

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(notebook: Path, timeout: int = 600) -> tuple[float, float, int]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbmake",
           f"--nbmake-timeout={timeout}", str(notebook)]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        peak = max(peak, tree_rss(proc))
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if child.returncode:
        sys.stdout.write(child.stdout.read().decode(errors="replace"))
    return seconds, peak / 2**20, child.returncode


def main(paths: list[str]) -> int:
    if any(p in ("-h", "--help") for p in paths):
        print(__doc__)
        return 0
    bad = [p for p in paths if not (p.endswith(".ipynb") and Path(p).is_file())]
    if bad:   # before anything runs: a typo must not overwrite the committed table
        raise SystemExit(f"notebooks must be paths of existing .ipynb files, got {bad}")
    notebooks = [Path(p) for p in paths] or sorted((ROOT / "book").rglob("*.ipynb"))
    notebooks = [p for p in notebooks if ".ipynb_checkpoints" not in p.parts]
    rows, failed = [], 0
    for nb in notebooks:
        seconds, mib, rc = run(nb)
        failed += rc != 0
        rel = nb.resolve().relative_to(ROOT)
        rows.append(f"| {rel} | {seconds:.1f} | {mib:.0f} | {'ok' if rc == 0 else 'FAILED'} |")
        print(rows[-1])
    out = ROOT / "benchmarks" / "notebooks.md"
    out.parent.mkdir(exist_ok=True)
    machine = (f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}, "
               f"{platform.system()} {platform.machine()}, Python {platform.python_version()}")
    out.write_text(
        "# Chapter execution benchmark\n\n"
        "Written by `make bench` (scripts/bench_notebooks.py): each chapter executed alone under nbmake;\n"
        "seconds are wall time of the whole `pytest --nbmake` child (interpreter and kernel start included);\n"
        "peak memory is the largest sum of resident memory over that child's process tree, polled every 50 ms.\n\n"
        f"- machine: {machine}\n"
        f"- date: {datetime.date.today().isoformat()}\n\n"
        "| chapter | seconds | peak memory (MiB) | result |\n|---|---:|---:|---|\n" + "\n".join(rows) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
