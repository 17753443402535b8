"""Signal-leak initial latents (ldm_tutorial.signal_leak, Everaert et al., arXiv:2309.15842)."""

import copy

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

import ldm_tutorial as ldm
from ldm_tutorial.signal_leak import SignalLeak, first_alpha_bar, fit_signal_leak, signal_leak_latents
from ldm_tutorial.tinysd import leak as tinysd_leak


@pytest.fixture(scope="module")
def pipe():
    return ldm.load_pipeline("tiny", verbose=False)


@pytest.fixture(scope="module")
def leak():
    return ldm.tinysd.load_signal_leak()


def test_fit_recovers_a_known_low_rank_gaussian():
    g = torch.Generator().manual_seed(0)
    d, k, n = 48, 3, 4000
    basis, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
    scales = torch.tensor([3.0, 2.0, 1.0])
    mean = torch.linspace(-1, 1, d)
    x = mean + (torch.randn(n, k, generator=g) * scales) @ basis.T + 0.1 * torch.randn(n, d, generator=g)
    fit = fit_signal_leak(x.view(n, 3, 4, 4), rank=k)
    assert fit.shape == (3, 4, 4) and fit.n == n
    assert (fit.mean.flatten() - mean).abs().max() < 0.2
    np.testing.assert_allclose(fit.scales.numpy(), np.sqrt(scales.numpy() ** 2 + 0.01), rtol=0.06)
    assert fit.residual == pytest.approx(0.1, rel=0.05)
    # the fitted directions span the true ones: the projection keeps their length
    assert torch.linalg.matrix_norm(fit.components.T @ basis) ** 2 == pytest.approx(k, rel=0.01)


def test_samples_have_the_models_mean_and_variance_and_save_load_round_trips(leak, tmp_path):
    x = leak.sample(2000, torch.Generator().manual_seed(1)).flatten(1)
    d, k = leak.components.shape
    se = x.std(0) / np.sqrt(len(x))
    assert ((x.mean(0) - leak.mean.flatten()).abs() < 5 * se).float().mean() > 0.99
    want = float((leak.scales ** 2).sum() + leak.residual ** 2 * (d - k))
    assert float(x.var(0).sum()) == pytest.approx(want, rel=0.05)
    leak.save(tmp_path / "l.safetensors")
    back = SignalLeak.load(tmp_path / "l.safetensors")
    assert back.n == leak.n and back.residual == leak.residual
    assert (back.components - leak.components).abs().max() < 1e-3    # float16 on disk


def test_the_shipped_leak_models_tinysds_training_latents(leak):
    z = tinysd_leak.training_latents(128, seed=5)        # scenes the leak was not fitted on
    assert leak.shape == tuple(z.shape[1:]) == (4, 16, 16)
    draws = leak.sample(2000, torch.Generator().manual_seed(2))
    # per-channel mean and the image-wide (DC) spread across images: what the leak carries
    dc = z.mean((2, 3))                                   # (128, 4): each image's mean latent
    se = dc.std(0) / np.sqrt(len(dc))
    assert ((draws.mean((0, 2, 3)) - dc.mean(0)).abs() < 4 * se).all()
    np.testing.assert_allclose(draws.mean((2, 3)).std(0), z.mean((2, 3)).std(0), rtol=0.25)


def test_first_alpha_bar_is_the_first_visited_noise_level_and_leaves_the_scheduler_alone(pipe):
    sched = pipe.scheduler
    before = sched.timesteps.clone()
    assert first_alpha_bar(sched, 25) == pytest.approx(float(sched.alphas_cumprod[961]))
    assert torch.equal(sched.timesteps, before)
    trailing = type(sched).from_config(sched.config, timestep_spacing="trailing")
    assert first_alpha_bar(trailing, 25) == pytest.approx(float(sched.alphas_cumprod[999]))
    euler = EulerDiscreteScheduler.from_config(sched.config)
    euler.set_timesteps(25)
    assert first_alpha_bar(euler, 25) == pytest.approx(1 / (1 + float(euler.sigmas[0]) ** 2))
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler has none"):
        first_alpha_bar(FlowMatchEulerDiscreteScheduler(), 25)


def test_latents_are_ldm_samples_noise_plus_the_scaled_leak(pipe, leak):
    abar = first_alpha_bar(pipe.scheduler, 25)
    lat = signal_leak_latents(pipe, 3, 25, torch.Generator().manual_seed(7), leak)
    g = torch.Generator().manual_seed(7)
    eps = randn_tensor((3, 4, 16, 16), generator=g, dtype=torch.float32, device=torch.device("cpu"))
    x0 = leak.sample(3, g)
    torch.testing.assert_close(lat, (1 - abar) ** 0.5 * eps + abar ** 0.5 * x0)
    # one generator per image: image i is what generator i gives alone
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    both = signal_leak_latents(pipe, 2, 25, gens, leak)
    alone = signal_leak_latents(pipe, 1, 25, torch.Generator().manual_seed(4), leak)
    torch.testing.assert_close(both[1:], alone)


@pytest.mark.parametrize("make", [lambda c: EulerDiscreteScheduler.from_config(c, timestep_spacing="leading"),
                                  lambda c: DPMSolverMultistepScheduler.from_config(c)])
def test_after_init_noise_sigma_the_start_is_x0_plus_sigma_eps(pipe, leak, make):
    """What the sampler starts from, in sigma units: x0_tilde + sigma_0 * eps (divided by
    sqrt(1 + sigma_0^2) in the variance-preserving units DPM-Solver works in)."""
    sched = make(pipe.scheduler.config)
    parts = copy.copy(pipe)
    parts.scheduler = sched
    lat = signal_leak_latents(parts, 2, 20, torch.Generator().manual_seed(0), leak)
    sched.set_timesteps(20)
    sigma = float(sched.sigmas[0])
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(2, 4, 16, 16, generator=g)
    x0 = leak.sample(2, g)
    vp = 1.0 if float(sched.init_noise_sigma) > 1.5 else (1 + sigma ** 2) ** -0.5
    torch.testing.assert_close(lat * sched.init_noise_sigma, vp * (x0 + sigma * eps), atol=1e-4, rtol=1e-4)


def test_the_leak_spreads_the_generated_background_colours(pipe, leak):
    prompts = ["a red circle in the centre", "a large blue square on the left"] * 4
    kw = dict(num_inference_steps=10, guidance_scale=5.0)
    plain = ldm.sample(pipe, prompts, generator=torch.Generator().manual_seed(0), **kw).images
    lat = signal_leak_latents(pipe, len(prompts), 10, torch.Generator().manual_seed(0), leak)
    leaky = ldm.sample(pipe, prompts, latents=lat, **kw).images

    def colour_spread(images):   # std across images of the median colour (the background's)
        return float(images.flatten(2).median(2).values.std(0).mean())
    assert colour_spread(leaky) > 1.5 * colour_spread(plain)


def test_bad_arguments_are_named(pipe, leak):
    with pytest.raises(ValueError, match="batch_size"):
        signal_leak_latents(pipe, 0, 25, None, leak)
    with pytest.raises(ValueError, match="a list of 2"):
        signal_leak_latents(pipe, 2, 25, [torch.Generator()], leak)
    with pytest.raises(ValueError, match="leak must be a SignalLeak"):
        signal_leak_latents(pipe, 1, 25, None, leak={"mean": 0})
    small = SignalLeak(torch.zeros(4, 8, 8), torch.zeros(256, 2), torch.ones(2), 0.1, 10)
    with pytest.raises(ValueError, match=r"shape \(4, 8, 8\).*takes \(4, 16, 16\)"):
        signal_leak_latents(pipe, 1, 25, None, small)
    with pytest.raises(ValueError, match="num_inference_steps"):
        signal_leak_latents(pipe, 1, 0, None, leak)
    with pytest.raises(ValueError, match="rank must be below"):
        fit_signal_leak(torch.randn(10, 1, 2, 2), rank=4)
    with pytest.raises(ValueError, match="finite"):
        fit_signal_leak(torch.full((10, 1, 4, 4), float("nan")), rank=2)
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        fit_signal_leak(torch.randn(10, 16), rank=2)
    with pytest.raises(ValueError, match="seed must be below"):
        tinysd_leak.training_latents(4, seed=10_000)
