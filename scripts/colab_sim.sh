#!/usr/bin/env bash
# The Colab path, simulated: a reader on Colab gets the package from the chapter's own `%pip` line,
# never from this checkout. This script
#   1. builds the wheel from the working tree (the weights ship inside it);
#   2. makes a fresh virtual environment outside the repository with what Colab already has
#      (torch, ipykernel, nbclient) and nothing of ours;
#   3. copies chapter 0's notebook alone into an empty temporary folder and executes it there,
#      with a stand-in `google.colab` module so the setup cell takes its Colab branch, and
#      LDM_TUTORIAL_PACKAGE pointing its `%pip install` at the wheel (offline, the git URL is out
#      of reach);
#   4. checks that the package and TinySD's weights were loaded from the fresh environment.
# Usage: scripts/colab_sim.sh [CHAPTER.ipynb]   (make colab-check)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
NB="${1:-$ROOT/book/00_pipeline/pipeline_at_a_glance.ipynb}"
TORCH="${TORCH:-torch==2.13.0}"
WORK="$(mktemp -d /tmp/colab-sim.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
echo "[colab-sim] working in $WORK"

# 1. The wheel.
"$ROOT/.venv/bin/python" -m pip wheel -q --no-deps -w "$WORK/dist" "$ROOT"
WHEEL="$(ls "$WORK"/dist/ldm_tutorial-*.whl)"
echo "[colab-sim] wheel: $(basename "$WHEEL") ($(du -m "$WHEEL" | cut -f1) MB)"

# 2. A fresh environment with Colab's preinstalled basics only.
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "$TORCH"
"$WORK/venv/bin/pip" install -q ipykernel nbclient
if "$WORK/venv/bin/python" -c "import ldm_tutorial" 2>/dev/null; then
  echo "[colab-sim] ldm_tutorial is importable before the setup cell ran"; exit 1
fi

# 3. The notebook alone, in an empty folder, with a stand-in google.colab.
mkdir -p "$WORK/run" "$WORK/fake/google/colab"
: > "$WORK/fake/google/__init__.py"
echo '"""Stand-in for Colab: its presence in sys.modules is what the setup cell checks."""' \
  > "$WORK/fake/google/colab/__init__.py"
echo 'import google.colab  # noqa: F401' > "$WORK/fake/sitecustomize.py"
cp "$NB" "$WORK/run/chapter.ipynb"
cd "$WORK/run"
env -u VIRTUAL_ENV PATH="$WORK/venv/bin:$PATH" PYTHONPATH="$WORK/fake" HF_HUB_OFFLINE=1 \
  LDM_TUTORIAL_PACKAGE="$WHEEL" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" \
  "$WORK/venv/bin/jupyter-execute" --timeout=600 --output=executed.ipynb chapter.ipynb

# 4. Where everything came from.
"$WORK/venv/bin/python" - "$WORK" "$ROOT" <<'EOF'
import json, sys
from pathlib import Path
work, root = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
import ldm_tutorial
from ldm_tutorial import tinysd
pkg, weights = Path(ldm_tutorial.__file__).resolve(), Path(tinysd.WEIGHTS_DIR).resolve()
assert work / "venv" in pkg.parents, f"ldm_tutorial came from {pkg}, not the fresh environment"
assert work / "venv" in weights.parents, f"TinySD's weights came from {weights}"
assert root not in pkg.parents and root not in weights.parents
nb = json.loads((work / "run" / "executed.ipynb").read_text())
outs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
assert not [o for o in outs if o.get("output_type") == "error"], "a cell raised"
text = "".join("".join(o.get("text", "")) for o in outs)
assert "TinySD" in text, "the chapter did not say it loaded TinySD"
print(f"[colab-sim] ok: {len(nb['cells'])} cells ran; package and weights from {work / 'venv'}")
EOF
echo "[colab-sim] done in ${SECONDS} s"
