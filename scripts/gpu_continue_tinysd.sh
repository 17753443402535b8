#!/usr/bin/env bash
# Continue the shipped TinySD on a lent GPU (device tool): three processes side by side on one GPU.
#   1. the VAE's decoder fine-tuned with the LDM recipe (L1 + perceptual + PatchGAN), encoder frozen,
#      then the preview decoder (TAESD) continued against it;
#   2. the same with the sd-vae-ft-mse loss (MSE + 0.1 perceptual, no GAN);
#   3. the text U-Net continued (cosine decay to zero), then the inpainting U-Net continued likewise.
# The encoder stays frozen, so the latent space and its scaling factor do not move: the U-Nets of
# process 3 stay valid with either decoder, and the better decoder is chosen afterwards (on the CPU).
# Usage (device machine, repo root):
#   bash scripts/gpu_continue_tinysd.sh VAE_S TAESD_S UNET_S INPAINT_S [TIMEOUT_S]
# e.g. (the shipped run, on an H200) N_SCENES_VAE=12000 N_SCENES_UNET=50000 bash scripts/gpu_continue_tinysd.sh 260 60 180 140 480
# Results come back through $OUT as weights.tar.* (w1/ w2/ w3/ trees) and log.txt.
# Off the device machine (a CPU dry run) set OUT, SKIP_PIP=1 and small N_SCENES_VAE / N_SCENES_UNET.
source "$(dirname "$0")/gpu_env.sh"
T=${5:-470}
NV=${N_SCENES_VAE:-20000}
NU=${N_SCENES_UNET:-60000}
R=/tmp/cont && rm -rf $R && mkdir -p $R
for w in w1 w2 w3; do
  mkdir -p $R/$w && cp -r ldm_tutorial/tinysd/weights/tinysd ldm_tutorial/tinysd/weights/tinysd-inpaint \
    ldm_tutorial/tinysd/weights/tinysd-taesd ldm_tutorial/tinysd/weights/training_log.json $R/$w/
done
train() {  # $1: out folder, rest: arguments of `python -m ldm_tutorial.tinysd.train`
  local w=$1; shift
  train_py "$T" "$@" --out "$w" --ckpt-dir "$w-ck" --ckpt-every 100000 2>&1 | tr '\r' '\n' | grep -v 'it/s\]$' | grep -v '^\s*$' > $w.log
  echo "exit $w: ${PIPESTATUS[0]}" >> $w.log
}
train $R/w1 all --seconds-per-stage "vae=$1,taesd=$2" --batch-per-stage vae=64,taesd=64 --continue-shipped \
  --n-scenes $NV &
train $R/w2 all --seconds-per-stage "vae=$1,taesd=$2" --batch-per-stage vae=64,taesd=64 --continue-shipped \
  --vae-loss ft-mse --n-scenes $NV &
train $R/w3 all --seconds-per-stage "unet=$3,inpaint=$4" --batch-per-stage unet=512,inpaint=256 --continue-shipped \
  --cosine --n-scenes $NU &
wait
for w in w1 w2 w3; do echo "=== $w"; cat $R/$w.log; done | tee "$OUT/log.txt" | tail -n 150
(cd $R && tar -cf - w1/tinysd/vae w1/tinysd-taesd w1/training_log.json w2/tinysd/vae w2/tinysd-taesd \
  w2/training_log.json w3/tinysd/unet w3/tinysd-inpaint w3/training_log.json) | split -b 15M - "$OUT/weights.tar."
ls -la "$OUT"
