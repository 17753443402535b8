"""TinySD training under `accelerate launch`: two CPU processes (gloo) at batch b equal one process
at batch 2b (chapter 8, section 5)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm_tutorial.tinysd import WEIGHTS_DIR

STEPS, BATCH = 3, 4
COMMON = ["unet", "--continue-shipped", "--steps", str(STEPS), "--n-scenes", "64", "--threads", "1",
          "--ckpt-every", "1e9", "--warmup", "1", "--lr", "1e-4", "--device", "cpu"]


def _weights_copy(root: Path) -> Path:
    out = root / "weights"
    shutil.copytree(WEIGHTS_DIR, out, ignore=shutil.ignore_patterns("vae-lab", "tinysd-scaling", "tinysd-conditioning",
                                                                    "tinysd-flow", "tinysd-inpaint"))
    return out


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_two_processes_at_batch_b_equal_one_process_at_batch_2b(tmp_path):
    cache = tmp_path / "latents.pt"
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
    w1, w2 = _weights_copy(one), _weights_copy(two)
    _run([sys.executable, "-m", "ldm_tutorial.tinysd.train", *COMMON, "--batch", str(2 * BATCH),
          "--out", str(w1), "--ckpt-dir", str(one / "ck"), "--latents-cache", str(cache)], tmp_path)
    # --multi_gpu launches N processes through torch.distributed.run; --device cpu makes each
    # one a CPU process, and the Accelerator then all-reduces over gloo (`--cpu` alone runs one)
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          "-m", "ldm_tutorial.tinysd.train", *COMMON,
          "--batch", str(BATCH), "--out", str(w2), "--ckpt-dir", str(two / "ck"),
          "--latents-cache", str(cache)], tmp_path)
    a = torch.load(one / "ck" / "unet.pt", map_location="cpu", weights_only=False)
    b = torch.load(two / "ck" / "unet.pt", map_location="cpu", weights_only=False)
    assert a["step"] == b["step"] == STEPS
    from diffusers import UNet2DConditionModel

    shipped = UNet2DConditionModel.from_pretrained(WEIGHTS_DIR / "tinysd" / "unet").state_dict()
    moved = max(float((a["model"][k] - shipped[k].float()).abs().max()) for k in a["model"])
    # float32 gradients all-reduced across processes are summed in another order than one
    # process's batch mean: the two agree to 1e-5, while training moved the weights far more
    gap = max(float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"])
    print(f"largest weight change {moved:.2e}; largest gap between the runs {gap:.2e}")
    assert moved > 100 * max(gap, 1e-7)
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-5, rtol=1e-4, msg=k)
