"""Image metrics, the KL convention of the VAE loss, and the VAE-losses lab (models, training, shipped variants)."""

import pytest
import torch
import torch.nn.functional as F

from ldm_tutorial import metrics, vae_lab
from ldm_tutorial.losses import VAELoss, VAELossConfig


def _images(n=4, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 2 - 1)


# ----------------------------------------------------------------------------- metrics
def test_psnr_matches_its_definition_and_rejects_bad_input():
    x = _images()
    y = (x + 0.1).clamp(-1, 1)
    mse = ((x - y) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(metrics.psnr(x, y), 10 * torch.log10(4 / mse))
    with pytest.raises(ValueError, match=r"x must be in \[-1, 1\]"):
        metrics.psnr(x * 3, y)
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(x, y[:, :, :32])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        metrics.psnr(x[0], y[0])
    # a mask counts only the pixels it keeps: errors confined to the masked-out half do not count
    b, _, h, w = x.shape
    keep = torch.zeros(b, 1, h, w, dtype=torch.bool)
    keep[..., : w // 2] = True
    z = x.clone()
    z[..., w // 2:] = -x[..., w // 2:]
    assert (metrics.psnr(x, z, mask=keep) > 90).all()                  # 1e-10 floor: 106 dB
    assert (metrics.psnr(x, z) < 40).all()
    torch.testing.assert_close(metrics.psnr(x, y, mask=keep),
                               10 * torch.log10(4 / ((x - y) ** 2)[..., : w // 2].flatten(1).mean(1)))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        metrics.psnr(x, y, mask=keep.float())


def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    x = _images(2)
    assert metrics.ssim(x, x).min() > 0.999
    assert metrics.ssim(x, (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)).max() < 0.9


def test_high_frequency_ratio_sees_blur_and_noise():
    x = _images(4, seed=1)
    blurred = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    noisy = (x + 0.3 * torch.randn_like(x, generator=None)).clamp(-1, 1)
    assert metrics.high_freq_ratio(x, x) == pytest.approx(1.0)
    assert metrics.high_freq_ratio(blurred, x) < 0.3          # a 3x3 box filter removes most power above 1/4
    assert metrics.high_freq_ratio(noisy, x) > 1.0
    with pytest.raises(ValueError, match="cutoff"):
        metrics.high_freq_ratio(x, x, cutoff=0.7)


def test_radial_spectrum_of_white_noise_is_flat_and_of_a_smooth_image_falls():
    g = torch.Generator().manual_seed(0)
    noise = (torch.randn(8, 3, 64, 64, generator=g) * 0.3).clamp(-1, 1)
    f, p = metrics.radial_power_spectrum(noise)
    assert f.shape == p.shape and f[0] > 0 and f[-1] < 0.5
    mid = p[4:-4]
    assert mid.max() / mid.min() < 2.0                       # flat within a factor 2 away from DC and corners
    smooth = F.interpolate(noise[:, :, ::8, ::8], size=64, mode="bilinear", align_corners=False)
    _, ps = metrics.radial_power_spectrum(smooth)
    assert ps[-4:].mean() < 0.01 * ps[1:4].mean()


# ----------------------------------------------------------------------------- the KL convention
def test_kl_reduction_ldm_divides_the_summed_kl_by_the_pixel_count():
    x = _images(2, size=32)
    x_hat = (x * 0.9)
    kl = torch.tensor([100.0, 300.0])
    cfg = dict(perceptual_weight=0.0, use_gan=False, kl_weight=1e-2)
    ldm_loss, _ = VAELoss(VAELossConfig(**cfg)).generator_loss(x, x_hat, kl, 0, None)
    sum_loss, _ = VAELoss(VAELossConfig(**cfg, kl_reduction="sum")).generator_loss(x, x_hat, kl, 0, None)
    rec = (x - x_hat).abs().mean()
    torch.testing.assert_close(ldm_loss, rec + 1e-2 * kl.mean() / (3 * 32 * 32))
    torch.testing.assert_close(sum_loss, rec + 1e-2 * kl.mean())
    with pytest.raises(ValueError, match="kl_reduction"):
        VAELoss(VAELossConfig(**cfg, kl_reduction="mean")).generator_loss(x, x_hat, kl, 0, None)


# ----------------------------------------------------------------------------- lab models
@pytest.mark.parametrize("factor", [4, 8, 16])
def test_lab_models_downsample_by_their_factor_on_any_image_size(factor):
    model = vae_lab.new_model({4: "f4", 8: "full", 16: "f16"}[factor])
    for size in (64, 128):
        z = vae_lab.encode(model, _images(1, size))
        assert z.shape == (1, vae_lab.LATENT_CHANNELS, size // factor, size // factor)
        assert vae_lab.decode(model, z).shape == (1, 3, size, size)


def test_bad_variant_and_factor_are_named():
    with pytest.raises(ValueError, match="variant must be one of"):
        vae_lab.new_model("l3")
    with pytest.raises(ValueError, match="factor must be 4, 8 or 16"):
        vae_lab.model_config(32)
    with pytest.raises(ValueError, match="must be a VQModel"):
        vae_lab.codebook_stats(vae_lab.new_model("full"), _images(1))


def test_codebook_stats_count_codes_and_perplexity():
    import numpy as np
    from scipy.stats import entropy

    model = vae_lab.new_model("vq")
    x = _images(4)
    st = vae_lab.codebook_stats(model, x)
    # independently: each latent vector's nearest codebook entry, then the histogram's statistics
    with torch.no_grad():
        z = model.encode(x).latents.permute(0, 2, 3, 1).reshape(-1, model.quantize.embedding.weight.shape[1])
        nearest = torch.cdist(z, model.quantize.embedding.weight).argmin(1)
    counts = np.bincount(nearest.numpy(), minlength=vae_lab.CODEBOOK_SIZE)
    assert counts.sum() == 4 * 8 * 8                             # one code per latent position
    np.testing.assert_array_equal(st["counts"].numpy(), counts)
    assert st["codes"] == len(counts) and st["used"] == int((counts > 0).sum())
    assert st["usage"] == pytest.approx((counts > 0).mean())
    assert st["perplexity"] == pytest.approx(float(np.exp(entropy(counts / counts.sum()))), rel=1e-9)
    assert 1 <= st["perplexity"] <= st["used"] < st["codes"]


def test_training_runs_the_gan_after_warmup_and_resumes_exactly(tmp_path):
    data = vae_lab.LabData(n_scenes=16)
    _, h = vae_lab.train_variant("full", 4, batch=2, lab_data=data, log_every=1, progress=False)
    assert h["g"][:2] == [None, None] and h["g"][2] is not None      # disc_start = 4 * 0.5
    assert all(w is not None and w > 0 for w in h["adaptive_weight"][2:])
    straight, _ = vae_lab.train_variant("l1", 4, batch=2, lab_data=data, progress=False)
    # a run cut off after 2 steps (its checkpoint on disk), then restarted with the full budget
    vae_lab.train_variant("l1", 2, batch=2, lab_data=data, ckpt=tmp_path / "l1.pt", progress=False)
    assert torch.load(tmp_path / "l1.pt", weights_only=False)["step"] == 2
    resumed, _ = vae_lab.train_variant("l1", 4, batch=2, lab_data=data, ckpt=tmp_path / "l1.pt", progress=False)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)


def test_training_device_is_checked(no_cuda):
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        vae_lab.train_variant("l1", 1, device="tpu")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        vae_lab.train_variant("l1", 1, device="cuda")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        vae_lab.train_variant("l1", 0)


def test_vq_training_logs_commitment_and_codebook_usage():
    _, h = vae_lab.train_variant("vq", 2, batch=2, lab_data=vae_lab.LabData(n_scenes=8), log_every=1, progress=False)
    assert all(c is not None and 0 < c < float("inf") for c in h["commit"])
    positions = 2 * (vae_lab.CROP // 8) ** 2                      # latent vectors in one batch of 2 crops
    for u in h["usage"]:
        used = u * vae_lab.CODEBOOK_SIZE
        assert abs(used - round(used)) < 1e-9 and 1 <= round(used) <= positions   # a count of distinct codes


# ----------------------------------------------------------------------------- shipped checkpoints
def test_shipped_weights_fit_the_budget():
    """Each shipped file at most 16 MB, all shipped weights (TinySD, its flow comparison and the lab) at most 100 MB.

    The budget was 80 MB until chapter 5's DDPM-vs-flow comparison added two 8.8M-parameter U-Nets in
    float16 (the flow model and its epsilon control, 17 MB each): what a Colab `%pip install` fetches."""
    from ldm_tutorial.tinysd import WEIGHTS_DIR

    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert max(p.stat().st_size for p in files) <= 16 * 2**20
    assert sum(p.stat().st_size for p in files) <= 100 * 2**20
    assert {p.parent.name for p in (WEIGHTS_DIR / "vae-lab").glob("*/config.json")} == set(vae_lab.VARIANTS)


@pytest.fixture(scope="module")
def lab():
    from ldm_tutorial.losses import Perceptual

    evals = vae_lab.eval_images()
    models = {n: vae_lab.load_variant(n) for n in vae_lab.VARIANTS}
    judge = Perceptual(seed=1)
    scores = {n: {k: vae_lab.measure(m, x, perceptual=judge) for k, x in evals.items()} for n, m in models.items()}
    return evals, models, scores


def test_shipped_loss_terms_buy_high_frequencies_on_held_out_shapes(lab):
    _, _, s = lab
    hf = {n: s[n]["shapes"]["hf_ratio"] for n in ("l2", "l1", "l1_p", "full")}
    assert hf["full"] > 2 * hf["l2"], hf                  # the chapter's headline: L2 is measurably blurrier
    assert hf["l1"] < hf["l1_p"] < hf["full"], hf         # each term added to L1 raises the ratio
    psnr = {n: s[n]["shapes"]["psnr"] for n in hf}
    assert max(psnr, key=psnr.get) == "l2", psnr           # ... while PSNR ranks L2 first


def test_shipped_downsampling_factor_trades_reconstruction(lab):
    _, _, s = lab
    for kind in ("photos", "shapes"):
        assert s["f4"][kind]["psnr"] > s["full"][kind]["psnr"] > s["f16"][kind]["psnr"], kind


def test_shipped_summed_kl_collapses_the_posterior_and_vq_collapses_its_codebook(lab):
    evals, models, s = lab
    x = torch.cat(list(evals.values()))
    with torch.no_grad():
        collapsed = models["kl1e-2_sum"].encode(x).latent_dist
        ldm_like = models["kl1e-2"].encode(x).latent_dist
    assert collapsed.std.mean() > 0.8 > 0.5 > ldm_like.std.mean()          # posterior widths near the prior's 1
    assert s["full"]["shapes"]["psnr"] - s["kl1e-2_sum"]["shapes"]["psnr"] > 2
    cb = vae_lab.codebook_stats(models["vq"], x)
    assert cb["usage"] < 0.5 and cb["perplexity"] < cb["used"]
