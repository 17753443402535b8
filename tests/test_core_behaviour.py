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
