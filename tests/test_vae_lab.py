"""Image metrics, the KL convention of the VAE loss, and the VAE-losses lab (models, training, shipped variants)."""

import pytest
import torch
import torch.nn.functional as F

from ldm_tutorial import metrics, vae_lab
from ldm_tutorial.losses import Perceptual, VAELoss, VAELossConfig


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
    model = vae_lab.new_model({4: "f4", 8: "kl1e-6", 16: "f16"}[factor])
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
        vae_lab.codebook_stats(vae_lab.new_model("kl1e-6"), _images(1))


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
    _, h = vae_lab.train_variant("kl1e-6", 4, batch=2, lab_data=data, log_every=1, progress=False)
    assert h["g"][:2] == [None, None] and h["g"][2] is not None      # disc_start = 4 * 0.5
    assert all(w is not None and w > 0 for w in h["adaptive_weight"][2:])
    straight, _ = vae_lab.train_variant("l1", 4, batch=2, lab_data=data, progress=False)

    class Crash(Exception):
        pass

    class CrashingData:                   # the process dies while fetching the third batch
        calls = 0

        def batch(self, n, gen):
            self.calls += 1
            if self.calls == 3:
                raise Crash
            return data.batch(n, gen)

    # a run cut off after 2 steps (its checkpoint on disk), then restarted: the same 4-step run,
    # learning-rate schedule and weight average included
    with pytest.raises(Crash):
        vae_lab.train_variant("l1", 4, batch=2, lab_data=CrashingData(), ckpt=tmp_path / "l1.pt",
                              ckpt_every=2, progress=False)
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
    lab = WEIGHTS_DIR / "vae-lab"
    scratch = {n for n, v in vae_lab.VARIANTS.items() if v.base == "scratch"}
    assert {p.parent.name for p in lab.glob("*/config.json")} == scratch
    assert {p.parent.name for p in lab.glob(f"*/{vae_lab.TAIL_FILE}")} == set(vae_lab.VARIANTS) - scratch
    assert {p.name for p in (lab / "perceptual").glob("*.safetensors")} == {
        "trunk-seed0.safetensors", "trunk-seed1.safetensors"}


# ----------------------------------------------------------------------------- shared variants
def test_shared_decode_is_diffusers_decode_and_trains_only_the_last_stages():
    model = vae_lab.new_model("l1")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _images(2)
    with torch.no_grad():
        z = vae_lab.encode(model, x)
        torch.testing.assert_close(vae_lab.decode_shared(model, z), model.decode(z).sample)
    trained = vae_lab.trained_state(model)
    assert set(trained) == {k for k, p in model.named_parameters() if p.requires_grad}
    assert 0.1 < sum(v.numel() for v in trained.values()) / 1e6 < 0.5      # about 0.28M tensors
    data = vae_lab.LabData(photo_frac=1.0)
    assert data.images is None                                             # no scenes rendered
    tuned, _ = vae_lab.train_variant("l1", 2, batch=2, lab_data=data, progress=False)
    after = tuned.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(vae_lab.TRAINED_PREFIXES) for k in moved)
    assert not any(k.startswith("encoder.") or k.startswith("quant_conv") for k in moved)
    with pytest.raises(ValueError, match=r"photo_frac must be in \[0, 1\], got 1.5"):
        vae_lab.LabData(photo_frac=1.5)


def test_shared_variants_return_the_moving_average_of_their_weights():
    data = vae_lab.LabData(photo_frac=1.0, crop=64, seed=0)
    start = vae_lab.trained_state(vae_lab.shared_model())
    runs = {}
    for decay in (0.0, 0.9):
        model, hist = vae_lab.train_variant("l1", 4, batch=1, lab_data=data, progress=False,
                                            ema_decay=decay, lr_schedule="constant")
        assert hist["ema_decay"] == decay
        state = vae_lab.trained_state(model)
        runs[decay] = torch.sqrt(sum(((state[k] - start[k]) ** 2).sum() for k in start))
    # the same steps (same seed and data); the average lags behind the last step
    assert 0 < runs[0.9] < 0.97 * runs[0.0]        # 0.94 measured: diffusers warms the decay up
    _, hist = vae_lab.train_variant("l1", 1, batch=1, lab_data=data, progress=False)
    assert hist["ema_decay"] == vae_lab.SHARED_EMA_DECAY
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        vae_lab.train_variant("l1", 1, batch=1, lab_data=data, progress=False, ema_decay=1.0)
    assert hist["lr_schedule"] == "cosine"
    with pytest.raises(ValueError, match=r"lr_schedule must be 'cosine' or 'constant', got 'step'"):
        vae_lab.train_variant("l1", 1, batch=1, lab_data=data, progress=False, lr_schedule="step")


def test_shared_variants_ship_only_their_stages_and_reject_a_wrong_file(tmp_path):
    from safetensors.torch import load_file, save_file

    model = vae_lab.load_variant("full")
    shipped = load_file(str(vae_lab.LAB_DIR / "full" / vae_lab.TAIL_FILE))
    assert set(shipped) == set(vae_lab.trained_state(model))
    assert all(v.dtype == torch.float16 for v in shipped.values())
    base = vae_lab.shared_model()
    for k, v in model.state_dict().items():               # everything else is the shared decoder
        if k not in shipped:
            torch.testing.assert_close(v, base.state_dict()[k])
    vae_lab.save_variant(model, "full", tmp_path / "full")
    assert (tmp_path / "full" / vae_lab.TAIL_FILE).exists()
    bad = dict(load_file(str(tmp_path / "full" / vae_lab.TAIL_FILE)))
    bad.pop(next(iter(bad)))
    save_file(bad, str(tmp_path / "full" / vae_lab.TAIL_FILE))
    with pytest.raises(ValueError, match="must hold exactly the tensors"):
        vae_lab.load_variant("full", lab_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no shipped decoder stages for variant 'l2'"):
        vae_lab.load_variant("l2", lab_dir=tmp_path)


@pytest.fixture(scope="module")
def lab():
    from ldm_tutorial.losses import Perceptual

    evals = vae_lab.eval_images()
    models = {n: vae_lab.load_variant(n) for n in vae_lab.VARIANTS}
    judge = Perceptual(seed=1)
    scores = {n: {k: vae_lab.measure(m, x, perceptual=judge) for k, x in evals.items()} for n, m in models.items()}
    return evals, models, scores


def test_shipped_loss_terms_buy_high_frequencies_on_held_out_photos(lab):
    _, _, s = lab
    hf = {n: s[n]["photos"]["hf_ratio"] for n in ("l2", "l1", "l1_p", "full")}
    assert hf["full"] > 2 * hf["l2"], hf                  # the chapter's headline: L2 is measurably blurrier
    assert hf["l1"] < hf["l1_p"] < hf["full"], hf         # each term added to L1 raises the ratio
    psnr = {n: s[n]["photos"]["psnr"] for n in hf}
    assert max(psnr, key=psnr.get) == "l2", psnr           # ... while PSNR ranks L2 first


def test_shipped_perceptual_terms_win_on_seen_photos_only(lab):
    evals, models, _ = lab
    judge = Perceptual("photo-trained", seed=1)
    sets = {"seen": vae_lab.seen_images(),
            "held out": evals["photos"]}
    d = {}
    with torch.no_grad():
        for k, x in sets.items():
            for n in ("l2", "l1_p", "full"):
                d[k, n] = judge(vae_lab.reconstruct(models[n], x), x).mean().item()
    assert d["seen", "full"] < d["seen", "l1_p"] < 0.9 * d["seen", "l2"], d   # where they trained
    assert d["held out", "l1_p"] > d["held out", "l2"], d                      # the lab's stated limit


def test_shipped_downsampling_factor_trades_reconstruction(lab):
    _, _, s = lab
    for kind in ("photos", "shapes"):
        assert s["f4"][kind]["psnr"] > s["kl1e-6"][kind]["psnr"] > s["f16"][kind]["psnr"], kind


def test_shipped_summed_kl_collapses_the_posterior_and_vq_collapses_its_codebook(lab):
    evals, models, s = lab
    x = torch.cat(list(evals.values()))
    with torch.no_grad():
        collapsed = models["kl1e-2_sum"].encode(x).latent_dist
        ldm_like = models["kl1e-2"].encode(x).latent_dist
    assert collapsed.std.mean() > 0.8 > 0.5 > ldm_like.std.mean()          # posterior widths near the prior's 1
    assert s["kl1e-6"]["shapes"]["psnr"] - s["kl1e-2_sum"]["shapes"]["psnr"] > 2
    cb = vae_lab.codebook_stats(models["vq"], x)
    assert cb["usage"] < 0.5 and cb["perplexity"] < cb["used"]


# ----------------------------------------------------------------------------- photo-trained perceptual trunk
def _equal_error_distortions():
    x = vae_lab.eval_images()["photos"][:4]
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, 1)
    err = ((blurred - x) ** 2).mean((1, 2, 3), keepdim=True)
    return x, blurred, (x + err.sqrt()).clamp(-1, 1)


def test_photo_trained_trunks_ship_load_and_see_blur_that_a_random_trunk_misses():
    from ldm_tutorial.losses import Perceptual

    x, blurred, shifted = _equal_error_distortions()
    ratio = {}
    with torch.no_grad():
        for name, p in {"random": Perceptual(seed=1), "teacher": Perceptual("photo-trained", seed=0),
                        "judge": Perceptual("photo-trained", seed=1)}.items():
            ratio[name] = (p(x, blurred) / p(x, shifted)).mean().item()
            assert p(x, x).abs().max() < 1e-6
    assert ratio["judge"] > 1.5 * ratio["random"] and ratio["teacher"] > 1.5 * ratio["random"], ratio
    teacher, judge = Perceptual("photo-trained", seed=0), Perceptual("photo-trained", seed=1)
    assert not torch.equal(teacher.stages[0][0].weight, judge.stages[0][0].weight)
    assert teacher.stages[0][0].weight.shape[0] == vae_lab.PERCEPTUAL_WIDTH
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(FileNotFoundError, match=r"--perceptual 7"):
        Perceptual("photo-trained", seed=7)
    hist = vae_lab.load_perceptual_history(1)
    assert hist["val_acc"][-1] > 0.8 and hist["classes"] == 15


def test_train_perceptual_learns_the_pretext_task_and_saves_fp16(tmp_path, monkeypatch):
    from ldm_tutorial import losses

    trunk, hist = vae_lab.train_perceptual(seed=3, steps=30, batch=32, progress=False)
    assert hist["val_acc"][-1] > 3 / 15                # chance is 1/15
    monkeypatch.setattr(losses, "perceptual_weights_path", lambda seed: tmp_path / f"t{seed}.safetensors")
    monkeypatch.setattr(vae_lab, "perceptual_weights_path", lambda seed: tmp_path / f"t{seed}.safetensors")
    path = vae_lab.save_perceptual(trunk, hist, 3)
    loaded = losses.Perceptual("photo-trained", seed=3)
    torch.testing.assert_close(loaded.stages[2][1].weight, trunk[2][1].weight.half().float())
    assert path.with_suffix(".json").exists()
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        vae_lab.train_perceptual(steps=0)
