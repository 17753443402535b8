import re
import warnings

import pytest
import torch
from PIL import Image

import ldm_tutorial as ldm
from ldm_tutorial import models

DEAD_IDS = {"runwayml/stable-diffusion-v1-5", "runwayml/stable-diffusion-inpainting",
            "stabilityai/stable-diffusion-2-1", "stabilityai/stable-diffusion-2-1-base",
            "stabilityai/stable-diffusion-2-inpainting", "CompVis/stable-diffusion-v1-4"}


def test_registry_ids_are_well_formed_and_alive():
    pattern = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
    for key, spec in ldm.REGISTRY.items():
        assert spec.key == key
        assert set(spec.tasks) <= set(ldm.TASKS) | {"vae"}, key
        if spec.repo_id is None:
            assert key == "tiny" or spec.note, f"{key}: a missing repo_id needs a reason in note"
            continue
        assert pattern.match(spec.repo_id), spec.repo_id
        assert spec.repo_id not in DEAD_IDS, f"{key} uses deleted repository {spec.repo_id}"


def test_registry_flags_gated_models():
    assert ldm.REGISTRY["flux1-dev"].gated and ldm.REGISTRY["sd3-medium"].gated
    assert not ldm.REGISTRY["flux1-schnell"].gated
    assert ldm.REGISTRY["sd15"].repo_id == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_named_hub_model_offline_raises_clear_error(offline):
    with pytest.raises(RuntimeError, match=r"HF_HUB_OFFLINE=1.*'tiny'"):
        ldm.load_pipeline("sd15")


def test_bad_task_raises_naming_task():
    with pytest.raises(ValueError, match=r"task must be one of .*text2img"):
        ldm.load_pipeline("tiny", task="txt2img")


def test_unknown_name_raises():
    with pytest.raises(ValueError, match="name must be"):
        ldm.load_pipeline("sd-15")


def test_fp16_tiny_on_cpu_runs_and_says_what_it_costs(no_cuda, capfd):
    with pytest.warns(UserWarning, match=r"dtype=float16 on the CPU runs, but it is rarely faster"):
        pipe = ldm.load_pipeline("tiny", dtype=torch.float16, device="cpu", verbose=False)
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float16
    out = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    ref = ldm.load_pipeline("tiny", device="cpu", verbose=False)(
        "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max().item() < 0.05           # same picture, half-precision rounding
    assert "cannot run with" not in capfd.readouterr().err        # diffusers' false warning is not shown


@pytest.mark.parametrize("bad", [None, 15, ["sd15"]])
def test_name_must_be_a_string(bad):
    with pytest.raises(ValueError, match="name must be 'auto', 'tiny' or one of"):
        ldm.load_pipeline(bad)


def test_hub_failure_after_the_probe_is_one_clear_error(monkeypatch, no_cuda):
    """The probe passes but HTTPS breaks (a proxy that accepts connections and answers garbage):
    the reader gets one readable error that names the model and the offline route, not diffusers' page."""
    import socket
    import threading

    import huggingface_hub.constants as hub_constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]

    def answer_garbage():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.0 200 OK but not TLS\r\n\r\n")
                except OSError:
                    pass

    threading.Thread(target=answer_garbage, daemon=True).start()
    endpoint = f"https://127.0.0.1:{port}"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(models, "hub_available", lambda *a, **k: True)      # the probe "passed"
    try:
        with pytest.raises(RuntimeError) as info:
            ldm.load_pipeline("sd15", device="cpu", verbose=False)
    finally:
        server.close()
    message = str(info.value)
    assert "cannot load 'sd15' (stable-diffusion-v1-5/stable-diffusion-v1-5) from the Hub" in message
    assert "download failed (OSError: " in message and "load_pipeline('tiny') to run offline" in message
    assert len(message) < 700 and isinstance(info.value.__cause__, OSError)
