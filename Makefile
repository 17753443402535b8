# ldm-tutorial: two commands, `make test` and `make book`. Everything runs from .venv.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
PIP   := $(VENV)/bin/pip
TORCH := torch==2.13.0
CHAPTERS := $(shell find book -name '*.md' -path 'book/*/*' | sort)
NB_TIMEOUT := 300

.PHONY: venv test unit notebooks book sync bench mutation clean

venv: $(VENV)/.stamp

# Torch first and pinned, so pip never resolves an unpinned (multi-GB CUDA) torch for `torch>=2.4`.
$(VENV)/.stamp: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev]"
	touch $@

test: unit notebooks

unit: venv
	$(PY) -m pytest -q tests

notebooks: venv
	$(PY) -m pytest -q --nbmake --nbmake-timeout=$(NB_TIMEOUT) book

# jupyter-cache hashes only code cells, and Sphinx rebuilds only changed sources: when the package or the
# shipped weights change, wipe both so every chapter re-executes against the new code.
book: venv
	@h=$$(find ldm_tutorial -type f \( -name '*.py' -o -name '*.json' -o -name '*.txt' -o -name '*.safetensors' \) \
	      -not -path '*/__pycache__/*' | sort | xargs sha256sum | sha256sum | cut -c1-16); \
	if [ "$$(cat _build/.package_hash 2>/dev/null)" != "$$h" ]; then \
	  echo "ldm_tutorial changed: clearing the execution cache and Sphinx's environment"; \
	  rm -rf _build/.jupyter_cache _build/.doctrees _build/jupyter_execute _build/html; fi; \
	$(VENV)/bin/jupyter-book build . -W --keep-going -q && mkdir -p _build && echo "$$h" > _build/.package_hash
	@echo "Open _build/html/index.html"

# Re-pair every chapter: .md is the source; the .ipynb is regenerated without outputs, cell ids kept.
sync: venv
	for md in $(CHAPTERS); do $(VENV)/bin/jupytext --update --to ipynb "$$md" -q; done
	$(PY) scripts/strip_outputs.py book

bench: venv
	$(PY) scripts/bench_notebooks.py

# Mutation testing of the core modules (mutmut, configured in pyproject.toml); slow, not part of CI.
mutation: venv
	$(PIP) install -q "mutmut==3.8.1"
	start=$$(date +%s); OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run; \
	$(PY) scripts/mutation_report.py --seconds $$(( $$(date +%s) - start ))

clean:
	rm -rf _build .pytest_cache mutants
