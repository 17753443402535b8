"""Put the notebooks nbmake executed into Jupyter Book's execution cache, so `make book` does not run
every chapter a second time.

Usage: python scripts/seed_book_cache.py EXECUTED_DIR CACHE_DIR

`make notebooks` executes copies of the chapters under _executed/ (nbmake --overwrite keeps
their outputs there; the committed .ipynb files stay output-free). jupyter-cache keys a notebook on
its code cells and kernelspec, which the .md source and its paired .ipynb share
(tests/test_notebooks.py checks the pair). A chapter edited since nbmake ran has other code cells,
so it misses the cache and Jupyter Book executes it, as it would have anyway. A notebook with an
error output is not cached. nbclient records each cell's execution times in its metadata, which
jupyter-cache would hash too: they are dropped first, so the keys match.
"""
import sys
from pathlib import Path

import nbformat
from jupyter_cache import get_cache


def has_error(nb) -> bool:
    return any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


def main(executed: str, cache_dir: str) -> int:
    cache = get_cache(cache_dir)
    added = 0
    for path in sorted(Path(executed).rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        nb = nbformat.read(path, as_version=4)
        ran = [c for c in nb.cells if c.cell_type == "code" and c.get("execution_count")]
        if not ran or has_error(nb):
            print(f"skipped (not executed or failed): {path}")
            continue
        for cell in nb.cells:
            cell.metadata.pop("execution", None)          # nbclient's timings: not part of the key
        nbformat.write(nb, path)
        cache.cache_notebook_file(str(path), check_validity=False, overwrite=True)
        added += 1
    print(f"{added} executed notebook(s) cached in {cache_dir}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
