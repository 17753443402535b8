# Shared set-up of the GPU scripts (sourced, not run): the results folder, the carried wheels, offline
# Hugging Face libraries, the Python to use, and `train_py TIMEOUT ARGS...`, which runs
# `python -m ldm_tutorial.tinysd.train ARGS...` under `timeout` without the package's notebook helpers.
# Off the device machine (a CPU dry run) set OUT and SKIP_PIP=1.
set -u
OUT=${OUT:?set OUT to a folder for the results}
if [ -z "${SKIP_PIP:-}" ]; then
  # the wheels in .whl/ (carried): diffusers is missing on the device image; its own transformers loads
  # the shipped CLIP folders
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
nvidia-smi -L 2>/dev/null
$PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

train_py() {  # TIMEOUT ARGS...: the training CLI, importing the tinysd subpackage alone
  local limit=$1; shift
  timeout "$limit" $PY -c "
import os, sys, types
m = types.ModuleType('ldm_tutorial'); m.__path__ = [os.path.abspath('ldm_tutorial')]; sys.modules['ldm_tutorial'] = m
from ldm_tutorial.tinysd.train import main
main(sys.argv[1:])
" "$@"
}
