"""The transparent loop in ldm_tutorial.sampling must do exactly what the diffusers pipeline does."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline

import ldm_tutorial as ldm
from ldm_tutorial.sampling import sample


@pytest.fixture(scope="module")
def pipe():
    return ldm.load_pipeline("tiny", verbose=False)


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_loop_matches_pipeline(pipe, guidance_scale):
    prompt, steps = "a small red circle on the left", 8
    ours = sample(pipe, prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                  generator=torch.Generator().manual_seed(3))
    ref = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
               generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert ours.latents.shape == ref.shape == (1, 4, 16, 16)
    assert (ours.latents - ref).abs().max().item() <= 1e-4
    ref_img = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                   generator=torch.Generator().manual_seed(3), output_type="pt").images   # [0, 1]
    assert ((ours.images + 1) / 2 - ref_img).abs().max().item() <= 1e-4


def test_guidance_changes_the_result(pipe):
    a = sample(pipe, "a blue square", num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    b = sample(pipe, "a blue square", num_inference_steps=4, guidance_scale=7.0, generator=torch.Generator().manual_seed(0))
    assert (a.latents - b.latents).abs().mean() > 1e-3


def test_trajectory_and_bad_inputs(pipe):
    out = sample(pipe, ["a red cross", "a green circle"], num_inference_steps=3, keep_trajectory=True,
                 generator=torch.Generator().manual_seed(0))
    assert len(out.trajectory) == 3 and out.images.shape == (2, 3, 128, 128) and len(out.to_pil()) == 2
    with pytest.raises(ValueError, match="height"):
        sample(pipe, "a red cross", height=100)
    with pytest.raises(ValueError, match="negative_prompt"):
        sample(pipe, ["a", "b"], negative_prompt=["x"])
    with pytest.raises(ValueError, match="latents"):
        sample(pipe, "a red cross", latents=torch.zeros(1, 4, 8, 8))


def test_flux_sigmas_make_every_flow_step_a_real_step(pipe):
    assert ldm.flux_sigmas(4) == pytest.approx([1.0, 0.75, 0.5, 0.25])
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(4)
    assert float(sched.sigmas[-2]) == pytest.approx(1e-3)          # the scheduler's own last step: 0.001 -> 0
    flow_pipe = StableDiffusionPipeline(**{**pipe.components, "scheduler": sched}, requires_safety_checker=False)
    out = sample(flow_pipe, "a red cross", num_inference_steps=4, guidance_scale=1.0, sigmas=ldm.flux_sigmas(4),
                 generator=torch.Generator().manual_seed(0))
    assert out.timesteps == pytest.approx([1000.0, 750.0, 500.0, 250.0])
    with pytest.raises(ValueError, match="num_inference_steps=3"):
        sample(flow_pipe, "a red cross", num_inference_steps=3, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="flow-matching"):
        sample(pipe, "a red cross", num_inference_steps=2, sigmas=[1.0, 0.5])       # DDIM takes no sigmas
    with pytest.raises(ValueError, match="num_inference_steps"):
        ldm.flux_sigmas(0)
