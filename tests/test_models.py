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


def test_fp16_tiny_on_cpu_raises(no_cuda):
    with pytest.raises(ValueError, match="dtype=float16"):
        ldm.load_pipeline("tiny", dtype=torch.float16, device="cpu")


@pytest.fixture(scope="module")
def tiny_pipe():
    return ldm.load_pipeline("tiny", device="cpu", verbose=False)


def test_tiny_text2img_two_steps_no_warnings(tiny_pipe, capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = tiny_pipe("a red circle", num_inference_steps=2, height=64, width=64,
                        generator=torch.Generator().manual_seed(0))
    image = out.images[0]
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    captured = capfd.readouterr()
    assert "warn" not in (captured.err + captured.out).lower()


def test_tiny_pipeline_is_deterministic(tiny_pipe):
    def run():
        return tiny_pipe("a blue square", num_inference_steps=2, height=32, width=32, output_type="pt",
                         generator=torch.Generator().manual_seed(1)).images

    torch.testing.assert_close(run(), run())


def test_tiny_source_is_named(tiny_pipe):
    assert tiny_pipe.ldm_source == "TinySD"


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_tiny_other_tasks_load(task, capfd):
    pipe = ldm.load_pipeline("tiny", task=task, device="cpu")
    assert type(pipe).__name__ == {"img2img": "StableDiffusionImg2ImgPipeline",
                                   "inpaint": "StableDiffusionInpaintPipeline"}[task]
    # inpainting needs the U-Net that also sees the mask and the masked image: 4 + 1 + 4 channels
    assert pipe.unet.config.in_channels == {"img2img": 4, "inpaint": 9}[task]
    assert "warn" not in capfd.readouterr().err.lower()
