"""Behaviour the benchmark figures rest on, checked against independent computations or negative cases.

Each test here would fail under a small, realistic bug in the code it covers (a parser match that
ignores an attribute, an SSIM with the wrong data range, a GAN term without its adaptive weight, a flow
stage that trains the epsilon target, ...): see benchmarks/mutation.md for how they were found.
"""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm_tutorial import metrics
from ldm_tutorial.losses import PatchDiscriminator, VAELoss, VAELossConfig
from ldm_tutorial.tinysd import parser, shapes
from ldm_tutorial.tinysd.parser import ParsedObject
from ldm_tutorial.tinysd.shapes import SceneObject


# ----------------------------------------------------------------------------- the parser's scene match
def _parsed(objects):
    return [ParsedObject(o.colour, o.shape, o.size, o.position, (0, 0, 1, 1), np.zeros((2, 2), bool), 1.0)
            for o in objects]


SCENE = [SceneObject("red", "circle", "small", "top left"), SceneObject("blue", "square", "large", "centre")]


def _other(value, allowed):
    return next(v for v in allowed if v != value)


@pytest.mark.parametrize("attribute, allowed", [("colour", shapes.COLOURS), ("shape", shapes.SHAPES),
                                                ("size", shapes.SIZES), ("position", shapes.POSITIONS)])
def test_scene_match_fails_when_any_one_attribute_is_wrong(attribute, allowed):
    assert parser.scene_matches(_parsed(SCENE), SCENE)
    for i in range(len(SCENE)):
        wrong = list(SCENE)
        wrong[i] = dataclasses.replace(SCENE[i], **{attribute: _other(getattr(SCENE[i], attribute), allowed)})
        assert not parser.scene_matches(_parsed(wrong), SCENE), (attribute, i)
        if attribute == "size":                                   # check_size=False ignores exactly that
            assert parser.scene_matches(_parsed(wrong), SCENE, check_size=False)
        else:
            assert not parser.scene_matches(_parsed(wrong), SCENE, check_size=False)


def test_scene_match_fails_on_an_extra_a_missing_or_a_duplicated_object():
    extra = SCENE + [SceneObject("green", "cross", "small", "bottom right")]
    assert not parser.scene_matches(_parsed(extra), SCENE)
    assert not parser.scene_matches(_parsed(SCENE[:1]), SCENE)
    assert not parser.scene_matches(_parsed([SCENE[0], SCENE[0]]), SCENE)       # same count, one twice
    assert not parser.scene_matches(_parsed(SCENE + [SCENE[1]]), SCENE)
    assert parser.scene_matches(_parsed(SCENE[::-1]), SCENE)                    # order does not matter
    assert not parser.scene_matches([], SCENE) and parser.scene_matches([], [])


def test_objects_present_and_fully_correct_need_the_right_object_and_nothing_else():
    from ldm_tutorial.tinysd.evaluate import fully_correct

    moved = [dataclasses.replace(SCENE[0], position="bottom left"), SCENE[1]]
    assert parser.objects_present(_parsed(moved), SCENE) == [False, True]
    assert fully_correct(_parsed(SCENE), SCENE)
    assert not fully_correct(_parsed(SCENE + [SceneObject("green", "cross", "small", "left")]), SCENE)
    assert not fully_correct(_parsed(moved), SCENE)
    # size is not part of "fully correct" (prompts need not state it) but everything else is
    resized = [dataclasses.replace(SCENE[0], size="large"), SCENE[1]]
    assert fully_correct(_parsed(resized), SCENE)


def test_parser_reads_rendered_scenes_with_every_attribute():
    scenes = shapes.sample_scenes(24, seed=4321)
    images = shapes.render(scenes)
    hits = [parser.scene_matches(parser.parse_scene(im), s) for im, s in zip(images, scenes)]
    assert np.mean(hits) >= 0.9
    # the same images read against scenes shifted by one object fail: the match is not trivially true
    shifted = scenes[1:] + scenes[:1]
    assert np.mean([parser.scene_matches(parser.parse_scene(im), s) for im, s in zip(images, shifted)]) < 0.2


# ----------------------------------------------------------------------------- SSIM's data range
def _ssim_by_hand(x: np.ndarray, y: np.ndarray, data_range: float, win: int = 7) -> float:
    """Wang et al.'s SSIM as scikit-image computes it (7x7 uniform window, sample covariance, K1 0.01,
    K2 0.03, border of win // 2 cropped, mean over channels), written out from the formula."""
    from scipy.ndimage import uniform_filter

    c1, c2, pad, norm = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2, win // 2, win**2 / (win**2 - 1)
    scores = []
    for ch in range(x.shape[-1]):
        a, b = x[..., ch].astype(np.float64), y[..., ch].astype(np.float64)
        mu_a, mu_b = uniform_filter(a, win), uniform_filter(b, win)
        var_a = norm * (uniform_filter(a * a, win) - mu_a**2)
        var_b = norm * (uniform_filter(b * b, win) - mu_b**2)
        cov = norm * (uniform_filter(a * b, win) - mu_a * mu_b)
        s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        scores.append(s[pad:-pad, pad:-pad].mean())
    return float(np.mean(scores))


def test_ssim_is_the_formula_with_the_data_range_of_minus_one_to_one():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.25 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    a, b = x.permute(0, 2, 3, 1).numpy(), y.permute(0, 2, 3, 1).numpy()
    want = torch.tensor([_ssim_by_hand(p, q, 2.0) for p, q in zip(a, b)], dtype=torch.float32)
    torch.testing.assert_close(metrics.ssim(x, y), want, atol=1e-4, rtol=0)
    wrong = torch.tensor([_ssim_by_hand(p, q, 1.0) for p, q in zip(a, b)], dtype=torch.float32)
    assert (wrong - want).abs().min() > 1e-3                 # a wrong data range would be seen


def test_psnr_of_a_known_error_is_its_closed_form():
    x = torch.zeros(1, 3, 8, 8)
    assert metrics.psnr(x, x + 0.2).item() == pytest.approx(10 * np.log10(4 / 0.04), abs=1e-4)   # 20 dB


# ----------------------------------------------------------------------------- the GAN term of the VAE loss
def test_generator_loss_with_the_gan_on_is_its_formula():
    torch.manual_seed(0)
    last = torch.nn.Conv2d(8, 3, 3, padding=1)                    # the decoder's last layer
    feats = torch.randn(2, 8, 32, 32)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    kl = torch.tensor([50.0, 70.0])
    disc = PatchDiscriminator(width=8)
    cfg = VAELossConfig(perceptual_weight=0.0, disc_start=0, disc_weight=0.5, kl_weight=1e-6)
    loss_fn = VAELoss(cfg, discriminator=disc)
    x_hat = torch.tanh(last(feats))
    loss, logs = loss_fn.generator_loss(x, x_hat, kl, step=10, last_layer=last.weight)

    rec = (x - x_hat).abs().mean()
    g = -disc(x_hat).mean()
    rec_grad = torch.autograd.grad(rec, last.weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, last.weight, retain_graph=True)[0]
    lam = (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4)
    want = rec + 1e-6 * kl.mean() / (3 * 32 * 32) + 0.5 * lam * g
    torch.testing.assert_close(loss, want)
    assert logs["adaptive_weight"] == pytest.approx(lam.item(), rel=1e-5)
    assert abs(lam.item() - 1.0) > 0.05                           # the weight is not trivially 1 here
    before, _ = loss_fn.generator_loss(x, x_hat, kl, step=-1, last_layer=last.weight)   # warm-up: no GAN term
    torch.testing.assert_close(before, rec + 1e-6 * kl.mean() / (3 * 32 * 32))


# ----------------------------------------------------------------------------- the flow stage's target
def test_flow_stage_regresses_the_velocity_not_the_noise(tmp_path, monkeypatch):
    """The loss the flow stage minimises compares the U-Net with noise - z0 (SD3's velocity)."""
    import shutil

    from ldm_tutorial import tinysd
    from ldm_tutorial.tinysd import train

    made, seen = [], []
    real_targets, real_mse = train.flow_targets, F.mse_loss

    def recording_targets(z0, noise, sigma):
        out = real_targets(z0, noise, sigma)
        made.append((z0.clone(), noise.clone(), out[1].clone()))
        return out

    def recording_mse(pred, target, *a, **k):
        seen.append(target.detach().clone())
        return real_mse(pred, target, *a, **k)

    monkeypatch.setattr(train, "flow_targets", recording_targets)
    monkeypatch.setattr(train.F, "mse_loss", recording_mse)
    out = tmp_path / "w"
    for sub in ("tinysd", "tinyclip"):
        shutil.copytree(tinysd.WEIGHTS_DIR / sub, out / sub)
    train.main(["flow", "--n-scenes", "8", "--batch", "2", "--steps", "2", "--out", str(out),
                "--ckpt-dir", str(tmp_path / "ck")])
    assert len(made) == 2 and len(seen) == 2
    for (z0, noise, target), used in zip(made, seen):
        torch.testing.assert_close(target, noise - z0)
        torch.testing.assert_close(used, noise - z0)              # the velocity, not the noise
        assert (used - noise).abs().max() > 0.1


# ----------------------------------------------------------------------------- resuming a training stage
RESUME_STAGES = {                      # stage -> (extra arguments, shipped folders it needs)
    "clip": (["--batch", "4"], ()),
    "vae": (["--batch", "2"], ("tinysd",)),
    "unet": (["--batch", "2"], ("tinysd", "tinyclip")),
    "inpaint": (["--batch", "2"], ("tinysd",)),
    "taesd": (["--batch", "2"], ("tinysd",)),
    "flow": (["--batch", "2"], ("tinysd",)),
}


@pytest.mark.parametrize("stage", sorted(RESUME_STAGES))
def test_resuming_n_plus_m_steps_equals_n_plus_m_straight(stage, tmp_path):
    """A stage stopped after 1 step and resumed to 2 ends exactly where 2 steps in one go end, and the
    second step really trained (a restart from scratch, or a resume that drops its state, fails)."""
    import shutil

    from ldm_tutorial import tinysd
    from ldm_tutorial.tinysd import train

    extra, needs = RESUME_STAGES[stage]

    def run(name, steps):
        out = tmp_path / name / "w"
        if not out.exists():
            for sub in needs:
                shutil.copytree(tinysd.WEIGHTS_DIR / sub, out / sub)
        train.main([stage, "--n-scenes", "8", "--steps", str(steps), "--seed", "3", "--out", str(out),
                    "--ckpt-dir", str(tmp_path / name / "ck"), *extra])
        ck = next((tmp_path / name / "ck").glob("*.pt"))
        return torch.load(ck, map_location="cpu", weights_only=False)

    straight = run("straight", 2)
    first = run("resumed", 1)
    resumed = run("resumed", 2)
    assert straight["step"] == resumed["step"] == 2 and first["step"] == 1
    moved = 0.0
    for key, value in straight["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(resumed["model"][key], value, atol=1e-6, rtol=1e-5, msg=key)
            moved = max(moved, (value - first["model"][key]).abs().max().item())
    assert moved > 0, "the second step changed nothing: the comparison would be vacuous"


# ----------------------------------------------------------------------------- metrics against numpy
def _spectrum_by_hand(x: torch.Tensor, n_bins: int):
    """The radial luminance power spectrum written out in numpy, from its docstring's definition."""
    a = x.double().numpy()
    luma = 0.299 * a[:, 0] + 0.587 * a[:, 1] + 0.114 * a[:, 2]              # (B, H, W)
    luma = luma - luma.mean(axis=(1, 2), keepdims=True)
    h, w = luma.shape[1:]
    window = np.outer(np.hanning(h), np.hanning(w))                          # symmetric Hann
    power = np.abs(np.fft.fftshift(np.fft.fft2(luma * window), axes=(1, 2))) ** 2
    fy, fx = np.fft.fftshift(np.fft.fftfreq(h)), np.fft.fftshift(np.fft.fftfreq(w))
    radius = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    edges = np.linspace(0, 0.5, n_bins + 1)
    idx = np.clip(np.digitize(radius, edges[1:-1], right=True), 0, n_bins - 1)
    mean_power = power.mean(0)
    sums = np.bincount(idx.ravel(), mean_power.ravel(), n_bins)
    counts = np.bincount(idx.ravel(), minlength=n_bins)
    return (edges[:-1] + edges[1:]) / 2, sums / np.maximum(counts, 1)


@pytest.mark.parametrize("shape, n_bins", [((3, 3, 32, 32), None), ((2, 3, 24, 40), 7)])
def test_radial_power_spectrum_equals_the_numpy_definition(shape, n_bins):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=g) * 2 - 1
    x[:, 0] *= 0.5                                           # channels differ, so the luma weights matter
    f, p = metrics.radial_power_spectrum(x, n_bins=n_bins)
    want_f, want_p = _spectrum_by_hand(x, n_bins or min(shape[2:]) // 2)
    np.testing.assert_allclose(f.numpy(), want_f, rtol=1e-6)
    np.testing.assert_allclose(p.double().numpy(), want_p, rtol=2e-4)


def test_spectrum_finds_a_sinusoid_and_ignores_the_mean():
    size, freq = 64, 0.25                                    # 16 cycles across 64 pixels
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    wave = 0.5 * torch.cos(2 * torch.pi * freq * xx).expand(1, 3, size, size)
    f, p = metrics.radial_power_spectrum(wave)
    assert abs(f[p.argmax()].item() - freq) <= 0.5 / len(f)
    _, p_shifted = metrics.radial_power_spectrum((wave + 0.4).clamp(-1, 1))
    torch.testing.assert_close(p_shifted, p, rtol=1e-4, atol=1e-6)          # brightness is not power


@pytest.mark.parametrize("fn", [lambda x: metrics.radial_power_spectrum(x),
                                lambda x: metrics.high_freq_ratio(x, x),
                                lambda x: metrics.ssim(x, x), lambda x: metrics.psnr(x, x)])
def test_metrics_name_the_bad_argument(fn):
    with pytest.raises(ValueError, match=r"^x must be a \(B, 3, H, W\) tensor, got \(3, 8, 8\)$"):
        fn(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"^x must be a \(B, 3, H, W\) tensor, got list$"):
        fn([0.0])
    with pytest.raises(ValueError, match=r"^x must be in \[-1, 1\], got values in \[0, 255\]$"):
        fn(torch.full((1, 3, 4, 4), 255.0).index_fill_(2, torch.tensor([0]), 0.0))


def test_psnr_mask_and_ratio_cutoff_errors_say_what_is_expected():
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"^mask must be a bool tensor of shape \(2, 1, 8, 8\), "
                                         r"got torch.bool \(2, 3, 8, 8\)$"):
        metrics.psnr(x, x, mask=torch.ones(2, 3, 8, 8, dtype=torch.bool))
    for cutoff in (0.0, 0.5, -0.1):
        with pytest.raises(ValueError, match=rf"^cutoff must be in \(0, 0.5\) cycles per pixel, got {cutoff}$"):
            metrics.high_freq_ratio(x, x, cutoff=cutoff)
    with pytest.raises(ValueError, match=r"^x and y must have the same shape, got \(2, 3, 8, 8\) and \(1, 3, 8, 8\)$"):
        metrics.psnr(x, x[:1])


def test_high_freq_ratio_is_the_band_power_ratio():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = (x * 0.5).clamp(-1, 1)
    f, p_y = metrics.radial_power_spectrum(y)
    _, p_x = metrics.radial_power_spectrum(x)
    for cutoff in (0.1, 0.25, 0.4):
        band = f >= cutoff
        want = float(p_y[band].sum() / p_x[band].sum())
        assert metrics.high_freq_ratio(y, x, cutoff=cutoff) == pytest.approx(want, rel=1e-6)
    assert metrics.high_freq_ratio(y, x) == pytest.approx(0.25, rel=1e-4)      # half the amplitude


# ----------------------------------------------------------------------------- schedules
def test_schedule_formulas_against_their_closed_forms():
    from ldm_tutorial import schedules

    a = torch.tensor([0.9, 0.5, 0.01], dtype=torch.float64)
    torch.testing.assert_close(schedules.ddpm_log_snr(a.float()), torch.log(a / (1 - a)), rtol=1e-6, atol=1e-6)
    s = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(schedules.flow_log_snr(s), (2 * torch.log((1 - s) / s)).double(), rtol=1e-6, atol=1e-6)
    assert schedules.flow_log_snr(torch.tensor([0.5])).item() == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(schedules.shift_sigmas(s, 3.0), 3 * s / (1 + 2 * s))
    torch.testing.assert_close(schedules.shift_sigmas(s, 1.0), s)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"^shift must be > 0, got {bad}$"):
            schedules.shift_sigmas(s, bad)
    with pytest.raises(ValueError, match=r"^sigmas must be in \(0, 1\], got \[0, 0.5\]$"):
        schedules.flow_log_snr(torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match=r"^sigmas must be in \(0, 1\], got \[0.5, 1.5\]$"):
        schedules.flow_log_snr(torch.tensor([0.5, 1.5]))


# ----------------------------------------------------------------------------- runtime
def test_colab_detection_and_the_runtime_line(monkeypatch):
    import sys

    from ldm_tutorial import runtime

    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert runtime.in_colab() is False
    monkeypatch.setitem(sys.modules, "google.colab", object())
    assert runtime.in_colab() is True
    info = runtime.RuntimeInfo(device=torch.device("cuda"), dtype=torch.float16, colab=True, hub=True,
                               reason="online -> sd15")
    assert str(info) == "device=cuda dtype=float16 colab hub=online -> sd15"
    info = runtime.RuntimeInfo(device=torch.device("cpu"), dtype=torch.float32, colab=False, hub=False,
                               reason="offline (HF_HUB_OFFLINE=1) -> TinySD")
    assert str(info) == "device=cpu dtype=float32 hub=offline (HF_HUB_OFFLINE=1) -> TinySD"


def test_describe_runtime_picks_sd15_only_with_cuda_and_the_hub(monkeypatch):
    from ldm_tutorial import runtime

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(runtime, "_probe", lambda host, timeout: host == "huggingface.co")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    info = runtime.describe_runtime()
    assert (info.device.type, info.dtype, info.hub, info.reason) == ("cuda", torch.float16, True, "online -> sd15")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = runtime.describe_runtime()
    assert (info.device.type, info.dtype, info.reason) == ("cpu", torch.float32, "online -> TinySD")
    monkeypatch.setattr(runtime, "_probe", lambda host, timeout: False)
    assert runtime.describe_runtime().reason == "offline (huggingface.co unreachable) -> TinySD"


def test_seed_everything_returns_a_seeded_cpu_generator():
    from ldm_tutorial import runtime

    g = runtime.seed_everything(5)
    assert g.device.type == "cpu" and g.initial_seed() == 5
    torch.testing.assert_close(torch.randn(3, generator=g), torch.randn(3, generator=torch.Generator().manual_seed(5)))


def test_cpu_name_reads_the_model_name():
    from pathlib import Path

    from ldm_tutorial import runtime

    name = runtime.cpu_name()
    info = Path("/proc/cpuinfo")
    if info.exists() and "model name" in info.read_text():
        line = next(l for l in info.read_text().splitlines() if l.startswith("model name"))
        assert name == line.split(":", 1)[1].strip()
    assert isinstance(name, str) and name


# ----------------------------------------------------------------------------- tinysd's error paths
@pytest.mark.parametrize("call, error, pattern", [
    (lambda t: t.pipeline_dir("video"), ValueError, r"^task must be one of \['text2img', 'img2img', 'inpaint'\], "
                                                    r"got 'video'$"),
    (lambda t: t.component_dir("decoder"), ValueError, r"^name must be one of \[.*'vae', 'vae_groupnorm'\], got 'decoder'$"),
    (lambda t: t.load_scaling_unet("half"), ValueError, r"^variant must be one of \['scaled', 'unscaled'\], "
                                                        r"got 'half'$"),
    (lambda t: t.component_dir("unet", weights_dir="/nonexistent"), FileNotFoundError,
     r"TinySD component 'unet' is not shipped at /nonexistent/tinysd/unet; train it with"),
    (lambda t: t.load_signal_leak(weights_dir="/nonexistent"), FileNotFoundError,
     r"TinySD component 'signal_leak' is not shipped at /nonexistent/tinysd-signal-leak; fit it with "
     r"`python -m ldm_tutorial.tinysd.leak --out ROOT`"),
    (lambda t: t.load_flow_unet(weights_dir="/nonexistent"), FileNotFoundError,
     r"TinySD's flow U-Net is not shipped at /nonexistent/tinysd-flow/unet; train it with .*flow --continue-shipped"),
    (lambda t: t.load_flow_unet(weights_dir="/nonexistent", control=True), FileNotFoundError,
     r"TinySD's epsilon control U-Net is not shipped at .*unet --continue-shipped"),
    (lambda t: t.load_scaling_unet("scaled", weights_dir="/nonexistent"), FileNotFoundError,
     r"the scaled comparison U-Net is not shipped at"),
])
def test_tinysd_refuses_what_it_cannot_load_with_a_clear_message(call, error, pattern):
    from ldm_tutorial import tinysd

    with pytest.raises(error, match=pattern):
        call(tinysd)


def test_objective_comparison_refuses_a_pipeline_it_cannot_use():
    import ldm_tutorial as ldm
    from ldm_tutorial import tinysd

    inpaint = ldm.load_pipeline("tiny", task="inpaint", verbose=False)
    with pytest.raises(ValueError, match=r"^pipe must be TinySD's text-to-image pipeline .* got a 9-channel U-Net"):
        tinysd.objective_comparison(inpaint)


# ----------------------------------------------------------------------------- the parser, on drawn pixels
def _canvas(size=128):
    return np.full((size, size, 3), 0.5, np.float32)              # grey: no chroma, no object


def _block(img, x0, y0, w, h, rgb=(215, 35, 35)):
    img[y0:y0 + h, x0:x0 + w] = np.array(rgb, np.float32) / 255
    return img


def test_to_numpy_image_converts_every_input_kind_and_names_bad_ones():
    from PIL import Image

    g = np.random.default_rng(0)
    u8 = g.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    want = u8.astype(np.float32) / 255
    np.testing.assert_array_equal(parser.to_numpy_image(u8), want)
    np.testing.assert_array_equal(parser.to_numpy_image(Image.fromarray(u8)), want)
    np.testing.assert_array_equal(parser.to_numpy_image(Image.fromarray(u8).convert("RGBA")), want)
    grey = Image.fromarray(u8[..., 0])                               # mode L becomes three equal channels
    np.testing.assert_array_equal(parser.to_numpy_image(grey), np.repeat(want[..., :1], 3, -1))
    assert parser.to_numpy_image(want.astype(np.float64)).dtype == np.float32
    t = torch.from_numpy(want).permute(2, 0, 1) * 2 - 1              # (3, H, W) in [-1, 1]
    np.testing.assert_allclose(parser.to_numpy_image(t), want, atol=1e-6)
    for bad, pattern in [
        (torch.zeros(1, 4, 4), r"^image tensor must be \(3, H, W\) in \[-1, 1\], got shape \(1, 4, 4\)$"),
        (torch.zeros(3, 4), r"^image tensor must be \(3, H, W\) in \[-1, 1\], got shape \(3, 4\)$"),
        (torch.full((3, 4, 4), 3.0), r"^image tensor must be in \[-1, 1\], got \[3.00, 3.00\]$"),
        (torch.full((3, 4, 4), -3.0), r"^image tensor must be in \[-1, 1\], got \[-3.00, -3.00\]$"),
        (np.zeros((4, 4)), r"^image array must be \(H, W, 3\), got shape \(4, 4\)$"),
        (np.zeros((4, 4, 4)), r"^image array must be \(H, W, 3\), got shape \(4, 4, 4\)$"),
        (np.full((4, 4, 3), 2.0), r"^float image array must be in \[0, 1\], got \[2.00, 2.00\]$"),
        (np.full((4, 4, 3), -0.5), r"^float image array must be in \[0, 1\], got \[-0.50, -0.50\]$"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            parser.to_numpy_image(bad)


def test_hue_matches_colorsys():
    import colorsys

    rgb = np.random.default_rng(1).random((200, 3)).astype(np.float32)
    want = np.array([colorsys.rgb_to_hsv(*p)[0] for p in rgb])
    got = parser._hue(rgb)
    circular = np.minimum(np.abs(got - want), 1 - np.abs(got - want))
    assert circular.max() < 1e-5


def test_square_template_fills_its_box_exactly():
    temps = parser._templates((10, 20, 30, 40), (64, 64))
    square = temps[shapes.SHAPES.index("square")]
    want = np.zeros((64, 64), bool)
    want[20:40, 10:30] = True
    np.testing.assert_array_equal(square, want)
    circle = temps[shapes.SHAPES.index("circle")]
    assert abs(circle.sum() - np.pi * 10**2) < 0.05 * np.pi * 10**2         # a disc of radius side / 2
    assert not circle[~want].any() and circle[29, 19] and circle[30, 20]   # inside its box, centred
    np.testing.assert_array_equal(circle[20:40, 10:30], circle[20:40, 10:30][::-1, ::-1])


def test_parser_reads_box_size_position_and_order_from_drawn_blocks():
    img = _block(_canvas(), 20, 30, 27, 27)                              # side 27 = midway: large
    img = _block(img, 90, 95, 20, 20, (40, 80, 215))                     # a small blue square
    objs = parser.parse_scene(img)
    assert [o.colour for o in objs] == ["red", "blue"]                   # largest first
    red, blue = objs
    assert red.box == (20, 30, 47, 57) and blue.box == (90, 95, 110, 115)
    assert (red.shape, red.size, red.position) == ("square", "large", "left")
    assert (blue.shape, blue.size, blue.position) == ("square", "small", "bottom right")
    assert red.shape_iou > 0.99 and red.mask.sum() == 27 * 27


def test_parser_area_threshold_connectivity_and_small_specks():
    # exactly the minimum area counts, one pixel less does not
    assert len(parser.parse_scene(_block(_canvas(), 50, 50, 6, 10))) == 1            # 60 pixels
    assert parser.parse_scene(_block(_block(_canvas(), 50, 50, 6, 9), 56, 50, 1, 5)) == []   # 59
    # a speck of the same colour before a real object (component 1) does not hide the object
    img = _block(_block(_canvas(), 2, 2, 4, 4), 60, 60, 30, 30)
    assert [(o.colour, o.size) for o in parser.parse_scene(img)] == [("red", "large")]
    # two blocks touching at a corner are one object (8-connectivity), as a drawn cross's arms are
    img = _block(_block(_canvas(), 30, 30, 8, 8), 38, 38, 8, 8)
    assert len(parser.parse_scene(img)) == 1
    # the threshold scales with the image: a 64x64 image's 3x3 speck is noise, its shapes are not
    half = shapes.render(shapes.sample_scenes(8, seed=77), size=64)
    scenes = shapes.sample_scenes(8, seed=77)
    assert np.mean([parser.scene_matches(parser.parse_scene(im), s) for im, s in zip(half, scenes)]) >= 0.75
    speck = _block(_canvas(64), 10, 10, 3, 3)
    assert parser.parse_scene(speck) == []


def test_parser_hue_wraps_around_red():
    import colorsys

    rgb = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(0.97, 0.85, 0.85))   # red, leaning purple
    (obj,) = parser.parse_scene(_block(_canvas(), 40, 40, 30, 30, rgb))
    assert obj.colour == "red"


def test_objects_present_checks_size_only_when_asked():
    wrong_size = [dataclasses.replace(SCENE[0], size="large"), SCENE[1]]
    assert parser.objects_present(_parsed(wrong_size), SCENE) == [True, True]
    assert parser.objects_present(_parsed(wrong_size), SCENE, check_size=True) == [False, True]


# ----------------------------------------------------------------------------- losses, paths, boundaries
def test_hinge_discriminator_loss_is_its_formula_and_waits_for_the_gan():
    from ldm_tutorial.losses import hinge_d_loss

    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(2, 1, 5, 5, generator=g) * 2, torch.randn(2, 1, 5, 5, generator=g) * 2
    want = 0.5 * (torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean())
    torch.testing.assert_close(hinge_d_loss(real, fake), want)
    loss = VAELoss(VAELossConfig(use_gan=False, perceptual_weight=0.0), discriminator=PatchDiscriminator(width=8))
    x = torch.zeros(1, 3, 32, 32)
    assert loss.discriminator_loss(x, x, step=10**6) is None               # no GAN: never a D loss


def test_random_feature_perceptual_network_is_the_documented_one():
    """Three VGG-style stages (widths 32, 64, 128, max-pool between), He-initialised from a seeded
    generator: rebuilt here from that description, it gives the same distances."""
    from ldm_tutorial.losses import Perceptual

    g = torch.Generator().manual_seed(0)
    chans, stages = [3, 32, 64, 128], []
    for i in range(3):
        convs = []
        for cin, cout in ((chans[i], chans[i + 1]), (chans[i + 1], chans[i + 1])):
            conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
            conv.weight.data = torch.randn(conv.weight.shape, generator=g) * (2 / (cin * 9)) ** 0.5
            conv.bias.data.zero_()
            convs += [conv, torch.nn.ReLU()]
        stages.append(torch.nn.Sequential(*([torch.nn.MaxPool2d(2)] if i else []), *convs))

    def by_hand(x, y):
        total = x.new_zeros(x.shape[0])
        for stage in stages:
            x, y = stage(x), stage(y)
            nx, ny = x / (x.norm(dim=1, keepdim=True) + 1e-10), y / (y.norm(dim=1, keepdim=True) + 1e-10)
            total = total + ((nx - ny) ** 2).sum(1).mean((1, 2))
        return total

    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    perc = Perceptual()
    assert perc.kind == "random-vgg"
    with torch.no_grad():
        torch.testing.assert_close(perc(x, y), by_hand(x, y))
        assert not torch.allclose(Perceptual(seed=1)(x, y), perc(x, y))      # the seed is the network
    with pytest.raises(ValueError, match=r"^kind must be one of 'random-vgg', 'photo-trained', 'lpips', got 'vgg'$"):
        Perceptual(kind="vgg")


def test_noising_paths_are_their_formulas():
    from ldm_tutorial import schedules

    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    a = torch.tensor([0.9, 0.4, 0.05])
    vp = schedules.vp_path(x0, noise, a)
    s = torch.tensor([0.0, 0.3, 1.0])
    flow = schedules.flow_path(x0, noise, s)
    assert vp.shape == flow.shape == (3, 2, 3) and vp.dtype == flow.dtype == torch.float64
    for i in range(3):
        ai, si = a[i].double(), s[i].double()
        torch.testing.assert_close(vp[i], ai.sqrt() * x0 + (1 - ai).sqrt() * noise)
        torch.testing.assert_close(flow[i], (1 - si) * x0 + si * noise)


def test_metric_input_checks_at_their_boundaries():
    ok = torch.zeros(1, 3, 4, 4)
    for value in (-1.01, 1.01, -1.0, 1.0):
        metrics.psnr(ok.fill_(value), ok)                         # the stated tolerance, inclusive
    for value in (-1.5, 1.5):
        with pytest.raises(ValueError, match=r"^x must be in \[-1, 1\]"):
            metrics.psnr(torch.full((1, 3, 4, 4), value), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"^x must be a \(B, 3, H, W\) tensor, got \(1, 4, 8, 8\)$"):
        metrics.psnr(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"^y must be a \(B, 3, H, W\) tensor, got \(1, 4, 8, 8\)$"):
        metrics.psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 4, 8, 8))
    # a mask that keeps one pixel: the PSNR of that pixel alone
    x, y = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    y[0, :, 1, 2] = 0.5
    keep = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    keep[0, 0, 1, 2] = True
    assert metrics.psnr(x, y, mask=keep).item() == pytest.approx(10 * np.log10(4 / 0.25), abs=1e-4)


def test_high_freq_ratio_band_includes_its_cutoff_and_works_for_faint_images():
    g = torch.Generator().manual_seed(6)
    x = (torch.rand(1, 3, 32, 32, generator=g) * 2 - 1) * 0.01           # band power far below 1
    y = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)                # blurred: the ratio varies by bin
    f, p_y = metrics.radial_power_spectrum(y)
    _, p_x = metrics.radial_power_spectrum(x)
    cutoff = float(f[8])                                                 # exactly a bin centre
    band = f >= cutoff
    want = float(p_y[band].sum() / p_x[band].sum())
    without = float(p_y[f > cutoff].sum() / p_x[f > cutoff].sum())
    assert p_x[band].sum() < 0.1 and abs(want - without) > 1e-3 * want
    assert metrics.high_freq_ratio(y, x, cutoff=cutoff) == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------- runtime details
def test_probe_connects_to_port_443_with_its_timeout_in_a_daemon_thread(monkeypatch):
    import threading

    from ldm_tutorial import runtime

    calls, threads = [], []

    class Conn:
        def __enter__(self):
            threads.append(threading.current_thread())
            return self

        def __exit__(self, *exc):
            return False

    def fake_connect(address, timeout=None):
        calls.append((address, timeout))
        if address[0] == "down.example":
            raise OSError("refused")
        return Conn()

    monkeypatch.setattr(runtime.socket, "create_connection", fake_connect)
    monkeypatch.setattr(runtime, "_PROBES", {})
    assert runtime._probe("up.example", 1.5) is True
    assert runtime._probe("down.example", 1.5) is False              # another host: probed, not the cache
    assert runtime._probe("up.example", 0.5) is True
    assert calls == [(("up.example", 443), 1.5), (("down.example", 443), 1.5), (("up.example", 443), 0.5)]
    assert threads[0].daemon and threads[0].name == "ldm-hub-probe-up.example"


@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), ("TRUE", True), (" Yes ", True),
                                            ("on", True), ("0", False), ("", False), ("no", False)])
def test_offline_variables_are_read_case_and_space_insensitively(monkeypatch, value, offline):
    from ldm_tutorial import runtime

    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert (runtime._offline_reason() == "HF_HUB_OFFLINE=1") is offline


def test_hub_timeout_of_five_seconds_is_allowed_and_colab_is_reported(monkeypatch):
    import sys

    from ldm_tutorial import runtime

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert runtime.hub_available(timeout=5) is False                  # accepted (offline: no probe)
    monkeypatch.setitem(sys.modules, "google.colab", object())
    info = runtime.describe_runtime()
    assert info.colab is True and " colab " in str(info)


def test_cpu_name_keeps_colons_in_the_model_name_and_falls_back(monkeypatch):
    import io

    from ldm_tutorial import runtime

    text = "processor\t: 0\nmodel name\t: Vendor(R) CPU: Model X @ 2.00GHz\nflags\t: fpu\n"
    monkeypatch.setattr(runtime, "open", lambda *a, **k: io.StringIO(text), raising=False)
    assert runtime.cpu_name() == "Vendor(R) CPU: Model X @ 2.00GHz"

    def missing(*a, **k):
        raise OSError("no /proc here")

    monkeypatch.setattr(runtime, "open", missing, raising=False)
    monkeypatch.setattr("platform.processor", lambda: "")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert runtime.cpu_name() == "x86_64"
    monkeypatch.setattr("platform.processor", lambda: "i386")
    assert runtime.cpu_name() == "i386"


def test_patch_discriminator_is_pix2pix_70x70_patchgan():
    """pix2pix's PatchGAN with 3 layers judges 70x70 patches (Isola et al. 2017): the receptive field
    of one logit, from the convolutions' kernels and strides, is 70 pixels; a 128x128 image gives a
    14x14 grid of logits; LeakyReLU(0.2) and a GroupNorm after each inner convolution."""
    disc = PatchDiscriminator(width=8)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    field = 1
    for conv in reversed(convs):                        # r_in = (r_out - 1) * stride + kernel
        field = (field - 1) * conv.stride[0] + conv.kernel_size[0]
    assert field == 70 and [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 1] and convs[0].in_channels == 3
    assert all(c.padding == (1, 1) for c in convs)
    assert disc(torch.zeros(1, 3, 128, 128)).shape == (1, 1, 14, 14)
    slopes = {m.negative_slope for m in disc.modules() if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.2} and sum(isinstance(m, torch.nn.GroupNorm) for m in disc.modules()) == 3
    assert [c.bias is None for c in convs] == [False, True, True, True, False]    # the norm has the bias
    assert PatchDiscriminator(width=8, n_layers=2)(torch.zeros(1, 3, 128, 128)).shape == (1, 1, 30, 30)


# ----------------------------------------------------------------------------- the autoencoder loss, term by term
class _FakeLPIPS(torch.nn.Module):
    """The `lpips` package's interface (lpips.LPIPS, v0.1): `net` defaults to "alex", `verbose` to True
    (it prints a set-up line), and calling it on two (B, 3, H, W) batches returns (B, 1, 1, 1)."""

    made: list = []

    def __init__(self, pretrained=True, net="alex", version="0.1", lpips=True, spatial=False,
                 pnet_rand=False, pnet_tune=False, use_dropout=True, model_path=None, eval_mode=True,
                 verbose=True):
        super().__init__()
        _FakeLPIPS.made.append({"net": net, "verbose": verbose})
        if verbose:
            print(f"Setting up [LPIPS] perceptual loss: trunk [{net}], v[{version}], spatial [off]")
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, in0, in1):
        return self.scale * ((in0 - in1) ** 2).mean((1, 2, 3), keepdim=True) + in0.mean((1, 2, 3), keepdim=True)


def test_lpips_kind_builds_the_vgg_lpips_quietly_and_calls_it_on_both_images(monkeypatch, capsys):
    """LDM's autoencoder uses LPIPS with the VGG16 trunk (taming-transformers' LPIPS); the real package
    is not installed here, so a stand-in with its interface records how it is built and called."""
    import sys
    import types

    from ldm_tutorial.losses import Perceptual

    _FakeLPIPS.made = []
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=_FakeLPIPS))
    perc = Perceptual(kind="lpips")
    assert perc.kind == "lpips" and _FakeLPIPS.made == [{"net": "vgg", "verbose": False}]
    assert capsys.readouterr().out == ""
    assert not any(p.requires_grad for p in perc.parameters())         # frozen, as the random trunk
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(3, 3, 8, 8, generator=g), torch.rand(3, 3, 8, 8, generator=g)
    want = ((x - y) ** 2).mean((1, 2, 3)) + x.mean((1, 2, 3))             # (x, y) in that order
    torch.testing.assert_close(perc(x, y), want)
    assert perc(x, y).shape == (3,)


def test_the_random_perceptual_trunk_is_frozen():
    from ldm_tutorial.losses import Perceptual

    perc = Perceptual(width=8)
    assert sum(p.numel() for p in perc.parameters()) > 0
    assert not any(p.requires_grad for p in perc.parameters()) and not perc.training


def test_patch_discriminator_caps_its_width_at_eight_times_the_first_layer():
    """pix2pix's NLayerDiscriminator: channels ndf * min(2**n, 8), so a 5-layer one stops growing at 8x."""
    disc = PatchDiscriminator(width=4, n_layers=5)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 16, 32, 32, 32, 1]


def test_adaptive_weight_is_clamped_to_ten_thousand_and_is_a_constant():
    """taming-transformers clamps the adaptive weight to [0, 1e4]: a GAN loss that barely touches the
    last layer would otherwise get a weight of ||grad rec|| / 1e-4."""
    from ldm_tutorial.losses import adaptive_weight

    last = torch.nn.Parameter(torch.ones(4, 4))
    rec = (last ** 2).sum()                                   # gradient 2 everywhere: norm 8
    tiny_g = 1e-9 * last.sum()
    w = adaptive_weight(rec, tiny_g, last)
    assert w.item() == 1e4 and not w.requires_grad
    assert adaptive_weight(rec, tiny_g, last, max_weight=50.0).item() == 50.0
    g = 2.0 * last.sum()                                      # gradient 2 everywhere: norm 8
    assert adaptive_weight(rec, g, last).item() == pytest.approx(8 / (8 + 1e-4))


def _loss_inputs(batch=2, side=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, side, side, generator=gen) * 2 - 1
    x_hat = (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    return x, x_hat, torch.tensor([40.0, 90.0][:batch])


def test_generator_loss_l1_l2_perceptual_and_kl_terms_are_their_formulas():
    from ldm_tutorial.losses import Perceptual

    x, x_hat, kl = _loss_inputs()
    perc = Perceptual(width=8, seed=3)
    cfg = VAELossConfig(l1_weight=1.0, l2_weight=0.5, perceptual_weight=0.7, kl_weight=1e-3, use_gan=False)
    loss, logs = VAELoss(cfg, perceptual=perc).generator_loss(x, x_hat, kl, step=0, last_layer=None)
    with torch.no_grad():
        p = perc(x, x_hat).mean()
    rec = (x - x_hat).abs().mean() + 0.5 * ((x - x_hat) ** 2).mean() + 0.7 * p
    want = rec + 1e-3 * kl.mean() / (3 * 16 * 16)
    torch.testing.assert_close(loss, want)
    assert logs == pytest.approx({"rec": rec.item(), "kl": 65.0, "loss": want.item()}, rel=1e-6)
    # the perceptual network passed in is the one used, not a default one built beside it
    default = VAELoss(cfg).generator_loss(x, x_hat, kl, step=0, last_layer=None)[0]
    assert abs(default.item() - loss.item()) > 1e-4


def test_kl_term_of_a_batch_of_one_divides_by_the_pixel_values_of_one_image():
    x, _, kl = _loss_inputs(batch=1, side=8)
    term = VAELoss(VAELossConfig(kl_weight=1.0, perceptual_weight=0.0, use_gan=False)).kl_term(kl, x)
    assert term.item() == pytest.approx(40.0 / (3 * 8 * 8))


def test_without_a_last_layer_the_gan_term_has_weight_one_and_starts_at_disc_start():
    x, x_hat, kl = _loss_inputs(side=32)
    disc = PatchDiscriminator(width=8)
    cfg = VAELossConfig(perceptual_weight=0.0, kl_weight=0.0, disc_weight=0.5, disc_start=5)
    loss_fn = VAELoss(cfg, discriminator=disc)
    loss, logs = loss_fn.generator_loss(x, x_hat, kl, step=5, last_layer=None)
    g = -disc(x_hat).mean()
    torch.testing.assert_close(loss, (x - x_hat).abs().mean() + 0.5 * g)
    assert logs["adaptive_weight"] == 1.0 and logs["g"] == pytest.approx(g.item())
    assert loss_fn.discriminator_loss(x, x_hat, step=4) is None             # the discriminator waits too
    assert loss_fn.discriminator_loss(x, x_hat, step=5) is not None


# ----------------------------------------------------------------------------- parser and path edges
def test_to_numpy_image_accepts_its_tolerance_and_clamps_into_0_1():
    t = torch.zeros(3, 2, 2)
    t[0, 0, 0], t[1, 0, 0], t[2, 0, 0] = -1.01, 1.01, -1.005          # inside the 0.01 tolerance
    t[0, 1, 1] = 1.005
    out = parser.to_numpy_image(t)
    assert out.min() == 0.0 and out.max() == 1.0                        # clamped, not 1.0025
    assert (out[0, 0] == [0.0, 1.0, 0.0]).all() and out[1, 1, 0] == 1.0
    for beyond in (-1.02, 1.02):
        with pytest.raises(ValueError, match="must be in"):
            parser.to_numpy_image(torch.full((3, 2, 2), beyond))
    edge = np.zeros((2, 2, 3))
    edge[0, 0, 0], edge[1, 1, 1] = -1e-3, 1 + 1e-3                      # float arrays: 1e-3 of slack
    np.testing.assert_array_equal(parser.to_numpy_image(edge), edge.astype(np.float32))
    assert parser.to_numpy_image(np.ones((2, 2, 3))).max() == 1.0
    with pytest.raises(ValueError, match="must be in"):
        parser.to_numpy_image(np.full((2, 2, 3), 1.002))


def test_square_template_of_a_taller_box_is_the_box():
    """A square of side max(w, h) centred on a 10-wide, 11-tall box covers pixel centres strictly inside
    it: the box's 10 columns (the next columns' centres lie exactly on the square's edge) and 11 rows."""
    square = parser._templates((10, 10, 20, 21), (32, 32))[shapes.SHAPES.index("square")]
    want = np.zeros((32, 32), bool)
    want[10:21, 10:20] = True
    np.testing.assert_array_equal(square, want)


def test_foreground_is_chroma_strictly_above_its_threshold():
    at = _block(_canvas(), 40, 40, 30, 30, (0, 0, 0))
    at[40:70, 40:70, 0] = parser.CHROMA_MIN                              # chroma exactly 0.30: background
    assert parser.parse_scene(at) == []
    above = _block(_canvas(), 40, 40, 30, 30, (0, 0, 0))
    above[40:70, 40:70, 0] = parser.CHROMA_MIN + 0.01
    assert len(parser.parse_scene(above)) == 1


def test_a_parsed_object_as_a_scene_object_is_the_rendered_one():
    scene = shapes.Scene([SceneObject("green", "triangle", "large", "bottom left")])
    (obj,) = parser.parse_scene(shapes.render([scene])[0])
    assert obj.as_scene_object() == scene.objects[0]
    assert parser.scene_matches([obj], scene)


@pytest.mark.parametrize("path", ["vp", "flow"])
def test_noising_paths_keep_half_precision_latents_in_half_precision(path):
    from ldm_tutorial import schedules

    g = torch.Generator().manual_seed(6)
    x0, noise = torch.randn(2, 4, generator=g).half(), torch.randn(2, 4, generator=g).half()
    fn = schedules.vp_path if path == "vp" else schedules.flow_path
    out = fn(x0, noise, torch.tensor([0.9, 0.2]))                      # float32 schedule values
    assert out.dtype == torch.float16
