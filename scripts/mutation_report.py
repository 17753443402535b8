"""Summarise a mutmut run per module into benchmarks/mutation.md.

    make mutation                     # runs mutmut in build/mutation (a copy of HEAD), then this script
    .venv/bin/python scripts/mutation_report.py [--dir build/mutation] [--seconds S] [--merge]

Reads `mutmut results --all true` in the run's directory (`--dir`: where mutmut ran and keeps its
mutants/ folder; one "name: status" line per mutant), the reviewed survivors that are real but not
killed here (`benchmarks/mutation_survivors.txt`, same format: listed with their reason) and the reviewed list of
equivalent mutants, `benchmarks/mutation_equivalent.txt` ("mutant name  # why it cannot be told
apart"). A mutant is killed when a test fails (or times out) with it in place; survived when every
selected test passes; equivalent when review found it changes no behaviour; not run when mutmut has
no verdict for it yet (a run over a sample, or one stopped early). The score is
killed / (killed + survived), equivalent mutants left out.

--merge keeps the rows of modules this run did not cover from the existing report (a run over some
modules only), and everything from a "## Notes" heading on is kept as written by hand.
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
    ap.add_argument("--merge", action="store_true", help="keep the existing rows of modules not in this run")
    ap.add_argument("--dir", type=Path, default=ROOT, help="where mutmut ran (its mutants/ folder is there)")
    a = ap.parse_args()
    report = ROOT / "benchmarks" / "mutation.md"
    old = report.read_text() if report.exists() else ""
    notes = old[old.index("## Notes"):] if "## Notes" in old else ""
    mutmut = Path(sys.executable).with_name("mutmut")
    text = subprocess.run([str(mutmut), "results", "--all", "true"], cwd=a.dir, capture_output=True,
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
            counts[module]["no tests"] += status == "no tests"
            survivors.append(f"{name} ({status})")
        elif status == "not checked":
            counts[module]["not run"] += 1
        else:
            counts[module][status] += 1
    lines = ["# Mutation testing", "",
             "Written by `scripts/mutation_report.py` after `make mutation` (mutmut over the core modules,",
             "against the unit tests named in pyproject.toml's `[tool.mutmut]`). Killed: a test failed or timed",
             "out with the mutant in place. Survived: every selected test passed, or none reaches the code",
             "(\"no tests\"). Equivalent: reviewed, changes no behaviour (benchmarks/mutation_equivalent.txt",
             "says why, one line each). Score: killed / (killed + survived). \"no tests\": the survivors no",
             "selected test reaches (counted in survived too).", "",
             f"- machine: {cpu_name()}, {platform.machine()}, Python {platform.python_version()}",
             f"- date: {datetime.date.today().isoformat()}"
             + (f"; the run took {a.seconds / 60:.0f} min" if a.seconds else ""), "",
             "| module | killed | survived | no tests | equivalent | not run | other | score |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = {}
    if a.merge:
        for line in old.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("| ldm_tutorial.") and cells[0] not in counts:
                if len(cells) == 6:              # a report written before the "not run" column
                    cells = cells[:4] + ["0"] + cells[4:]
                if len(cells) == 7:              # a report written before the "no tests" column
                    cells = cells[:3] + ["-"] + cells[3:]
                rows[cells[0]] = "| " + " | ".join(cells) + " |"
    for module in sorted(counts):
        c = counts[module]
        other = sum(v for k, v in c.items() if k not in ("killed", "survived", "no tests", "equivalent", "not run"))
        denom = c["killed"] + c["survived"]
        score = f"{100 * c['killed'] / denom:.0f}%" if denom else "-"
        rows[module] = (f"| {module} | {c['killed']} | {c['survived']} | {c['no tests']} | {c['equivalent']} | {c['not run']} | "
                        f"{other} | {score} |")
    lines += [rows[m] for m in sorted(rows)]
    if a.merge and "## Survivors not yet reviewed" in old:      # keep the other modules' survivors listed
        kept = [line for line in old.split("## Survivors not yet reviewed", 1)[1].split("\n## ", 1)[0].splitlines()
                if line.startswith("- `") and line[3:].split(".x", 1)[0] not in counts]
        survivors_lines = kept
    else:
        survivors_lines = []
    reviewed = read_equivalent(ROOT / "benchmarks" / "mutation_survivors.txt")     # real, reviewed, not killed
    survivors_lines += [f"- `{s}`" for s in survivors if s.rsplit(" (", 1)[0] not in reviewed]
    kept_real = [f"- `{s}`: {reviewed[s.rsplit(' (', 1)[0]]}" for s in survivors if s.rsplit(" (", 1)[0] in reviewed]
    if kept_real:
        lines += ["", "## Survivors reviewed: real, not killed here (benchmarks/mutation_survivors.txt)", ""] + kept_real
    if survivors_lines:
        lines += ["", "## Survivors not yet reviewed", ""] + survivors_lines
    report.write_text("\n".join(lines) + "\n" + ("\n" + notes if notes else ""))
    print("\n".join(lines[:13 + len(rows)]))


if __name__ == "__main__":
    main()
