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


def test_half_precision_on_cpu_is_allowed_and_its_cost_is_said():
    # float16 and bfloat16 run on the CPU (measured in benchmarks/cpu_half.md): returned when asked for,
    # with a note that says what they cost instead of a false "not supported".
    assert ldm.pick_dtype("cpu", torch.float16) == torch.float16
    assert ldm.pick_dtype("cpu", "bfloat16") == torch.bfloat16
    note = runtime.cpu_half_note(torch.float16)
    assert "dtype=float16 on the CPU runs" in note and "float32 is the CPU default" in note
    assert runtime.cpu_half_note(torch.float32) is None


@pytest.mark.parametrize("bad", ["float64", "int8", "fp16", torch.int32, torch.float64])
def test_unknown_dtype_raises_naming_dtype(bad):
    with pytest.raises(ValueError, match=r"dtype must be float32, float16 or bfloat16, got"):
        ldm.pick_dtype("cpu", bad)


@pytest.mark.parametrize("bad", ["tpu", "gpu", "mps", "cuda0", 3.5])
def test_unknown_device_raises_value_error_naming_prefer(bad):
    # torch.device("tpu") raises torch's RuntimeError; the documented error is a ValueError
    with pytest.raises(ValueError, match=r"prefer must be None, 'cuda' .* or 'cpu', got"):
        ldm.pick_device(bad)


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


def test_seed_everything_seeds_python_random_too():
    import random

    ldm.seed_everything(7)
    a = [random.random() for _ in range(3)]
    ldm.seed_everything(7)
    assert [random.random() for _ in range(3)] == a
    ldm.seed_everything(8)
    assert [random.random() for _ in range(3)] != a


def test_hub_probe_bounds_a_slow_resolver(monkeypatch):
    """A resolver that takes 8 s must not hold the probe for 8 s: the deadline covers DNS too."""
    import socket
    import threading
    import time

    release = threading.Event()

    def slow_getaddrinfo(*args, **kwargs):
        release.wait(8.0)                        # a stalled resolver (released at the end of the test)
        raise socket.gaierror("temporary failure in name resolution")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    monkeypatch.setattr(runtime, "_PROBES", {})
    try:
        start = time.perf_counter()
        assert ldm.hub_available(timeout=0.5) is False
        elapsed = time.perf_counter() - start
        assert elapsed < 2.0, f"the probe waited {elapsed:.1f} s for the resolver"
        start = time.perf_counter()
        assert ldm.hub_available(timeout=0.5) is False                # cached: no second wait
        assert time.perf_counter() - start < 0.1
    finally:
        release.set()


def test_hub_probe_true_when_the_port_answers(monkeypatch):
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    real = socket.create_connection
    monkeypatch.setattr(runtime.socket, "create_connection",
                        lambda addr, timeout=None: real(("127.0.0.1", port), timeout=timeout))
    monkeypatch.setattr(runtime, "_PROBES", {})
    try:
        assert runtime._probe("huggingface.co", 1.0) is True
    finally:
        server.close()
    monkeypatch.setattr(runtime, "_PROBES", {})
    assert runtime._probe("huggingface.co", 1.0) is False                # nothing listens any more


@pytest.mark.parametrize("bad", [0, -1, 6, 30.0, "2", True])
def test_hub_timeout_is_checked(bad):
    with pytest.raises(ValueError, match=r"timeout must be a number of seconds in \(0, 5\]"):
        ldm.hub_available(timeout=bad)


# ----------------------------------------------------------------------------- GPU paths, simulated
@pytest.mark.parametrize("prefer", ["cuda", "cuda:1"])
def test_cuda_is_returned_when_a_gpu_is_visible(monkeypatch, prefer):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ldm.pick_device(prefer) == torch.device(prefer)


def test_cuda_without_gpu_says_what_to_use_instead(no_cuda):
    with pytest.raises(ValueError) as info:
        ldm.pick_device("cuda:0")
    assert str(info.value) == "prefer='cuda' but no CUDA GPU is visible; use prefer=None or prefer='cpu'"


@pytest.mark.parametrize("bf16", [True, False])
def test_gpu_dtypes_and_bfloat16_only_where_supported(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert ldm.pick_dtype("cuda") == torch.float16                      # half by default on a GPU
    assert ldm.pick_dtype("cuda", torch.float32) == torch.float32
    assert ldm.pick_dtype("cuda", "float16") == torch.float16          # needs no bfloat16 support
    if bf16:
        assert ldm.pick_dtype("cuda:0", torch.bfloat16) == torch.bfloat16
    else:
        with pytest.raises(ValueError) as info:
            ldm.pick_dtype("cuda", "bfloat16")
        assert str(info.value) == "dtype=bfloat16 is not supported on this GPU; use float16"


def test_hub_checks_wait_two_seconds_by_default(monkeypatch):
    """The documented default: a chapter's first cell waits at most 2 s for huggingface.co."""
    waits = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(runtime, "_PROBES", {})
    monkeypatch.setattr(runtime, "_connect", lambda host, timeout: waits.append(timeout) or False)
    assert ldm.hub_available() is False and waits == [2.0]
    monkeypatch.setattr(runtime, "_PROBES", {})
    assert runtime.hub_reason() == "offline (huggingface.co unreachable)" and waits == [2.0, 2.0]
    monkeypatch.setattr(runtime, "_PROBES", {})
    runtime.describe_runtime()
    assert waits == [2.0] * 3                  # one probe, cached for describe_runtime's second ask


def test_older_diffusers_gets_the_torch_dtype_keyword(monkeypatch):
    """diffusers before 0.36 has no `_resolve_dtype` and only reads `torch_dtype`."""
    import inspect

    from diffusers import DiffusionPipeline
    from diffusers.utils import deprecation_utils

    assert runtime.dtype_kwargs(torch.float16) == {"dtype": torch.float16}
    monkeypatch.delattr(deprecation_utils, "_resolve_dtype")
    kwargs = runtime.dtype_kwargs(torch.float16)
    assert kwargs == {"torch_dtype": torch.float16}
    assert '"torch_dtype"' in inspect.getsource(DiffusionPipeline.from_pretrained)   # the name it reads
