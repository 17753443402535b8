"""Every command that writes something the book reads: a result, a benchmark table, a shipped weight.

One module per result, each over `harness` and run as `python -m ldm_tutorial.experiments.<name>`.
The rule for new code: if a chapter imports it, it belongs in a concept module
(`ldm_tutorial/*.py`); if it writes something to disk for the book, it is an experiment here.
Chapters never import this package; they read what it wrote with `ldm.results.load(name)`.

`EXPERIMENTS` lists them: name -> (chapter that reads it, results written, benchmarks table).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Experiment:
    """What one experiment writes, and who reads it."""
    chapter: str                 # the book chapter (or "tinysd" for the model zoo's own records)
    results: tuple[str, ...]     # names under ldm_tutorial/results/ (ldm.results.load(name))
    markdown: str | None         # the table under benchmarks/, if any
    weights: tuple[str, ...] = ()   # shipped weight folders it writes, if any


EXPERIMENTS: dict[str, Experiment] = {}
