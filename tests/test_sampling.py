"""The transparent loop in ldm_tutorial.sampling must do exactly what the diffusers pipeline does."""

import warnings

import numpy as np
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


# --- mutation-testing follow-ups (benchmarks/mutation.md)


def test_to_pil_maps_minus_one_to_one_onto_0_to_255_channel_by_channel():
    from ldm_tutorial.sampling import SampleOutput

    images = torch.full((2, 3, 4, 5), -1.0)
    images[0, 0] = 1.0                                   # image 0: pure red
    images[1, 2, 1, 3] = 0.0                             # image 1: one mid-blue pixel at row 1, column 3
    images[1, 1, 0, 0] = 3.0                             # out of range: clamped to 255
    images[1, 0, 0, 1] = -3.0                            # out of range: clamped to 0
    pil = SampleOutput(images=images, latents=torch.zeros(2, 4, 1, 1), timesteps=[]).to_pil()
    assert [p.size for p in pil] == [(5, 4), (5, 4)] and [p.mode for p in pil] == ["RGB", "RGB"]
    assert (np.asarray(pil[0]) == [255, 0, 0]).all()
    assert pil[1].getpixel((3, 1)) == (0, 0, 128)        # (0 + 1) * 127.5 = 127.5 rounds to 128
    assert pil[1].getpixel((0, 0)) == (0, 255, 0) and pil[1].getpixel((1, 0)) == (0, 0, 0)
    levels = list(range(0, 256, 17))                     # 0, 17, ..., 255: the pixel each value stands for
    ramp = (torch.tensor(levels) / 127.5 - 1).view(1, 1, 1, -1).expand(1, 3, 1, len(levels))
    got = np.asarray(SampleOutput(images=ramp, latents=ramp, timesteps=[]).to_pil()[0])[0, :, 0].tolist()
    assert got == levels


def test_encode_prompt_equals_the_pipelines_embeddings(pipe):
    from ldm_tutorial.sampling import encode_prompt

    prompts = ["a red circle", " and ".join(["a small blue square on the right"] * 12)]   # the second is cut
    ours = encode_prompt(pipe.tokenizer, pipe.text_encoder, prompts, pipe.device)
    ref, _ = pipe.encode_prompt(prompts, pipe.device, 1, False)
    assert ours.shape == (2, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)


def test_flux_sigmas_for_one_and_three_steps_and_sigmas_for_each_scheduler(pipe):
    assert ldm.flux_sigmas(1) == [1.0]
    assert ldm.flux_sigmas(3) == pytest.approx([1.0, 2 / 3, 1 / 3])
    with pytest.raises(ValueError) as info:
        ldm.flux_sigmas(-2)
    assert str(info.value) == "num_inference_steps must be >= 1, got -2"
    from ldm_tutorial.sampling import sigmas_for

    assert sigmas_for(pipe.scheduler, 4) is None
    assert sigmas_for(FlowMatchEulerDiscreteScheduler(shift=1.0), 4) == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_set_timesteps_passes_the_device_and_checks_sigmas_on_their_edges():
    from diffusers import DDIMScheduler

    from ldm_tutorial.sampling import set_timesteps

    ddim = DDIMScheduler(steps_offset=1)
    assert set_timesteps(ddim, 4).tolist() == [751, 501, 251, 1]             # leading spacing, offset 1
    assert set_timesteps(ddim, 3, device="meta").device.type == "meta"       # the device reaches the scheduler
    with pytest.raises(ValueError) as info:
        set_timesteps(ddim, 2, sigmas=[1.0, 0.5])
    assert str(info.value) == "sigmas is for flow-matching schedulers; DDIMScheduler takes none (pass None)"
    flow = FlowMatchEulerDiscreteScheduler(shift=1.0)
    assert set_timesteps(flow, 2, sigmas=[1.0, 0.5]).tolist() == [1000.0, 500.0]   # 1 is allowed
    assert set_timesteps(flow, 2, device="meta", sigmas=[1.0, 0.5]).device.type == "meta"
    assert set_timesteps(flow, 3).tolist() == pytest.approx([1000.0, 500.5, 1.0])    # its own spacing
    for bad in ([1.0, 0.0], [1.5, 0.5], [1.0], [1.0, 0.5, 0.25]):
        with pytest.raises(ValueError) as info:
            set_timesteps(flow, 2, sigmas=bad)
        assert str(info.value) == f"sigmas must hold num_inference_steps=2 values in (0, 1], got {bad}"


def _unet_batches(pipe, **kwargs):
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        out = sample(pipe, "a red cross", num_inference_steps=3, generator=torch.Generator().manual_seed(1), **kwargs)
    finally:
        handle.remove()
    return calls, out


def test_guidance_runs_the_unet_on_a_doubled_batch_only_above_scale_one(pipe):
    assert _unet_batches(pipe, guidance_scale=1.0)[0] == [1, 1, 1]
    assert _unet_batches(pipe, guidance_scale=0.5)[0] == [1, 1, 1]
    assert _unet_batches(pipe, guidance_scale=1.01)[0] == [2, 2, 2]


def test_guidance_interval_includes_both_ends(pipe):
    ts = _unet_batches(pipe)[1].timesteps
    assert ts == pipe.scheduler.timesteps.tolist() == [667, 334, 1]          # ints, as the scheduler holds them
    assert _unet_batches(pipe, guidance_interval=(334, 334))[0] == [1, 2, 1]
    assert _unet_batches(pipe, guidance_interval=(334, 667))[0] == [2, 2, 1]
    assert _unet_batches(pipe, guidance_interval=(1, 333))[0] == [1, 1, 2]


def test_a_long_negative_prompt_warns_only_when_it_is_used(pipe):
    negative = " and ".join(["a small red circle in the top left corner"] * 12)
    with pytest.warns(UserWarning, match=r"^negative_prompt is \d+ tokens long"):
        sample(pipe, "a red cross", negative_prompt=negative, num_inference_steps=1, guidance_scale=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # guidance off: the negative prompt is never read
        sample(pipe, "a red cross", negative_prompt=negative, num_inference_steps=1, guidance_scale=1.0)


def test_eta_and_the_generator_reach_the_ddim_step_as_in_the_pipeline(pipe):
    kw = dict(num_inference_steps=4, guidance_scale=4.0, eta=0.8)
    ours = sample(pipe, "a blue square", generator=torch.Generator().manual_seed(6), **kw)
    ref = pipe("a blue square", generator=torch.Generator().manual_seed(6), output_type="latent", **kw).images
    torch.testing.assert_close(ours.latents, ref, atol=1e-4, rtol=0)
    other = sample(pipe, "a blue square", generator=torch.Generator().manual_seed(6), **{**kw, "eta": 0.0})
    assert (other.latents - ours.latents).abs().mean() > 1e-2


def test_given_latents_replace_the_noise_and_are_scaled_by_init_noise_sigma(pipe):
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert euler.init_noise_sigma > 10                                   # unlike DDIM's 1.0, it shows
    euler_pipe = StableDiffusionPipeline(**{**pipe.components, "scheduler": euler}, requires_safety_checker=False)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    prompts = ["a red circle", "a green square"]
    kw = dict(num_inference_steps=3, guidance_scale=5.0)
    ours = sample(euler_pipe, prompts, latents=noise, generator=torch.Generator().manual_seed(1), **kw)
    ref = euler_pipe(prompts, latents=noise.clone(), output_type="latent", **kw).images
    torch.testing.assert_close(ours.latents, ref, atol=1e-4, rtol=0)
    again = sample(euler_pipe, prompts, latents=noise, generator=torch.Generator().manual_seed(2), **kw)
    torch.testing.assert_close(again.latents, ours.latents, atol=0, rtol=0)    # the generator is not used
    with pytest.raises(ValueError) as info:
        sample(pipe, "a red cross", latents=torch.zeros(1, 4, 16, 8))
    assert str(info.value) == "latents must have shape (1, 4, 16, 16), got (1, 4, 16, 8)"


def test_one_flow_step_is_the_euler_update_of_the_velocity(pipe):
    """Rectified flow: x_0 = x_1 + (0 - 1) * v(x_1, t=1000), with no noise scaling on either side."""
    flow_pipe = StableDiffusionPipeline(**{**pipe.components, "scheduler": FlowMatchEulerDiscreteScheduler(shift=1.0)},
                                        requires_safety_checker=False)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    out = sample(flow_pipe, "a red cross", latents=noise, num_inference_steps=1, guidance_scale=1.0,
                 sigmas=[1.0], keep_trajectory=True)
    with torch.no_grad():
        emb = pipe.text_encoder(pipe.tokenizer(["a red cross"], padding="max_length", return_tensors="pt",
                                               max_length=pipe.tokenizer.model_max_length).input_ids)[0]
        v = pipe.unet(noise, torch.tensor(1000.0), encoder_hidden_states=emb).sample
    torch.testing.assert_close(out.latents, noise - v, atol=1e-5, rtol=0)
    assert out.timesteps == [1000.0] and len(out.trajectory) == 1


def test_images_are_the_clamped_decode_and_no_trajectory_unless_asked(pipe):
    # w = 15 pushes some decoded values past [-1, 1] (at the default w = 5 three steps may not)
    out = sample(pipe, "a red cross", num_inference_steps=3, guidance_scale=15.0,
                 generator=torch.Generator().manual_seed(0))
    assert out.trajectory == []
    with torch.no_grad():
        raw = pipe.vae.decode(out.latents / pipe.vae.config.scaling_factor).sample
    assert pipe.vae.config.scaling_factor == pytest.approx(0.3788, abs=1e-4)   # TinySD's (vae/config.json)
    assert raw.min() < -1 or raw.max() > 1                                 # the clamp has something to do
    torch.testing.assert_close(out.images, raw.clamp(-1, 1), atol=1e-5, rtol=0)


def test_the_defaults_are_the_documented_ones(pipe):
    """25 steps, w = 5, the empty negative prompt, eta 0, no rescale, no trajectory: as diffusers' call with them."""
    ours = sample(pipe, "a green circle", generator=torch.Generator().manual_seed(8))
    ref = pipe("a green circle", num_inference_steps=25, guidance_scale=5.0, negative_prompt="", eta=0.0,
               guidance_rescale=0.0, generator=torch.Generator().manual_seed(8), output_type="latent").images
    torch.testing.assert_close(ours.latents, ref, atol=1e-4, rtol=0)
    assert len(ours.timesteps) == 25 and ours.trajectory == []


def test_given_latents_are_cast_to_the_unets_dtype(pipe):
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(12))
    kw = dict(num_inference_steps=2, guidance_scale=3.0)
    single = sample(pipe, "a red cross", latents=noise, **kw)
    double = sample(pipe, "a red cross", latents=noise.double(), **kw)          # float64 in, the U-Net is float32
    assert double.latents.dtype == torch.float32
    torch.testing.assert_close(double.latents, single.latents, atol=1e-6, rtol=0)


def test_a_batch_of_three_matches_the_pipeline(pipe):
    prompts = ["a red circle", "a green cross", "a small blue square on the right"]
    ours = sample(pipe, prompts, num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(7))
    ref = pipe(prompts, num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(7),
               output_type="latent").images
    torch.testing.assert_close(ours.latents, ref, atol=1e-4, rtol=0)


def test_a_batch_of_three_outside_the_guidance_interval_is_each_prompt_alone(pipe):
    """Steps outside the interval run the prompt half of the embeddings only: for three prompts, the
    last three of six rows. Each image must come out as it does in a batch of one."""
    prompts = ["a red circle", "a green cross", "a blue square"]
    noise = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    kw = dict(num_inference_steps=3, guidance_scale=4.0, guidance_interval=(334, 334))
    together = sample(pipe, prompts, latents=noise, **kw).latents
    for i, p in enumerate(prompts):
        alone = sample(pipe, p, latents=noise[i:i + 1], **kw).latents
        torch.testing.assert_close(together[i:i + 1], alone, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def weak(pipe):
    return ldm.tinysd.load_autoguidance_unet(pipe)


def _hand_loop(pipe, weak, prompt, noise, steps, w, w_ag):
    """Autoguidance written out: eps_u + w (eps_c - eps_u) + (w_ag - 1)(eps_c - eps_weak)."""
    from ldm_tutorial.sampling import encode_prompt

    sch = pipe.scheduler
    sch.set_timesteps(steps)
    uncond, text = (encode_prompt(pipe.tokenizer, pipe.text_encoder, [p], "cpu") for p in ("", prompt))
    x = noise * sch.init_noise_sigma
    with torch.no_grad():
        for t in sch.timesteps:
            eu = pipe.unet(x, t, encoder_hidden_states=uncond).sample
            ec = pipe.unet(x, t, encoder_hidden_states=text).sample
            ew = weak(x, t, encoder_hidden_states=text).sample
            eps = (eu + w * (ec - eu) if w > 1 else ec) + (w_ag - 1) * (ec - ew)
            x = sch.step(eps, t, x).prev_sample
    return x


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_autoguidance_is_the_written_out_formula(pipe, weak, w):
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(21))
    ours = sample(pipe, "a small red circle on the left", latents=noise, num_inference_steps=4,
                  guidance_scale=w, autoguidance_unet=weak, autoguidance_scale=2.0).latents
    ref = _hand_loop(pipe, weak, "a small red circle on the left", noise, 4, w, 2.0)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    plain = sample(pipe, "a small red circle on the left", latents=noise, num_inference_steps=4,
                   guidance_scale=w).latents
    assert (ours - plain).abs().max() > 1e-2                     # the weak model changed the result


def test_autoguidance_scale_one_is_plain_cfg_and_batches_match_single_prompts(pipe, weak):
    noise = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(22))
    prompts = ["a red circle", "a green cross", "a blue square"]
    kw = dict(num_inference_steps=3, guidance_scale=3.0, latents=noise)
    off = sample(pipe, prompts, autoguidance_unet=weak, autoguidance_scale=1.0, **kw).latents
    torch.testing.assert_close(off, sample(pipe, prompts, **kw).latents, atol=0, rtol=0)
    kw["guidance_interval"] = (334, 334)        # the weak model still runs on the unguided steps
    together = sample(pipe, prompts, autoguidance_unet=weak, **kw).latents
    for i, p in enumerate(prompts):
        alone = sample(pipe, p, autoguidance_unet=weak, **{**kw, "latents": noise[i:i + 1]}).latents
        torch.testing.assert_close(together[i:i + 1], alone, atol=1e-4, rtol=0)


def test_autoguidance_refuses_bad_weak_models_and_scales(pipe, weak):
    from diffusers import UNet2DConditionModel

    with pytest.raises(ValueError, match="^autoguidance_scale must be a finite number in \\[1.0, None\\]"):
        sample(pipe, "a red cross", num_inference_steps=1, autoguidance_unet=weak, autoguidance_scale=0.5)
    with pytest.raises(ValueError, match="^autoguidance_unet must be None or a diffusers"):
        sample(pipe, "a red cross", num_inference_steps=1, autoguidance_unet="small")
    with pytest.raises(ValueError, match="^autoguidance_unet must be a weaker model"):
        sample(pipe, "a red cross", num_inference_steps=1, autoguidance_unet=pipe.unet)
    other = UNet2DConditionModel.from_config({**weak.config, "cross_attention_dim": 64})
    with pytest.raises(ValueError, match=r"^autoguidance_unet must match the pipeline's U-Net in "
                                         r"cross_attention_dim \(128\), got 64"):
        sample(pipe, "a red cross", num_inference_steps=1, autoguidance_unet=other)
