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
    # against the Hub's model pages: FLUX.1-dev (non-commercial licence) and SD3 Medium ask you to accept
    # their licence before downloading; FLUX.1-schnell (Apache-2.0) does not
    assert ldm.REGISTRY["flux1-dev"].gated and ldm.REGISTRY["sd3-medium"].gated
    assert not ldm.REGISTRY["flux1-schnell"].gated


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


# --- mutation-testing follow-ups (benchmarks/mutation.md)


class _FakeHubPipeline:
    """Stands in for a diffusers pipeline class: records what load_pipeline asks the Hub for."""

    calls: list = []
    error: Exception | None = None

    @classmethod
    def from_pretrained(cls, repo_id, **kwargs):
        cls.calls.append((cls.__name__, repo_id, kwargs))
        if cls.error is not None:
            raise cls.error
        return cls()

    def to(self, device):
        self.device = device
        return self

    def set_progress_bar_config(self, **kwargs):
        self.progress_bar = kwargs


class _FakeText2Img(_FakeHubPipeline):
    pass


class _FakeInpaint(_FakeHubPipeline):
    pass


@pytest.fixture
def fake_hub(monkeypatch):
    """The Hub "reachable" and diffusers' pipeline classes replaced by recorders (nothing is downloaded)."""
    _FakeHubPipeline.calls, _FakeHubPipeline.error = [], None
    monkeypatch.setattr(models, "hub_available", lambda *a, **k: True)
    monkeypatch.setattr(models, "_pipeline_class", lambda task: {"text2img": _FakeText2Img,
                                                                  "inpaint": _FakeInpaint}[task])
    return _FakeHubPipeline.calls


def test_a_hub_model_on_the_cpu_is_loaded_in_float32_without_the_fp16_variant(fake_hub, no_cuda, capsys):
    pipe = ldm.load_pipeline("sd15", device="cpu")
    expected = {**models.dtype_kwargs(torch.float32), "safety_checker": None, "requires_safety_checker": False}
    assert fake_hub == [("_FakeText2Img", "stable-diffusion-v1-5/stable-diffusion-v1-5", expected)]
    assert pipe.device == torch.device("cpu") and pipe.progress_bar == {"disable": True}
    assert pipe.ldm_source == "sd15 (stable-diffusion-v1-5/stable-diffusion-v1-5, float32)"
    assert capsys.readouterr().out == (
        "load_pipeline: warning: sd15 in float32 on CPU takes minutes per image; 'tiny' takes a second\n"
        "load_pipeline: sd15 (stable-diffusion-v1-5/stable-diffusion-v1-5, float32) (asked for by name)\n")


def test_a_hub_model_in_float16_asks_for_the_fp16_weight_files(fake_hub, no_cuda, capsys):
    ldm.load_pipeline("sd15-inpaint", task="inpaint", device="cpu", dtype=torch.float16, verbose=False)
    expected = {**models.dtype_kwargs(torch.float16), "safety_checker": None, "requires_safety_checker": False,
                "variant": "fp16"}
    assert fake_hub == [("_FakeInpaint", "stable-diffusion-v1-5/stable-diffusion-inpainting", expected)]
    assert "minutes per image" in capsys.readouterr().out             # still the CPU warning


def test_auto_takes_sd15_with_cuda_and_the_hub_and_says_why(fake_hub, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)       # no GPU is touched: the class is a fake
    pipe = ldm.load_pipeline(task="inpaint")
    assert pipe.device == torch.device("cuda")
    assert fake_hub[0][1] == "stable-diffusion-v1-5/stable-diffusion-inpainting"
    assert fake_hub[0][2] == {**models.dtype_kwargs(torch.float16), "safety_checker": None,
                              "requires_safety_checker": False, "variant": "fp16"}
    assert capsys.readouterr().out == ("load_pipeline: sd15-inpaint (stable-diffusion-v1-5/stable-diffusion-inpainting,"
                                       " float16) (CUDA and the Hub are available)\n")        # no CPU warning
    ldm.load_pipeline("sd15", device="cpu", verbose=False)                   # the asked-for device wins
    assert fake_hub[-1][2]["dtype" if "dtype" in fake_hub[-1][2] else "torch_dtype"] == torch.float32


@pytest.mark.parametrize("message, shown", [
    ("bad handshake\nsecond line", "bad handshake"),
    ("", ""),
    ("x" * 300, "x" * 200),
])
def test_a_failed_hub_download_shows_the_first_line_of_the_error(fake_hub, no_cuda, message, shown):
    _FakeHubPipeline.error = OSError(message)
    with pytest.raises(RuntimeError) as info:
        ldm.load_pipeline("sd15", device="cpu", verbose=False)
    assert str(info.value) == (
        "cannot load 'sd15' (stable-diffusion-v1-5/stable-diffusion-v1-5) from the Hub: huggingface.co accepted a "
        f"connection, but the download failed (OSError: {shown}). A proxy or firewall that breaks HTTPS does this. "
        "Use load_pipeline('tiny') to run offline.")
    assert info.value.__cause__ is _FakeHubPipeline.error


@pytest.mark.parametrize("name, task, message", [
    ("sd15", "inpaint", "'sd15' does not support task='inpaint' (it supports ('text2img', 'img2img')); "
                        "for inpaint use 'sd15-inpaint' or 'tiny'"),
    ("sd15-inpaint", "img2img", "'sd15-inpaint' does not support task='img2img' (it supports ('inpaint',)); "
                                "for img2img use 'sd15' or 'tiny'"),
    ("sdxl-base", "text2img", "load_pipeline loads SD 1.5-style pipelines; for 'sdxl-base' use diffusers' "
                              "DiffusionPipeline.from_pretrained('stabilityai/stable-diffusion-xl-base-1.0') directly"),
])
def test_hub_models_it_cannot_load_are_refused_before_any_download(fake_hub, no_cuda, name, task, message):
    with pytest.raises(ValueError) as info:
        ldm.load_pipeline(name, task=task, device="cpu", verbose=False)
    assert str(info.value) == message and fake_hub == []


def test_offline_hub_model_error_names_the_model_and_the_reason(offline, no_cuda):
    with pytest.raises(RuntimeError) as info:
        ldm.load_pipeline("sd15", device="cpu")
    assert str(info.value) == ("cannot load 'sd15' (stable-diffusion-v1-5/stable-diffusion-v1-5): the Hub is offline "
                               "(HF_HUB_OFFLINE=1). Use load_pipeline('tiny') to run offline.")


def test_auto_choice_gives_its_reasons(monkeypatch):
    monkeypatch.setattr(models, "hub_reason", lambda *a, **k: "offline (test)")
    monkeypatch.setattr(models, "hub_available", lambda *a, **k: False)
    assert models._auto_choice("text2img", torch.device("cpu")) == ("tiny", "offline (test); no CUDA")
    assert models._auto_choice("text2img", torch.device("cuda")) == ("tiny", "offline (test)")
    monkeypatch.setattr(models, "hub_available", lambda *a, **k: True)
    assert models._auto_choice("img2img", torch.device("cpu")) == ("tiny", "no CUDA")
    assert models._auto_choice("img2img", torch.device("cuda")) == ("sd15", "CUDA and the Hub are available")


def test_load_pipeline_defaults_to_auto_text2img_and_says_what_it_loaded(offline, no_cuda, capsys):
    from diffusers import StableDiffusionPipeline

    pipe = ldm.load_pipeline()
    assert type(pipe) is StableDiffusionPipeline and pipe.ldm_source == "TinySD"
    assert capsys.readouterr().out == "load_pipeline: TinySD (offline (HF_HUB_OFFLINE=1); no CUDA)\n"
    ldm.load_pipeline("tinysd")
    assert capsys.readouterr().out == "load_pipeline: TinySD (asked for by name)\n"


def test_each_task_gets_its_pipeline_class_and_unet(no_cuda):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    img2img = ldm.load_pipeline("tiny", task="img2img", verbose=False)
    assert type(img2img) is StableDiffusionImg2ImgPipeline and img2img.unet.config.in_channels == 4
    with pytest.warns(UserWarning, match="float16"):
        inpaint = ldm.load_pipeline("tiny", task="inpaint", dtype="float16", verbose=False)
    assert type(inpaint) is StableDiffusionInpaintPipeline
    assert inpaint.unet.config.in_channels == 9                     # image latents 4 + mask 1 + masked latents 4
    assert inpaint.unet.dtype == torch.float16 and inpaint.vae.dtype == torch.float16


def test_tiny_in_float32_warns_nothing_and_shows_no_progress_bar(no_cuda, capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = ldm.load_pipeline("tiny", device="cpu", verbose=False)
    assert not [w for w in caught if "load_pipeline" in str(w.message)]
    capfd.readouterr()
    pipe("a red cross", num_inference_steps=2, output_type="latent")
    err = capfd.readouterr().err
    assert "it/s]" not in err and "%|" not in err                   # tqdm draws neither


def test_missing_tinysd_weights_say_to_reinstall(monkeypatch):
    from ldm_tutorial import tinysd

    monkeypatch.setattr(tinysd, "pipeline_dir", lambda task="text2img": None)
    with pytest.raises(FileNotFoundError) as info:
        ldm.load_pipeline("tiny", verbose=False)
    assert str(info.value) == (f"TinySD's weights are missing from {tinysd.WEIGHTS_DIR}: the package install is "
                               f"incomplete; reinstall ldm_tutorial (they ship inside it)")


def test_the_torchvision_notice_filter_is_added_once_and_drops_only_that_notice(monkeypatch):
    import logging

    log = logging.getLogger("transformers.utils.import_utils")
    monkeypatch.setattr(log, "filters", [logging.Filter("someone.else")])
    models._quiet_torchvision_fallback()
    models._quiet_torchvision_fallback()
    ours = [f for f in log.filters if getattr(f, "_ldm_torchvision", False)]
    assert len(ours) == 1 and len(log.filters) == 2

    def record(msg):
        return logging.LogRecord(log.name, logging.WARNING, __file__, 1, msg, None, None)

    notice = "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
    assert ours[0].filter(record(notice)) is False
    assert ours[0].filter(record("some other warning")) is True


def test_the_half_precision_warning_points_at_the_caller_not_at_the_package(no_cuda):
    from pathlib import Path

    with pytest.warns(UserWarning, match="load_pipeline: dtype=bfloat16 on the CPU runs") as record:
        ldm.load_pipeline("tiny", dtype=torch.bfloat16, device="cpu", verbose=False)
    ours = [w for w in record if str(w.message).startswith("load_pipeline:")]
    assert len(ours) == 1 and ours[0].category is UserWarning
    assert not ours[0].filename.startswith(str(Path(models.__file__).parent))    # attributed to the caller
