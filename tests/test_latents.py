"""ldm.check_latent_health: a healthy set-up passes, each broken one fails with its own reason."""

import pytest
import torch
from diffusers import AutoencoderKL

import ldm_tutorial as ldm
from ldm_tutorial.tinysd import load_vae, shapes


@pytest.fixture(scope="module")
def vae():
    return load_vae()


@pytest.fixture(scope="module")
def images():
    return shapes.render(shapes.sample_scenes(8, seed=10_002))      # held-out scenes, in [-1, 1]


def tiny_vae(seed: int = 0, **config) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL small enough for a unit test (f = 2)."""
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                         latent_channels=4, **config).eval()


def test_shipped_vae_on_its_images_is_healthy(vae, images):
    r = ldm.check_latent_health(vae, images)
    assert r.ok and r.problems == [], r
    assert r.scaling_factor == pytest.approx(vae.config.scaling_factor)
    assert 0.85 < r.scaled_std < 1.15                 # near unit variance: what the factor is for
    with torch.no_grad():                              # the statistics, recomputed independently
        post = vae.encode(images).latent_dist
        z = post.sample(generator=torch.Generator().manual_seed(0))
        rec = vae.decode(post.mode()).sample.clamp(-1, 1)
    assert r.raw_std == pytest.approx(float(z.std()), rel=1e-4)
    assert r.scaled_std == pytest.approx(float(z.std()) * vae.config.scaling_factor, rel=1e-4)
    assert r.raw_channel_mean == pytest.approx(z.mean((0, 2, 3)).tolist(), abs=1e-4)
    mse = ((rec - images) ** 2).flatten(1).mean(1)
    assert r.round_trip_psnr == pytest.approx(float((10 * torch.log10(4 / mse)).mean()), abs=1e-3)
    assert r.round_trip_psnr > 28                      # TinySD's VAE: about 33 dB on held-out shapes
    assert len(r.scaled_channel_std) == vae.config.latent_channels == 4
    assert -1 <= r.pixel_min < r.pixel_max <= 1
    assert "ok" in repr(r) and "PSNR" in repr(r)


def test_another_models_factor_is_caught(vae, images):
    r = ldm.check_latent_health(vae, images, scaling_factor=0.13025)   # SDXL's factor on TinySD's VAE
    assert not r.ok
    assert len(r.problems) == 1 and "scaling_factor 0.13025 is wrong" in r.problems[0]
    assert r.scaled_std < 0.5
    assert r.suggested_scaling_factor == pytest.approx(1 / r.raw_std)
    assert 0.3 < r.suggested_scaling_factor < 0.45     # TinySD's 0.3788, estimated from 8 images


@pytest.mark.parametrize("convert, reason", [(lambda x: (x + 1) / 2, "[0, 1]"),
                                             (lambda x: (x + 1) * 127.5, "[0, 255]")])
def test_images_in_the_wrong_range_are_caught(vae, images, convert, reason):
    r = ldm.check_latent_health(vae, convert(images))
    assert not r.ok
    assert any(f"look like {reason}" in p for p in r.problems), r.problems


def test_an_untrained_vae_fails_its_round_trip(images):
    r = ldm.check_latent_health(tiny_vae(scaling_factor=1.0), images)
    assert not r.ok
    assert any("round trip PSNR" in p for p in r.problems), r.problems
    assert r.round_trip_psnr < 20


def test_nan_in_images_or_latents_is_caught(images):
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    bad[1, 1, 2, 3] = float("inf")
    r = ldm.check_latent_health(tiny_vae(), bad)
    assert not r.ok and "2 NaN or inf values" in r.problems[0]
    broken = tiny_vae()
    with torch.no_grad():
        broken.encoder.conv_in.weight[0, 0, 0, 0] = float("inf")        # an overflowed encoder
    r = ldm.check_latent_health(broken, images)
    assert not r.ok and any("latents contain" in p for p in r.problems), r.problems


def test_shift_factor_is_subtracted_before_scaling(images):
    r = ldm.check_latent_health(tiny_vae(scaling_factor=2.0, shift_factor=0.5), images)
    assert r.shift_factor == 0.5
    assert r.scaled_mean == pytest.approx((r.raw_mean - 0.5) * 2.0, abs=1e-5)
    assert r.scaled_std == pytest.approx(r.raw_std * 2.0, rel=1e-4)
    assert "shift_factor 0.5" in repr(r)


def test_bad_arguments_raise_value_errors_naming_the_parameter(vae, images):
    with pytest.raises(ValueError, match=r"images must be a torch.Tensor .*got list"):
        ldm.check_latent_health(vae, list(images))
    with pytest.raises(ValueError, match=r"images must have 4 dimensions .*got shape \(3, 128, 128\)"):
        ldm.check_latent_health(vae, images[0])
    rgba = torch.cat([images, images[:, :1]], dim=1)
    with pytest.raises(ValueError, match=r"images must have 3 channels \(vae.config.in_channels\).*got 4"):
        ldm.check_latent_health(vae, rgba)
    with pytest.raises(ValueError, match=r"images must be a float tensor .*uint8"):
        ldm.check_latent_health(vae, ((images + 1) * 127.5).to(torch.uint8))
    with pytest.raises(ValueError, match=r"scaling_factor must be a positive finite number .*got -1"):
        ldm.check_latent_health(vae, images, scaling_factor=-1)
    with pytest.raises(ValueError, match=r"vae must be an autoencoder .*got Tensor"):
        ldm.check_latent_health(images, images)
