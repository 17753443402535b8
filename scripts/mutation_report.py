"""Summarise a mutmut run per module into benchmarks/mutation.md.

    make mutation                     # runs mutmut over the core modules, then this script
    .venv/bin/python scripts/mutation_report.py [--seconds S]

Reads `mutmut results --all true` (one "name: status" line per mutant) and the reviewed list of
equivalent mutants, `benchmarks/mutation_equivalent.txt` ("mutant name  # why it cannot be told
apart"). A mutant is killed when a test fails (or times out) with it in place; survived when every
selected test passes; equivalent when review found it changes no behaviour. The score is
killed / (killed + survived - equivalent).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import platform
import subprocess
import sys
from pathlib import Path

from ldm_tutorial.runtime import cpu_name

ROOT = Path(__file__).resolve().parents[1]
KILLED = {"killed", "timeout", "segfault"}


def read_equivalent(path: Path) -> dict[str, str]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, why = line.partition("#")
            if name.strip():
                out[name.strip()] = why.strip()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=None, help="wall time of the mutmut run, for the table")
    a = ap.parse_args()
    mutmut = Path(sys.executable).with_name("mutmut")
    text = subprocess.run([str(mutmut), "results", "--all", "true"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout
    equivalent = read_equivalent(ROOT / "benchmarks" / "mutation_equivalent.txt")
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    survivors: list[str] = []
    for line in text.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if not name:
            continue
        module = name.split(".x_")[0].split(".xǁ")[0]
        status = status.strip()
        if status in KILLED:
            counts[module]["killed"] += 1
        elif status in ("survived", "no tests") and name in equivalent:
            counts[module]["equivalent"] += 1
        elif status in ("survived", "no tests"):     # no test reaches it: as good as survived
            counts[module]["survived"] += 1
            survivors.append(f"{name} ({status})")
        else:
            counts[module][status] += 1
    lines = ["# Mutation testing", "",
             "Written by `scripts/mutation_report.py` after `make mutation` (mutmut over the core modules,",
             "against the unit tests named in pyproject.toml's `[tool.mutmut]`). Killed: a test failed or timed",
             "out with the mutant in place. Survived: every selected test passed, or none reaches the code",
             "(\"no tests\"). Equivalent: reviewed, changes no behaviour (benchmarks/mutation_equivalent.txt",
             "says why, one line each). Score: killed / (killed + survived).", "",
             f"- machine: {cpu_name()}, {platform.machine()}, Python {platform.python_version()}",
             f"- date: {datetime.date.today().isoformat()}"
             + (f"; the run took {a.seconds / 60:.0f} min" if a.seconds else ""), "",
             "| module | killed | survived | equivalent | other | score |", "|---|---:|---:|---:|---:|---:|"]
    for module in sorted(counts):
        c = counts[module]
        other = sum(v for k, v in c.items() if k not in ("killed", "survived", "equivalent"))
        denom = c["killed"] + c["survived"]
        score = f"{100 * c['killed'] / denom:.0f}%" if denom else "-"
        lines.append(f"| {module} | {c['killed']} | {c['survived']} | {c['equivalent']} | {other} | {score} |")
    if survivors:
        lines += ["", "## Survivors not yet reviewed", ""] + [f"- `{s}`" for s in survivors]
    (ROOT / "benchmarks" / "mutation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12 + len(counts)]))


if __name__ == "__main__":
    main()
