import numpy as np
import pytest
import torch

import ldm_tutorial as ldm
from ldm_tutorial import runtime


def test_pick_device_defaults_to_cpu_without_gpu(no_cuda):
    assert ldm.pick_device() == torch.device("cpu")


def test_prefer_cuda_without_gpu_raises_naming_parameter(no_cuda):
    with pytest.raises(ValueError, match="prefer"):
        ldm.pick_device("cuda")


def test_fp16_on_cpu_raises_naming_dtype():
    with pytest.raises(ValueError, match=r"dtype=float16 .*CPU.*float32"):
        ldm.pick_dtype("cpu", torch.float16)
    with pytest.raises(ValueError, match="dtype="):
        ldm.pick_dtype("cpu", "float16")


def test_cpu_dtype_is_float32():
    assert ldm.pick_dtype("cpu") == torch.float32
    assert ldm.pick_dtype(torch.device("cpu"), "float32") == torch.float32


def test_seeding_twice_repeats_draws():
    g1 = ldm.seed_everything(123)
    a = (torch.randn(5), np.random.rand(5), torch.randn(5, generator=g1))
    g2 = ldm.seed_everything(123)
    b = (torch.randn(5), np.random.rand(5), torch.randn(5, generator=g2))
    torch.testing.assert_close(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    torch.testing.assert_close(a[2], b[2])
    ldm.seed_everything(124)
    assert not torch.equal(torch.randn(5), a[0])


def test_hub_offline_env_short_circuits(offline, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("hub_available must not touch the network when HF_HUB_OFFLINE=1")

    monkeypatch.setattr(runtime, "_probe", no_network)
    assert ldm.hub_available() is False
    info = ldm.describe_runtime()
    assert info.hub is False
    assert "hub=offline (HF_HUB_OFFLINE=1) -> TinySD" in str(info)
    assert str(info).startswith("device=cpu dtype=float32") or info.device.type == "cuda"


def test_transformers_offline_also_counts(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(runtime, "_probe", lambda *a: True)
    assert ldm.hub_available() is False
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    assert ldm.hub_available() is True


def test_auto_picks_tiny_offline_and_says_why(offline, no_cuda, capsys):
    pipe = ldm.load_pipeline("auto")
    out = capsys.readouterr().out
    assert out.startswith("load_pipeline: ")
    assert "HF_HUB_OFFLINE=1" in out and "no CUDA" in out
    assert "TinySD" in out
    assert pipe.device.type == "cpu"


def test_auto_picks_hub_model_with_cuda_and_hub(monkeypatch):
    from ldm_tutorial import models

    monkeypatch.setattr(models, "hub_available", lambda *a: True)
    key, reason = models._auto_choice("inpaint", torch.device("cuda"))
    assert key == "sd15-inpaint" and "CUDA" in reason
    key, _ = models._auto_choice("text2img", torch.device("cuda"))
    assert key == "sd15"
