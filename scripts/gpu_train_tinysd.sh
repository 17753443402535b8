#!/usr/bin/env bash
# One prepared TinySD training run on a lent GPU (device tool). Weights come back through $OUT.
# Usage (device machine, repo root):
#   bash scripts/gpu_train_tinysd.sh "vae=180,unet=220,inpaint=60,taesd=20" 540 50000 "vae=64,unet=512"
# Stages not named keep the shipped weights (copied to /tmp/w first), so e.g. the tiny CLIP is reused.
# The DDPM-vs-flow comparison (SD-versions chapter) trains the flow U-Net with the shipped U-Net's budget:
#   bash scripts/gpu_train_tinysd.sh "flow=230" 330 40000 "flow=512"
# Plan about 80 s of setup (render, pre-encode, caption bank, exports) on top of the stage seconds.
# Off the device machine (a CPU dry run) set OUT and SKIP_PIP=1.
source "$(dirname "$0")/gpu_env.sh"
W=${W:-/tmp/w}
rm -rf "$W" && mkdir -p "$W" && cp -r ldm_tutorial/tinysd/weights/tinyclip ldm_tutorial/tinysd/weights/tinysd \
  ldm_tutorial/tinysd/weights/training_log.json "$W"/
train_py "${2:-500}" all --seconds-per-stage "$1" --n-scenes "${3:-50000}" --batch-per-stage "${4:-}" \
  --out "$W" --ckpt-dir "$W-ck" --ckpt-every 100000 2>&1 | grep -v 'it/s\]$' | tr '\r' '\n' | grep -v '^\s*$' | tail -n 200
echo "exit: ${PIPESTATUS[0]}"
ls -la "$W" "$W"/* 2>/dev/null | head -60
cp "$W"/training_log.json "$OUT/" 2>/dev/null
(cd "$W" && tar -cf - --exclude=tinyclip .) | split -b 15M - "$OUT/weights.tar."
ls -la "$OUT"
