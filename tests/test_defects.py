"""TinySD's visual-defect metrics (issue 21) on synthetic images whose answer is known."""

import numpy as np
import pytest
import torch

from ldm_tutorial import metrics as ldm_metrics
from ldm_tutorial.tinysd import defects, evaluate, parser, shapes

GREY = ((0.5, 0.5, 0.5),) * 2


def scene(*objects, background="flat", colours=GREY, jitter=None, **kw):
    objs = [shapes.SceneObject(*o) for o in objects]
    return shapes.Scene(objs, background=background, bg_colours=colours,
                        jitter=jitter or [(0, 0)] * len(objs), **kw)


def centre_circle():
    return shapes.render([scene(("red", "circle", "large", "centre"))])


# ----------------------------------------------------------------------------- corner smudge
def test_a_painted_corner_smudge_raises_the_top_left_chroma_by_the_painted_amount():
    clean = centre_circle()
    smudged = clean.clone()
    smudged[:, 0, :6, :6] += 0.6                      # +0.3 red in [0, 1] units on a grey corner
    before = defects.corner_chroma(clean)
    after = defects.corner_chroma(smudged)
    assert before["top_left"][0] == pytest.approx(0.0, abs=1e-6)
    assert after["top_left"][0] == pytest.approx(0.3, abs=1e-5)
    for region in ("top_right", "bottom_left", "bottom_right", "top_middle"):
        assert after[region][0] == pytest.approx(before[region][0], abs=1e-6)
    res = defects.corner_smudge(smudged, clean, paired=True)
    assert res["smudged_share"] == 1.0 and res["excess"] == pytest.approx(0.3, abs=1e-5)
    assert defects.corner_smudge(clean, clean, paired=True)["smudged_share"] == 0.0


def test_a_corner_covered_by_a_requested_object_is_not_counted():
    x = shapes.render([scene(("red", "square", "large", "top left"), jitter=[(-3, -3)])])
    c = defects.corner_chroma(x)
    assert np.isnan(c["top_left"][0])                 # the square's own red is not a smudge
    assert defects.corner_chroma(x, exclude_objects=False)["top_left"][0] > 0.3


def test_unpaired_corner_smudge_is_judged_against_the_reference_distribution():
    ref = shapes.render(shapes.sample_scenes(64, seed=1))
    x = shapes.render(shapes.sample_scenes(8, seed=2))
    assert defects.corner_smudge(x, ref, paired=False)["smudged_share"] <= 0.25
    x[:, 0, :6, :6] = 1.0
    x[:, 1:, :6, :6] = -1.0                           # pure red corners: chroma 1
    assert defects.corner_smudge(x, ref, paired=False)["smudged_share"] == 1.0


# ----------------------------------------------------------------------------- edge fringe
def test_a_painted_purple_fringe_is_counted_pixel_for_pixel_and_rendered_edges_are_not():
    clean = centre_circle()
    assert defects.edge_fringe(clean)["pixels_per_object"] == 0.0
    fringed = clean.clone()
    purple = torch.tensor(shapes.COLOURS["purple"]) / 255 * 2 - 1
    fringed[0, :, 58:68, 82:84] = purple[:, None, None]  # 20 px just right of the circle (edge x = 81)
    res = defects.edge_fringe(fringed)
    assert res["pixels_per_object"] == 20 and res["objects_fringed"] == 1.0
    assert len(parser.parse_scene(fringed[0])) == 1   # too small to be parsed as an object itself
    err = defects.edge_fringe(fringed, reference=clean)
    assert err["error_chroma"] > defects.edge_fringe(clean, reference=clean)["error_chroma"] + 0.01


def test_a_blurred_edge_of_the_objects_own_hue_is_not_a_fringe():
    clean = centre_circle()
    blurred = torch.nn.functional.avg_pool2d(clean, 5, stride=1, padding=2, count_include_pad=False)
    assert defects.edge_fringe(blurred)["pixels_per_object"] == 0.0


# ----------------------------------------------------------------------------- background texture
@pytest.mark.parametrize("kind", shapes.BACKGROUNDS)
def test_each_training_background_is_recognised(kind):
    s = scene(("red", "circle", "small", "centre"), background=kind,
              colours=((0.25, 0.25, 0.27), (0.8, 0.78, 0.8)), bg_angle=0.6, bg_freq=5.0, bg_seed=3)
    bt = defects.background_texture(shapes.render([s]))
    assert bt["kind"] == [kind]
    if kind == "flat":
        assert bt["std"][0] < 1e-3
    else:
        assert bt["std"][0] > 0.05


def test_background_classes_match_the_renderer_on_training_scenes():
    sc = shapes.sample_scenes(96, seed=3)
    bt = defects.background_texture(shapes.render(sc))
    # a low-contrast background (two similar colours) looks flat; every other one is its own kind
    right = [k == s.background or (k == "flat" and std < defects.FLAT_STD)
             for s, k, std in zip(sc, bt["kind"], bt["std"])]
    assert np.mean(right) == 1.0
    assert "other" not in bt["kind"]


def test_blotches_are_neither_flat_nor_a_training_background():
    g = torch.Generator().manual_seed(0)
    blobs = torch.nn.functional.interpolate(torch.rand(1, 1, 4, 4, generator=g), size=128, mode="bicubic")
    x = (0.3 + 0.3 * blobs).clamp(0, 1).expand(1, 3, 128, 128) * 2 - 1
    assert defects.background_texture(x)["kind"] == ["other"]


def test_background_report_against_training_scenes():
    ref = shapes.render(shapes.sample_scenes(64, seed=1))
    flat = shapes.render([scene(("red", "circle", "small", "centre"))] * 4)
    rep = defects.background_report(flat, ref)
    assert rep["std_ratio"] < 0.01 and rep["kinds"]["flat"] == 1.0
    assert 0.1 < rep["reference_kinds"]["stripes"] < 0.5
    assert rep["colour_spread"] == pytest.approx(0.0, abs=1e-6) and rep["reference_colour_spread"] > 0.1


def test_colour_spread_is_the_std_of_the_background_means_across_images():
    """Two flat backgrounds, grey 0.3 and grey 0.7 ([0, 1]): means 0.3 and 0.7, std 0.2 in every channel."""
    x = torch.cat([torch.full((1, 3, 64, 64), v) for v in (0.3, 0.7)]) * 2 - 1
    tex = defects.background_texture(x, parsed=[[], []])
    np.testing.assert_allclose(tex["mean_rgb"], [[0.3] * 3, [0.7] * 3], atol=1e-4)
    x[1, 0] = 1.0                                    # the second background turns pink: red 0.7 -> 1.0
    rep = defects.background_report(x, x[:1], parsed=[[], []], reference_parsed=[[]])
    assert rep["colour_spread"] == pytest.approx((0.35 + 0.2 + 0.2) / 3, abs=1e-4)
    assert rep["reference_colour_spread"] == 0.0 and rep["colour_spread_ratio"] > 1e6


# ----------------------------------------------------------------------------- extra objects, shapes
def test_a_duplicate_parsed_object_is_counted():
    asked = scene(("red", "circle", "large", "left"))
    two = shapes.render([scene(("red", "circle", "large", "left"), ("red", "circle", "large", "right"))])
    other = shapes.render([scene(("red", "circle", "large", "left"), ("purple", "square", "small", "right"))])
    one = shapes.render([asked])
    parsed = [parser.parse_scene(im) for im in torch.cat([one, two, other])]
    res = defects.object_count_defects(parsed, [asked] * 3)
    assert res["more_than_asked"] == pytest.approx(2 / 3)
    assert res["duplicate"] == pytest.approx(1 / 3)
    assert res["extra_colour"] == pytest.approx(1 / 3)


def test_a_small_square_drawn_as_a_circle_is_counted():
    asked = [scene(("red", "square", "small", "left")), scene(("blue", "square", "small", "top"))]
    drawn = shapes.render([scene(("red", "circle", "small", "left")), scene(("blue", "square", "small", "top"))])
    res = defects.shape_confusion([parser.parse_scene(im) for im in drawn], asked)
    assert res["n"] == 2 and res["correct"] == 0.5 and res["as"]["circle"] == 0.5


def test_all_defects_of_rendered_scenes_are_clean():
    sc = shapes.sample_scenes(16, seed=10004, n_objects=2)
    x = shapes.render(sc)
    ref = shapes.render(shapes.sample_scenes(32, seed=1))
    row = defects.all_defects(x, sc, train_reference=ref)
    assert row["fringe_px_per_object"] == 0.0 and row["more_than_asked"] == 0.0
    assert row["fully_correct"] == 1.0 and row["duplicate"] == 0.0
    paired = defects.all_defects(x, sc, inputs=x, train_reference=ref)
    assert paired["corner_smudged_share"] == 0.0 and paired["fringe_error_chroma"] == 0.0
    lines = evaluate.defect_table({"rendered": row})
    assert lines[2].startswith("| rendered | 16 |")


# ----------------------------------------------------------------------------- errors name the parameter
def test_bad_images_are_refused_naming_the_parameter():
    with pytest.raises(ValueError, match="images must be a \\(B, 3, H, W\\) tensor"):
        defects.corner_chroma(torch.zeros(3, 128, 128))
    with pytest.raises(ValueError, match=r"images must be in \[-1, 1\]"):
        defects.edge_fringe(torch.full((1, 3, 128, 128), 255.0))
    with pytest.raises(ValueError, match="images must hold at least one image"):
        defects.background_texture(torch.zeros(0, 3, 128, 128))
    with pytest.raises(ValueError, match="size must be at most half"):
        defects.corner_chroma(torch.zeros(1, 3, 32, 32), size=20)
    with pytest.raises(ValueError, match="reference must have the images' shape"):
        defects.corner_smudge(torch.zeros(2, 3, 64, 64), torch.zeros(1, 3, 64, 64), paired=True)
    with pytest.raises(ValueError, match="paired must be True or False"):
        defects.corner_smudge(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64), paired="yes")
    with pytest.raises(ValueError, match="parsed must hold one parse per image"):
        defects.edge_fringe(torch.zeros(2, 3, 64, 64), parsed=[[]])
    with pytest.raises(ValueError, match="band must be a positive integer"):
        defects.edge_fringe(torch.zeros(1, 3, 64, 64), band=0)
    with pytest.raises(ValueError, match="cutoff must be in"):
        defects.background_texture(torch.zeros(1, 3, 64, 64), cutoff=0.7)


def test_bad_scenes_and_settings_are_refused_naming_the_parameter():
    with pytest.raises(ValueError, match="size must be one of"):
        defects.shape_confusion([[]], [scene(("red", "square", "small", "left"))], size="tiny")
    with pytest.raises(ValueError, match="scenes must be Scenes or lists of SceneObject"):
        defects.object_count_defects([[]], ["a red square"])
    with pytest.raises(ValueError, match="parsed must hold one parse per scene"):
        defects.object_count_defects([[], []], [scene(("red", "square", "small", "left"))])
    with pytest.raises(ValueError, match="train_reference must be"):
        defects.all_defects(centre_circle())
    with pytest.raises(ValueError, match="seed must be below 10000"):
        evaluate.defect_reference(4, seed=10_001)
    with pytest.raises(ValueError, match="n_per_count must be a positive integer"):
        evaluate.defect_scenes(0)


# ----------------------------------------------------------------------------- same noise as the standard evaluation
def test_generation_latents_reproduce_the_pipeline_call_of_prompt_adherence():
    from ldm_tutorial.models import load_pipeline

    pipe = load_pipeline("tiny", verbose=False)
    scenes = evaluate.defect_scenes(2, counts=(1,))
    lat = evaluate.generation_latents(pipe, scenes, {"num_inference_steps": 3}, batch=2, n_per_count=2)
    ours = evaluate.decode_latents(pipe.vae, lat)
    theirs = pipe([shapes.describe(s) for s in scenes], num_inference_steps=3, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(evaluate.DEFECT_SEED), output_type="pt").images * 2 - 1
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)


def test_an_autoguidance_setting_samples_with_the_small_unet_as_the_weak_model():
    from ldm_tutorial.models import load_pipeline
    from ldm_tutorial.sampling import sample
    from ldm_tutorial.tinysd import load_autoguidance_unet

    pipe = load_pipeline("tiny", verbose=False)
    weak = load_autoguidance_unet(pipe)
    assert list(weak.config.block_out_channels) == [32, 32, 64] and weak.dtype == pipe.unet.dtype
    assert sum(p.numel() for p in weak.parameters()) < sum(p.numel() for p in pipe.unet.parameters()) / 4
    assert load_autoguidance_unet(dtype=torch.float16).dtype == torch.float16
    scenes = evaluate.defect_scenes(2, counts=(2,))
    setting = {"num_inference_steps": 3, "guidance_scale": 4.0, "autoguidance": 2.0}
    lat = evaluate.generation_latents(pipe, scenes, setting, batch=2, n_per_count=2)
    assert setting == {"num_inference_steps": 3, "guidance_scale": 4.0, "autoguidance": 2.0}  # not consumed
    ref = sample(pipe, [shapes.describe(s) for s in scenes], num_inference_steps=3, guidance_scale=4.0,
                 autoguidance_unet=weak, autoguidance_scale=2.0,
                 generator=torch.Generator().manual_seed(evaluate.DEFECT_SEED)).latents
    torch.testing.assert_close(lat, ref, atol=1e-5, rtol=0)
    plain = evaluate.generation_latents(pipe, scenes, {"num_inference_steps": 3, "guidance_scale": 4.0},
                                        batch=2, n_per_count=2)
    assert (lat - plain).abs().max() > 1e-2


def test_a_signal_leak_setting_starts_from_the_leak_latents_of_the_same_generator():
    from ldm_tutorial.models import load_pipeline
    from ldm_tutorial.sampling import sample
    from ldm_tutorial.signal_leak import signal_leak_latents

    pipe = load_pipeline("tiny", verbose=False)
    scenes = evaluate.defect_scenes(2, counts=(1,))
    setting = {"num_inference_steps": 3, "signal_leak": True}
    lat = evaluate.generation_latents(pipe, scenes, setting, batch=2, n_per_count=2)
    assert setting == {"num_inference_steps": 3, "signal_leak": True}                 # not consumed
    start = signal_leak_latents(pipe, 2, 3, torch.Generator().manual_seed(evaluate.DEFECT_SEED))
    ref = sample(pipe, [shapes.describe(s) for s in scenes], num_inference_steps=3, latents=start).latents
    torch.testing.assert_close(lat, ref, atol=1e-5, rtol=0)
    plain = evaluate.generation_latents(pipe, scenes, {"num_inference_steps": 3}, batch=2, n_per_count=2)
    assert (lat - plain).abs().max() > 1e-2


def test_the_committed_section_shows_each_rows_numbers_and_sample_size():
    sc = shapes.sample_scenes(4, seed=10004, n_objects=1)
    ref = shapes.render(shapes.sample_scenes(16, seed=1))
    x = shapes.render(sc)
    x[:, 0, :6, :6] = 1.0
    row = defects.all_defects(x, sc, train_reference=ref)
    res = {"n_per_count": 2, "machine": {"cpu": "test CPU", "torch": "0"}, "date": "2026-12-02", "seed": 10003,
           "n_reference": 16, "sources": {"shipped": {"rows": {"painted": row}}},
           "adherence": {"shipped": {"default": {"1_object": {"fully_correct": 0.979}, "2_object": {"fully_correct": 0.906},
                                                 "defects": row}}}}
    text = evaluate.defects_markdown(res)
    assert "| painted | 4 | " in text and f"{row['corner_top_left']:.3f}" in text
    assert "| shipped | default | 97.9% | 90.6% |" in text and "n=4 held-out" in text


# ----------------------------------------------------------------------------- why the corner smudge
@pytest.fixture(scope="module")
def groupnorm_vae():
    """TinySD's VAE with its GroupNorm decoder tail: the decoder with the corner spike."""
    from ldm_tutorial.tinysd import load_vae

    return load_vae("cpu", groupnorm=True)


def test_the_groupnorm_decoder_leans_on_its_top_left_corner_features(groupnorm_vae):
    """Overwriting a 4x4 block of features (0.1% of the map) in the top-left corner, at the
    last stage's input, costs decibels 16 px and more away from it; the other corners cost nothing."""
    x = shapes.render(shapes.sample_scenes(8, seed=10002))
    res = defects.corner_dependence(groupnorm_vae, x)
    assert res["base"] > 30.0
    assert res["base"] - res["top_left"] > 3.0
    for corner in ("top_right", "bottom_left", "bottom_right"):
        assert abs(res[corner] - res["base"]) < 0.1


def test_the_shipped_frozen_norm_decoder_leans_on_no_corner():
    """With the tail's statistics frozen, the same probe moves the interior by no corner."""
    from ldm_tutorial.tinysd import load_vae

    x = shapes.render(shapes.sample_scenes(8, seed=10002))
    res = defects.corner_dependence(load_vae("cpu"), x)
    assert res["base"] > 30.0
    for corner in defects.CORNERS:
        assert abs(res[corner] - res["base"]) < 0.1


def test_a_fresh_decoder_does_not_depend_on_any_corner():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    res = defects.corner_dependence(vae, x)
    for corner in defects.CORNERS:
        assert abs(res[corner] - res["base"]) < 0.05


def test_corner_dependence_refuses_bad_settings_naming_the_parameter(groupnorm_vae):
    x = shapes.render(shapes.sample_scenes(1, seed=1))
    with pytest.raises(ValueError, match="stage must be an int in \\[0, 3\\]"):
        defects.corner_dependence(groupnorm_vae, x, stage=4)
    with pytest.raises(ValueError, match="size must be at most half"):
        defects.corner_dependence(groupnorm_vae, x, stage=0, size=9)
    with pytest.raises(ValueError, match="margin must be under half"):
        defects.corner_dependence(groupnorm_vae, x, margin=64)
    with pytest.raises(ValueError, match="vae must be a diffusers AutoencoderKL"):
        defects.corner_dependence(torch.nn.Linear(2, 2), x)
    with pytest.raises(ValueError, match="inputs must be a"):
        defects.corner_dependence(groupnorm_vae, x[0])


def test_a_margin_at_the_spike_corner_removes_the_smudge_and_keeps_the_interior(groupnorm_vae):
    x = shapes.render(shapes.sample_scenes(16, seed=10002))
    with torch.no_grad():
        z = groupnorm_vae.encode(x).latent_dist.mean
        plain = groupnorm_vae.decode(z).sample.clamp(-1, 1)
    assert torch.equal(defects.margin_decode(groupnorm_vae, z, margin=0), groupnorm_vae.decode(z).sample)
    fixed = defects.margin_decode(groupnorm_vae, z).clamp(-1, 1)
    elsewhere = defects.margin_decode(groupnorm_vae, z, corner="bottom_right").clamp(-1, 1)
    assert fixed.shape == plain.shape == x.shape
    before = defects.corner_smudge(plain, x, paired=True)
    after = defects.corner_smudge(fixed, x, paired=True)
    other = defects.corner_smudge(elsewhere, x, paired=True)
    assert before["ratio"] > 3.0 and before["smudged_share"] > 0.4
    assert after["ratio"] < 1.6 and after["smudged_share"] <= 1 / 16
    assert other["ratio"] > 3.0                      # a margin elsewhere leaves the spike's corner
    inner = (..., slice(16, -16), slice(16, -16))
    psnr = lambda a: float(ldm_metrics.psnr(a[inner], x[inner]).mean())  # noqa: E731
    assert psnr(fixed) > psnr(plain) - 1.0


def test_margin_decode_refuses_bad_settings_naming_the_parameter(groupnorm_vae):
    z = torch.zeros(1, 4, 16, 16)
    with pytest.raises(ValueError, match="margin must be an int >= 0"):
        defects.margin_decode(groupnorm_vae, z, margin=-1)
    with pytest.raises(ValueError, match="corner must be one of"):
        defects.margin_decode(groupnorm_vae, z, corner="left")
    with pytest.raises(ValueError, match="latents must have the VAE's 4 channels"):
        defects.margin_decode(groupnorm_vae, torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="latents must be a \\(B, C, h, w\\) tensor"):
        defects.margin_decode(groupnorm_vae, z[0])
    with pytest.raises(ValueError, match="vae must be a diffusers AutoencoderKL"):
        defects.margin_decode(torch.nn.Linear(2, 2), z)


def test_margin_study_scores_both_decodes_on_the_same_latents(groupnorm_vae):
    """Given latents (here the standard scenes' own, encoded), the study only decodes: the margin
    rows lose the corner smudge that the plain rows show."""
    scenes = evaluate.defect_scenes(16)
    x = shapes.render(scenes)
    with torch.no_grad():
        latents = groupnorm_vae.encode(x).latent_dist.mode() * groupnorm_vae.config.scaling_factor
    res = evaluate.margin_study(1, n_per_count=16, latents=latents, log=lambda *_: None)
    plain, margin = res["rows"]["text-to-image, plain decode"], res["rows"]["text-to-image, margin 1"]
    assert plain["n"] == margin["n"] == 32
    assert plain["corner_ratio"] > 3.0 and margin["corner_ratio"] < 1.6
    assert res["rows"]["VAE round trip, margin 1"]["corner_smudged_share"] < 0.1
    for decode in ("plain decode", "margin 1"):
        assert set(res["adherence"][decode]) == {"1_object", "2_object"}
        assert all(0.5 <= v["fully_correct"] <= 1.0 and v["n"] == 16 for v in res["adherence"][decode].values())
    assert res["decode_seconds_batch16"]["margin 1"] > 0


def test_margin_study_refuses_latents_that_do_not_match_its_prompts():
    with pytest.raises(ValueError, match="latents must hold one scaled latent per prompt \\(32"):
        evaluate.margin_study(1, n_per_count=16, latents=torch.zeros(31, 4, 16, 16))
    with pytest.raises(ValueError, match="margin must be an int >= 1"):
        evaluate.margin_study(0)
    with pytest.raises(SystemExit):
        evaluate.main(["--margin", "1"])


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_the_decoder_run_by_parts_is_diffusers_decode(groupnorm_vae, stage):
    """corner_dependence runs the decoder in two parts (arch.decoder_features / decoder_rest);
    together they are diffusers' decode."""
    from ldm_tutorial import arch

    z = groupnorm_vae.encode(shapes.render(shapes.sample_scenes(2, seed=5))).latent_dist.mean
    with torch.no_grad():
        parts = arch.decoder_rest(groupnorm_vae, arch.decoder_features(groupnorm_vae, z, stage), stage)
        whole = groupnorm_vae.decode(z).sample
    assert torch.allclose(parts, whole, atol=1e-5)
