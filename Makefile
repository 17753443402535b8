# ldm-tutorial: two commands, `make test` and `make book`. Everything runs from .venv.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
PIP   := $(VENV)/bin/pip
TORCH := torch==2.13.0
CHAPTERS := $(shell find book -name '*.md' -path 'book/*/*' | sort)
NB_TIMEOUT := 300
# Not under _build: nbmake skips any path with a _build folder.
EXECUTED := _executed
MATHJAX := _build/vendor/mathjax/tex-mml-chtml.js

.PHONY: venv test unit notebooks book check-book browser mathjax colab-check sync bench mutation clean

venv: $(VENV)/.stamp

# Torch first and pinned, so pip never resolves an unpinned (multi-GB CUDA) torch for `torch>=2.4`.
$(VENV)/.stamp: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev]"
	touch $@

# What CI runs (.ci/run): the unit tests, every chapter under nbmake, the rendered book in Chromium
# (built from nbmake's outputs), and the Colab path from a wheel in a fresh venv.
test: unit notebooks check-book colab-check

unit: venv
	$(PY) -m pytest -q tests

# nbmake executes copies of the chapters (--overwrite keeps the outputs in the copies only; the committed
# .ipynb files stay output-free) so that `make book` can reuse them instead of executing every chapter again.
notebooks: venv
	rm -rf $(EXECUTED) && mkdir -p $(EXECUTED) && cp -r book $(EXECUTED)/
	$(PY) -m pytest -q --nbmake --nbmake-timeout=$(NB_TIMEOUT) --overwrite $(EXECUTED)/book

# jupyter-cache hashes only code cells, and Sphinx rebuilds only changed sources: when the package or the
# shipped weights change, wipe both so every chapter re-executes against the new code.
book: venv mathjax
	@h=$$(find ldm_tutorial -type f \( -name '*.py' -o -name '*.json' -o -name '*.txt' -o -name '*.safetensors' \) \
	      -not -path '*/__pycache__/*' | sort | xargs sha256sum | sha256sum | cut -c1-16); \
	if [ "$$(cat _build/.package_hash 2>/dev/null)" != "$$h" ]; then \
	  echo "ldm_tutorial changed: clearing the execution cache and Sphinx's environment"; \
	  rm -rf _build/.jupyter_cache _build/.doctrees _build/jupyter_execute _build/html; fi; \
	if [ -d $(EXECUTED)/book ]; then $(PY) scripts/seed_book_cache.py $(EXECUTED)/book _build/.jupyter_cache; fi; \
	$(VENV)/bin/jupyter-book build . -W --keep-going -q && mkdir -p _build && echo "$$h" > _build/.package_hash
	@echo "Open _build/html/index.html"

# MathJax for offline pages and the browser test, unpacked from the npm registry (without npm the pages
# load it from the CDN, as Jupyter Book does by default).
mathjax: $(MATHJAX)
$(MATHJAX):
	@if command -v npm >/dev/null; then \
	  rm -rf _build/vendor && mkdir -p _build/vendor && cd _build/vendor && \
	  npm pack -q mathjax@3.2.2 >/dev/null && tar -xzf mathjax-3.2.2.tgz && mv package/es5 mathjax && \
	  rm -rf package mathjax-3.2.2.tgz; \
	else echo "npm not found: the book will load MathJax from its CDN"; fi

# The rendered book in headless Chromium (scripts/check_book.py); Debian's chromium and chromium-driver
# are installed when missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $$(command -v sudo) apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$(command -v sudo) apt-get install -y -qq chromium chromium-driver; }

check-book: book browser venv
	$(PY) scripts/check_book.py --screenshots docs/screenshots

# The Colab path, simulated: the wheel, a fresh venv outside the repository, chapter 0 run alone.
colab-check: venv
	bash scripts/colab_sim.sh

# Re-pair every chapter: .md is the source; the .ipynb is regenerated without outputs, cell ids kept.
sync: venv
	$(PY) scripts/setup_cell.py
	for md in $(CHAPTERS); do $(VENV)/bin/jupytext --update --to ipynb "$$md" -q; done
	$(PY) scripts/strip_outputs.py book
	$(PY) scripts/interview_bank.py

bench: venv
	$(PY) scripts/bench_notebooks.py

# Mutation testing of the core modules (mutmut, configured in pyproject.toml); slow, not part of CI.
# Mutation testing (issue #23; benchmarks/mutation.md): mutmut in a throwaway copy of HEAD under build/mutation,
# so mutants/ and half-mutated files never touch the working tree; one worker, nice 19, one thread, as the cores
# are shared. Verdicts stay in build/mutation/mutants: the next run tests only mutants of functions that changed
# and those not run yet. MUTANTS="ldm_tutorial.losses*" runs (again) the mutants named; MUTATION_FRESH=1 starts over.
mutation: venv
	$(PIP) install -q "mutmut==3.8.1"
	@git diff --quiet HEAD -- ldm_tutorial tests pyproject.toml || echo "note: uncommitted changes are not in the run: it mutates and tests HEAD"
	mkdir -p build/mutation
	if [ -n "$(MUTATION_FRESH)" ]; then rm -rf build/mutation/mutants; fi
	find build/mutation -mindepth 1 -maxdepth 1 ! -name mutants -exec rm -rf {} +
	git archive HEAD | tar -x -m -C build/mutation
	ln -s $(CURDIR)/$(VENV) build/mutation/.venv
	cat scripts/mutation_warmup.py >> build/mutation/tests/conftest.py
	start=$$(date +%s); (cd build/mutation && set -f && OMP_NUM_THREADS=1 nice -n 19 .venv/bin/mutmut run --max-children 1 $(MUTANTS)); \
	$(PY) scripts/mutation_report.py --dir build/mutation --seconds $$(( $$(date +%s) - start ))

clean:
	rm -rf _build _executed .pytest_cache mutants
