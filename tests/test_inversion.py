"""ldm_tutorial.inversion: interpolation, DDIM inversion, negative-prompt inversion, DiffEdit masks."""
import math

import numpy as np
import pytest
import torch

import ldm_tutorial as ldm
from ldm_tutorial import inversion
from ldm_tutorial.tinysd import parser, shapes


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    p = ldm.load_pipeline("tiny", verbose=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def scenes():
    sc = shapes.sample_scenes(2, seed=10_500)
    return shapes.render(sc), [shapes.describe(s) for s in sc]


# --- interpolation -------------------------------------------------------------------------

def _gaussians(d=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, d, generator=g)
    return a / a.norm(), b / b.norm()


def test_slerp_keeps_the_norm_where_lerp_shrinks_it():
    a, b = _gaussians()
    mid_lerp, mid_slerp = inversion.lerp(a, b, 0.5), inversion.slerp(a, b, 0.5)
    # two near-orthogonal unit vectors: lerp's midpoint has norm ~ cos(45 deg) = 0.707
    assert 0.65 < float(mid_lerp.norm()) < 0.76
    for t in np.linspace(0, 1, 11):
        assert abs(float(inversion.slerp(a, b, float(t)).norm()) - 1.0) < 1e-5
    # the midpoint is at equal angles from both ends (on the great circle)
    assert abs(float(mid_slerp @ a) - float(mid_slerp @ b)) < 1e-5


def test_slerp_endpoints_are_exact_and_angle_is_linear_in_t():
    a, b = _gaussians(seed=1)
    assert torch.equal(inversion.slerp(a, b, 0.0), a) and torch.equal(inversion.slerp(a, b, 1.0), b)
    theta = math.acos(float(a @ b))
    x = inversion.slerp(a, b, 0.25)
    assert abs(math.acos(float(x @ a)) - 0.25 * theta) < 1e-4


def test_slerp_of_parallel_vectors_is_lerp_not_nan():
    a = torch.randn(64, generator=torch.Generator().manual_seed(2))
    b = a * 2.0                                     # same direction: sin(theta) = 0
    x = inversion.slerp(a, b, 0.5)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x, 1.5 * a)


def test_slerp_errors_name_the_parameter():
    a = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"a and b must have the same shape, got \(4, 16\) and \(4, 8\)"):
        inversion.slerp(a, torch.randn(4, 8), 0.5)
    with pytest.raises(ValueError, match=r"t must be a finite number in \[0.0, 1.0\], got 1.5"):
        inversion.slerp(a, a + 1, 1.5)
    with pytest.raises(ValueError, match="opposite directions"):
        inversion.slerp(a, -a, 0.5)
    with pytest.raises(ValueError, match="b must be a floating-point torch.Tensor, got list"):
        inversion.lerp(a, [1, 2], 0.5)
    with pytest.raises(ValueError, match="method must be 'lerp' or 'slerp', got 'cubic'"):
        inversion.interpolate(a, a + 1, 3, method="cubic")
    with pytest.raises(ValueError, match="n must be at least 2"):
        inversion.interpolate(a, a + 1, 1)


def test_interpolate_frames_and_their_distances():
    a, b = _gaussians(seed=3)
    frames = inversion.interpolate(a, b, 9, "slerp")
    assert frames.shape == (9, 1024)
    d = inversion.frame_distances(frames)
    # slerp moves at constant angular speed: every step the same length
    assert float(d.max() / d.min()) < 1.0001
    assert torch.equal(frames[0], a) and torch.equal(frames[-1], b)


# --- inversion -----------------------------------------------------------------------------

def _round_trip_psnr(pipe, images, prompts, steps):
    inv = inversion.invert(pipe, images, prompts, num_inference_steps=steps)
    rec = inversion.regenerate(pipe, inv.latents, prompts, num_inference_steps=steps)
    return ldm.metrics.psnr(rec, images), inv


def test_invert_then_regenerate_reconstructs_a_scene(pipe, scenes):
    images, prompts = scenes
    psnr, inv = _round_trip_psnr(pipe, images, prompts, 25)
    ceiling = ldm.metrics.psnr(inversion.decode(pipe, inversion.encode(pipe, images)), images)
    assert inv.timesteps == sorted(inv.timesteps) and inv.timesteps[-1] > 900   # up to high noise
    assert len(inv.trajectory) == 26 and torch.equal(inv.trajectory[0], inv.image_latents.cpu())
    assert float(psnr.min()) > 26.0                       # measured 27.1 and 29.0 dB
    # within 7.5 dB of the VAE's own round trip (measured 33.1 and 36.0 dB: gaps 5.9 and 7.0);
    # the wrong timestep order stays under 20 dB (the next test)
    assert float((ceiling - psnr).max()) < 7.5
    # the inverted latents look like noise: std near 1 (the image latents' is lower)
    assert 0.8 < float(inv.latents.std()) < 1.2


def test_inversion_with_timesteps_run_the_wrong_way_misses_the_bound(pipe, scenes, monkeypatch):
    images, prompts = scenes
    real = inversion.inverse_scheduler

    def reversed_scheduler(p):
        s = real(p)
        original = s.set_timesteps

        def set_timesteps(n, device=None):
            original(n, device=device)
            s.timesteps = s.timesteps.flip(0)            # high noise first: the forward order
        s.set_timesteps = set_timesteps
        return s

    monkeypatch.setattr(inversion, "inverse_scheduler", reversed_scheduler)
    psnr, _ = _round_trip_psnr(pipe, images, prompts, 25)
    assert float(psnr.max()) < 20.0


def test_invert_agrees_with_diffedit_pipeline_invert(pipe, scenes):
    images, prompts = scenes
    inv = inversion.invert(pipe, images, prompts, num_inference_steps=10)
    edit = inversion.diffedit_pipeline(pipe)
    lib = edit.invert(prompt=prompts, image=inv.image_latents, num_inference_steps=10, inpaint_strength=1.0,
                      guidance_scale=1.0).latents                      # (B, steps, C, h, w), x_T first
    torch.testing.assert_close(lib[:, 0], inv.latents)
    torch.testing.assert_close(lib[:, -1], inv.trajectory[1])


def test_guidance_breaks_inversion_and_negative_prompt_inversion_fixes_it(pipe, scenes):
    images, prompts = scenes
    plain, _ = _round_trip_psnr(pipe, images, prompts, 25)
    inv = inversion.invert(pipe, images, prompts, num_inference_steps=25, guidance_scale=7.5)
    guided = ldm.metrics.psnr(inversion.regenerate(pipe, inv.latents, prompts, 25, guidance_scale=7.5), images)
    npi = ldm.metrics.psnr(inversion.negative_prompt_inversion(pipe, images, prompts, num_inference_steps=25,
                                                               guidance_scale=7.5), images)
    assert float((plain - guided).min()) > 3.0          # guidance pushes off the inverted path
    torch.testing.assert_close(npi, plain, atol=0.05, rtol=0)   # NPI: the unguided reconstruction


def test_invert_and_regenerate_errors_name_the_parameter(pipe, scenes):
    images, prompts = scenes
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer, got 0"):
        inversion.invert(pipe, images, prompts, num_inference_steps=0)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number, got nan"):
        inversion.invert(pipe, images, prompts, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match=r"prompt must be one string or one per image \(2\), got 3"):
        inversion.invert(pipe, images, ["a", "b", "c"])
    with pytest.raises(ValueError, match="image"):
        inversion.invert(pipe, images * 3, prompts)                      # values outside [-1, 1]
    with pytest.raises(ValueError, match=r"latents must be a \(B, C, h, w\) tensor"):
        inversion.regenerate(pipe, torch.zeros(4, 16, 16), prompts)
    with pytest.raises(ValueError, match="output_type must be 'pt' or 'latent', got 'pil'"):
        inversion.regenerate(pipe, torch.zeros(2, 4, 16, 16), prompts, output_type="pil")


# --- DiffEdit and masks --------------------------------------------------------------------

def test_mask_iou_and_latent_mask():
    a = np.zeros((4, 4), bool)
    a[:2, :2] = True
    b = np.zeros((4, 4), bool)
    b[:2, :] = True
    assert inversion.mask_iou(a, b) == 0.5 and inversion.mask_iou(a, a) == 1.0
    with pytest.raises(ValueError, match=r"masks must have the same shape, got \(4, 4\) and \(2, 2\)"):
        inversion.mask_iou(a, np.zeros((2, 2)))
    pix = np.zeros((16, 16), bool)
    pix[:8, :3] = True                               # 3/8 of the first cell's area
    cells = inversion.object_mask_latent(pix, 8)
    assert cells.tolist() == [[True, False], [False, False]]
    with pytest.raises(ValueError, match="multiples of factor=8"):
        inversion.object_mask_latent(np.zeros((12, 16)), 8)


def test_diffedit_mask_covers_the_recoloured_object(pipe):
    edit = inversion.diffedit_pipeline(pipe)
    (a, b), = inversion.recolour_pairs(1, 5)
    image = shapes.render([a])[0]
    mask = inversion.diffedit_mask(edit, image, shapes.describe(a), shapes.describe(b), 10)
    truth = inversion.object_mask_latent(parser.parse_scene(image)[0].mask)
    assert mask.shape == (16, 16)
    assert (mask & truth).sum() >= 0.8 * truth.sum()          # the object is inside the mask
    assert mask.sum() < 0.3 * mask.size                       # and the mask is not the whole image


def test_recolour_pairs_differ_in_one_colour_only():
    pairs = inversion.recolour_pairs(4, 0, n_objects=2)
    for a, b in pairs:
        assert (a.objects[0].colour, b.objects[0].colour) == ("blue", "red")
        assert a.objects[1:] == b.objects[1:] and a.background == b.background
        assert a.objects[0].position == b.objects[0].position
        assert all(o.colour not in ("blue", "red") for o in a.objects[1:])


def test_colour_direction_and_interpolation_errors_name_the_parameter(pipe):
    with pytest.raises(ValueError, match="space must be 'vae' or 'noise', got 'pixel'"):
        inversion.colour_direction(pipe, inversion.recolour_pairs(1, 0), space="pixel")
    with pytest.raises(ValueError, match="frames must be a tensor of at least 2 frames"):
        inversion.frame_distances(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="slerp needs non-zero a and b"):
        inversion.slerp(torch.zeros(8), torch.ones(8), 0.5)
