"""The one harness under every experiment: arguments, threads, machine record, saving.

An experiment is a module of `ldm_tutorial.experiments` that writes something the book reads: a
result in `ldm_tutorial/results/` (through `results.save`), a readable table in `benchmarks/`, or a
shipped weight. Each one is run as `python -m ldm_tutorial.experiments.<name>` and is built on this
module, so `--threads`, `--quick`, `--out` and `--markdown` mean the same thing everywhere:

    def main(argv=None):
        ap = harness.parser("guidance_sweep", __doc__)          # the common arguments
        ap.add_argument("--steps", type=int, default=25)        # the experiment's own
        run = harness.start(ap, argv)                           # threads set, clock started
        result = measure(..., quick=run.quick)
        run.save(result, to_markdown(result, run))              # JSON (+ machine record), markdown

The machine record has one shape for every experiment (`machine()`); the committed results written
before the harness keep the shapes they were written with.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import results
from ..runtime import cpu_name

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"


def machine() -> dict:
    """Where and when a measurement ran: CPU, cores, torch threads, versions, 1-minute load, date."""
    try:
        load = round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):   # not on every platform
        load = None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_1min": load, "date": datetime.date.today().isoformat()}


def machine_line(record: dict) -> str:
    """One readable line for a table's caption: 'AMD EPYC ..., 1 of 2 cores, torch 2.13.0, 2026-12-06'."""
    return (f"{record.get('cpu', '?')}, {record.get('threads', '?')} thread(s) of {record.get('cores', '?')} cores,"
            f" torch {record.get('torch', '?')}, {record.get('date', '?')}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats are written as they come (format them first)."""
    if any(len(r) != len(header) for r in rows):
        raise ValueError(f"every row must have {len(header)} cells (the header's), got {[len(r) for r in rows]}")
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def parser(name: str, description: str | None = None, markdown: str | None = None) -> argparse.ArgumentParser:
    """The argument parser every experiment starts from.

    Args:
        name: the result's bare name (`results.path(name)` is the default `--out`).
        description: the module's docstring, shown by `--help`.
        markdown: the benchmarks/ file the table goes to (default `<name>.md`), or "" for none.
    """
    ap = argparse.ArgumentParser(prog=f"python -m ldm_tutorial.experiments.{name}", description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the tables were run)")
    ap.add_argument("--quick", action="store_true", help="a small run that checks the experiment itself")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"where the JSON goes (default: ldm_tutorial/results/{name}.json, read by the book)")
    md = f"{name}.md" if markdown is None else markdown
    ap.add_argument("--markdown", type=Path, default=(BENCHMARKS / md) if md else None,
                    help="where the readable table goes (default: benchmarks/%s)" % (md or "none"))
    ap.set_defaults(_experiment=name)
    return ap


@dataclass
class Run:
    """One run of an experiment: its arguments, its clock and where it writes."""
    name: str
    args: argparse.Namespace
    started: float = field(default_factory=time.perf_counter)

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def out(self) -> Path:
        return Path(self.args.out) if self.args.out is not None else results.path(self.name)

    def record(self) -> dict:
        """The machine record plus this run's seconds and whether it was a quick run."""
        return {**machine(), "seconds": round(self.seconds, 1), "quick": self.quick}

    def save(self, result: dict, markdown: str | None = None, key: str = "machine") -> Path:
        """Write `result` (with the machine record under `key`) as JSON, and `markdown` if given.

        A `--quick` run never overwrites the committed result: without `--out` it writes to
        `<name>.quick.json` beside the working directory instead, and skips the markdown.
        """
        if key:
            result = {**result, key: self.record()}
        out = self.out
        if self.quick and self.args.out is None:
            out = Path(f"{self.name}.quick.json")
        path = results.save(self.name, result, to=out)
        md = self.args.markdown
        if markdown is not None and md is not None and not (self.quick and self.args.out is None):
            Path(md).parent.mkdir(parents=True, exist_ok=True)
            Path(md).write_text(markdown if markdown.endswith("\n") else markdown + "\n")
        print(f"wrote {path}" + (f" and {md}" if markdown is not None and md is not None else ""))
        return path


def start(ap: argparse.ArgumentParser, argv: list[str] | None = None) -> Run:
    """Parse the arguments, check them, set torch's threads and start the clock."""
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads must be a positive whole number, got {args.threads}")
    torch.set_num_threads(args.threads)
    return Run(name=args._experiment, args=args)
