#!/usr/bin/env bash
# One prepared TinySD training run on a lent GPU (device tool). Weights come back through $OUT.
# Usage (on the device machine, repo root): bash scripts/gpu_train_tinysd.sh "clip=45,vae=150,..." 500
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
# import the tinysd subpackage without the top-level package's notebook helpers
timeout "${2:-500}" python3 -c "
import os, sys, types
m = types.ModuleType('ldm_tutorial'); m.__path__ = [os.path.abspath('ldm_tutorial')]; sys.modules['ldm_tutorial'] = m
from ldm_tutorial.tinysd.train import main
main(['all', '--seconds-per-stage', '${1}', '--n-scenes', '${3:-50000}', '--out', '/tmp/w', '--ckpt-dir', '/tmp/ck', '--ckpt-every', '100000'])
" 2>&1 | grep -v 'it/s\]$' | tr '\r' '\n' | grep -v '^\s*$' | tail -n 200
echo "exit: ${PIPESTATUS[0]}"
ls -la /tmp/w /tmp/w/* 2>/dev/null | head -60
cp /tmp/w/training_log.json "$OUT/" 2>/dev/null
tar -C /tmp -cf - w | split -b 15M - "$OUT/weights.tar."
ls -la "$OUT"
