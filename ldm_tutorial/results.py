"""The committed measurements that chapters read, shipped inside the package.

Heavier measurements run beforehand with a script and are committed as JSON in
`ldm_tutorial/results/` (their readable tables and run notes live in `benchmarks/*.md`). They ship
in the wheel, so a chapter opened on Colab, where the package comes from one `%pip` line and the
repository's files are absent, reads the same figures as CI.

    ldm.results.load("guidance")          # written by python -m ldm_tutorial.guidance --sweep
    ldm.results.load("scaling_factor")    # written by scripts/scaling_factor_eval.py
    ldm.results.load("cross_attention")   # written by scripts/cross_attention_eval.py
    ldm.results.load("image_editing")     # written by python -m ldm_tutorial.editing --sweep
    ldm.results.load("latent_space")      # written by python -m ldm_tutorial.inversion --sweep
    ldm.results.load("production")        # written by python -m ldm_tutorial.perf --measure
    ldm.results.load("tinysd_autoguidance")   # python -m ldm_tutorial.tinysd.evaluate --defects
                                              #   --adherence-settings "..." (README) --out ...
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


def path(name: str) -> Path:
    """Where the committed result `name` lives (it need not exist yet: scripts write there)."""
    if not isinstance(name, str) or not name or "/" in name or name.endswith(".json"):
        raise ValueError(f"name must be a result's bare name such as 'guidance', got {name!r}")
    return RESULTS_DIR / f"{name}.json"


def available() -> list[str]:
    """The names of the committed results."""
    return sorted(p.stem for p in RESULTS_DIR.glob("*.json"))


def save(name: str, data: dict, to: str | Path | None = None) -> Path:
    """Write a result as the book reads it (JSON, indent 1, one trailing newline); returns its path.

    `to` defaults to the committed result `name` (`path(name)`); experiments pass `--out` here.
    """
    if not isinstance(data, dict):
        raise TypeError(f"data must be a dict (a result), got {type(data).__name__}")
    p = Path(to) if to is not None else path(name)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=1) + "\n")
    return p


def load(name: str) -> dict:
    """The committed result `name` as a dict; FileNotFoundError naming the ones there are."""
    p = path(name)
    if not p.exists():
        raise FileNotFoundError(f"no committed result {name!r} in {RESULTS_DIR}; there are {available()}")
    return json.loads(p.read_text())
