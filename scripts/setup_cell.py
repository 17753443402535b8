"""Every chapter's first code cell, the Colab setup, written from one template.

The package a Colab reader installs comes from one place: `repository.url` in _config.yml (the
same URL the Colab and repository buttons use). Publishing the book elsewhere is a one-line change
there, then `make sync` (which runs this script) rewrites the setup cell of every chapter.
`tests/test_notebooks.py` fails when a chapter's setup cell differs from the template.

Usage: python scripts/setup_cell.py [--check] [CHAPTER.md ...]   (default: every chapter)
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MARKER = "# Setup: installs the helper package on Colab only; a no-op everywhere else."

TEMPLATE = '''{marker}
import os
import sys

IN_COLAB = "google.colab" in sys.modules
# LDM_TUTORIAL_PACKAGE installs another build instead (a wheel file, a fork, a tag).
PACKAGE = os.environ.get(
    "LDM_TUTORIAL_PACKAGE", "git+{url}")
if IN_COLAB:
    get_ipython().run_line_magic("pip", f"install -q {{PACKAGE}}")'''

CELL = re.compile(r"```\{code-cell\} ipython3\n" + re.escape(MARKER) + r"\n.*?\n```", re.S)


def repository_url(config: Path = ROOT / "_config.yml") -> str:
    return yaml.safe_load(config.read_text())["repository"]["url"]


def cell_source(url: str | None = None) -> str:
    return TEMPLATE.format(marker=MARKER, url=url or repository_url())


def chapters() -> list[Path]:
    return sorted(p for p in (ROOT / "book").rglob("*.md") if p.parent != ROOT / "book")


def rewrite(md: Path, source: str) -> bool:
    """Replace the setup cell of one chapter; True if the file changed. Fails if it has none."""
    text = md.read_text()
    if not CELL.search(text):
        raise SystemExit(f"{md}: no setup cell starting with {MARKER!r}")
    new = CELL.sub(lambda _: "```{code-cell} ipython3\n" + source + "\n```", text, count=1)
    if new != text:
        md.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="report chapters that differ; change nothing")
    ap.add_argument("chapters", nargs="*", type=Path)
    a = ap.parse_args(argv)
    source = cell_source()
    stale = []
    for md in a.chapters or chapters():
        m = CELL.search(md.read_text())
        if m is None or m.group(0) != "```{code-cell} ipython3\n" + source + "\n```":
            stale.append(md)
            if not a.check:
                rewrite(md, source)
    for md in stale:
        print(f"{'differs' if a.check else 'rewrote'}: {md}")
    return 1 if (a.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
