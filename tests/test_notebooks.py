"""The book's sources: every chapter .md has an in-sync, output-free .ipynb, and the TOC resolves."""
import json
from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p for p in (ROOT / "book").rglob("*.md") if p.parent != ROOT / "book")
NOTEBOOKS = sorted(p for p in (ROOT / "book").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def test_there_are_chapters():
    assert CHAPTERS and NOTEBOOKS


@pytest.mark.parametrize("md", CHAPTERS, ids=lambda p: p.name)
def test_chapter_has_paired_ipynb_in_sync(md):
    ipynb = md.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.relative_to(ROOT)} missing: run `make sync`"
    expected = jupytext.read(md)
    actual = json.loads(ipynb.read_text())
    exp = [(c.cell_type, c.source) for c in expected.cells]
    act = [(c["cell_type"], "".join(c["source"])) for c in actual["cells"]]
    assert act == exp, f"{ipynb.relative_to(ROOT)} is out of sync with its .md: run `make sync`"
    assert actual["metadata"]["kernelspec"]["name"] == "python3"
    assert actual["metadata"].get("execution", {}).get("timeout"), "set execution: timeout for nbmake"


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_have_no_outputs(ipynb):
    nb = json.loads(ipynb.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, (
                f"{ipynb.relative_to(ROOT)} has outputs: run `make sync`")


def _toc_files(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("root", "file"):
                yield value
            else:
                yield from _toc_files(value)
    elif isinstance(node, list):
        for item in node:
            yield from _toc_files(item)


def test_toc_entries_exist():
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = list(_toc_files(toc))
    assert files
    for f in files:
        assert (ROOT / f"{f}.md").exists() or (ROOT / f"{f}.ipynb").exists(), f
        has_code = (ROOT / f"{f}.md").exists() and "```{code-cell}" in (ROOT / f"{f}.md").read_text()
        if f != toc["root"] and has_code:
            assert (ROOT / f"{f}.ipynb").exists(), f"{f}.ipynb missing (nbmake and Colab need it)"
    chapters_in_toc = {ROOT / f"{f}.md" for f in files}
    assert set(CHAPTERS) <= chapters_in_toc, "a chapter is missing from _toc.yml"
