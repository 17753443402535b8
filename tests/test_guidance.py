"""ldm_tutorial.guidance: the written-out guidance loop against ldm.sample and the diffusers pipeline,
the algebra of the formula's variants, and the measurements' behaviour on known inputs."""

import numpy as np
import pytest
import torch

import ldm_tutorial as ldm
from ldm_tutorial import guidance as G
from ldm_tutorial.tinysd import evaluate, parser, shapes

PROMPTS = ["a small red circle on the left", "a large blue square at the top"]


@pytest.fixture(scope="module")
def pipe():
    return ldm.load_pipeline("tiny", verbose=False)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("w", [1.0, 4.0])
def test_loop_matches_ldm_sample(pipe, noise, w):
    ours = G.guided_sample(pipe, PROMPTS, guidance_scale=w, num_inference_steps=6, latents=noise)
    ref = ldm.sample(pipe, PROMPTS, guidance_scale=w, num_inference_steps=6, latents=noise)
    torch.testing.assert_close(ours.latents, ref.latents)
    torch.testing.assert_close(ours.images, ref.images)
    assert ours.timesteps == ref.timesteps and len(ours.timesteps) == 6


def test_rescale_matches_the_pipeline(pipe, noise):
    ours = G.guided_sample(pipe, PROMPTS, guidance_scale=9.0, guidance_rescale=0.7, num_inference_steps=6,
                           latents=noise)
    ref = pipe(PROMPTS, guidance_scale=9.0, guidance_rescale=0.7, num_inference_steps=6, latents=noise,
               output_type="latent").images
    torch.testing.assert_close(ours.latents, ref)
    plain = G.guided_sample(pipe, PROMPTS, guidance_scale=9.0, num_inference_steps=6, latents=noise)
    assert (plain.latents - ours.latents).abs().max() > 1e-2        # the rescale did something


def test_rescale_and_interval_match_ldm_sample(pipe, noise):
    kw = dict(num_inference_steps=6, latents=noise, guidance_scale=9.0)
    for extra in ({"guidance_rescale": 0.7}, {"guidance_interval": (300, 700)}):
        ours = G.guided_sample(pipe, PROMPTS, **kw, **extra)
        ref = ldm.sample(pipe, PROMPTS, **kw, **extra)
        torch.testing.assert_close(ours.latents, ref.latents, atol=1e-5, rtol=1e-4)
    full = G.guided_sample(pipe, PROMPTS, **kw)
    assert (full.latents - ours.latents).abs().max() > 1e-2       # the interval did something


def test_batch_order_is_the_same_algorithm_and_the_swap_is_w_one_minus_w(pipe, noise):
    kw = dict(num_inference_steps=6, latents=noise)
    usual = G.guided_sample(pipe, PROMPTS, guidance_scale=6.0, **kw)
    flipped = G.guided_sample(pipe, PROMPTS, guidance_scale=6.0, batch_order="prompt_first", **kw)
    torch.testing.assert_close(flipped.latents, usual.latents)
    swapped = G.guided_sample(pipe, PROMPTS, guidance_scale=6.0, swap_chunks=True, **kw)
    torch.testing.assert_close(swapped.latents, G.guided_sample(pipe, PROMPTS, guidance_scale=-5.0, **kw).latents,
                               atol=1e-4, rtol=1e-4)
    assert (swapped.latents - usual.latents).abs().mean() > 0.1


def test_w0_is_the_unconditional_model_and_the_interval_can_switch_guidance_off(pipe, noise):
    kw = dict(num_inference_steps=6, latents=noise)
    w0 = G.guided_sample(pipe, PROMPTS, guidance_scale=0.0, **kw)
    uncond = G.guided_sample(pipe, ["", ""], guidance_scale=1.0, **kw)    # the empty prompt's conditional run
    torch.testing.assert_close(w0.latents, uncond.latents)
    cond = G.guided_sample(pipe, PROMPTS, guidance_scale=1.0, **kw)
    never = G.guided_sample(pipe, PROMPTS, guidance_scale=8.0, guidance_interval=(2000, 3000), **kw)
    torch.testing.assert_close(never.latents, cond.latents)               # no step in the interval: w = 1
    always = G.guided_sample(pipe, PROMPTS, guidance_scale=8.0, guidance_interval=(0, 999), **kw)
    full = G.guided_sample(pipe, PROMPTS, guidance_scale=8.0, **kw)
    torch.testing.assert_close(always.latents, full.latents)


def test_bad_inputs_name_the_parameter(pipe, noise):
    with pytest.raises(ValueError, match="batch_order"):
        G.guided_sample(pipe, PROMPTS, batch_order="cond_first", latents=noise)
    with pytest.raises(ValueError, match="guidance_interval"):
        G.guided_sample(pipe, PROMPTS, guidance_interval=(700, 200), latents=noise)
    with pytest.raises(ValueError, match="negative_prompt"):
        G.guided_sample(pipe, PROMPTS, negative_prompt=["x"], latents=noise)
    with pytest.raises(ValueError, match="latents"):
        G.guided_sample(pipe, PROMPTS, latents=torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="guidance_rescale"):
        G.combine(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), 5.0, guidance_rescale=1.5)
    with pytest.raises(ValueError, match="sigma"):
        G.timestep_for_sigma(pipe.scheduler, 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        G.pairwise_rms(torch.zeros(1, 3))


def test_formula_in_x0_and_score_form_is_the_same_extrapolation():
    g = torch.Generator().manual_seed(1)
    x, e_u, e_c = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    a, w = 0.3, 7.5
    eps = G.combine(e_u, e_c, w)
    x0_u, x0_c = G.x0_from_eps(x, e_u, a), G.x0_from_eps(x, e_c, a)
    torch.testing.assert_close(G.x0_from_eps(x, eps, a), x0_u + w * (x0_c - x0_u))
    s_u, s_c = G.score_from_eps(e_u, a), G.score_from_eps(e_c, a)
    torch.testing.assert_close(G.score_from_eps(eps, a), s_u + w * (s_c - s_u))
    # rescale with phi = 1 gives the conditional prediction's per-sample std exactly
    r = G.combine(e_u, e_c, w, guidance_rescale=1.0)
    assert r.std().item() == pytest.approx(e_c.std().item(), rel=1e-5)
    assert eps.std().item() > 3 * e_c.std().item()


def test_timestep_for_sigma_inverts_the_schedule(pipe):
    acp = pipe.scheduler.alphas_cumprod
    for t in (50, 400, 900):
        sigma = float(((1 - acp[t]) / acp[t]).sqrt())
        assert G.timestep_for_sigma(pipe.scheduler, sigma) == t


def test_measurements_on_known_images():
    flat = torch.zeros(2, 3, 8, 8)
    assert G.hsv_saturation(flat).tolist() == [0.0, 0.0]
    red = torch.full((1, 3, 8, 8), -1.0)
    red[:, 0] = 1.0
    assert G.hsv_saturation(red).item() == pytest.approx(1.0)
    raw = torch.zeros(1, 3, 10, 10)
    raw[0, 0, :5] = 1.5                                   # 50 of 300 values beyond 1
    assert G.out_of_range_share(raw).item() == pytest.approx(50 / 300)
    pair = torch.stack([torch.zeros(3, 4), torch.full((3, 4), 0.5)])
    assert G.pairwise_rms(pair) == pytest.approx(0.5)
    assert G.pairwise_rms(torch.zeros(3, 5)) == 0.0
    with pytest.raises(ValueError, match="images"):
        G.hsv_saturation(torch.zeros(3, 8, 8))


def test_background_std_ignores_the_objects():
    from ldm_tutorial.tinysd import parser, shapes

    scene = shapes.Scene([shapes.SceneObject("red", "square", "large", "centre")], jitter=[(0, 0)])
    image = shapes.render([scene])[0]                     # flat grey background, one red square
    parsed = parser.parse_scene(image)
    assert len(parsed) == 1
    assert G.background_std(image, parsed) < 0.02        # the square is masked out
    assert G.background_std(image, []) > 0.1             # ... and dominates the std when it is not
    assert np.isnan(G.background_std(torch.zeros(3, 8, 8), []))     # too few pixels to measure


def test_measure_scores_rendered_truth_and_counts(pipe):
    scenes = G.sweep_scenes(2)
    nz = G.start_noise(len(scenes), 2, (4, 16, 16))
    row = G.measure(pipe, scenes, nz, guidance_scale=5.0, num_inference_steps=4, keep_images=True)
    assert row["n_images"] == 8 and row["n_prompts"] == 4 and row["n_seeds"] == 2
    # the figures, recomputed from one guided run per seed
    runs = [G.guided_sample(pipe, [shapes.describe(s) for s in scenes], guidance_scale=5.0,
                            num_inference_steps=4, latents=nz[s]) for s in range(2)]
    torch.testing.assert_close(row["images"][1], runs[1].images, atol=1e-5, rtol=0)
    correct = [evaluate.fully_correct(parser.parse_scene(im), sc.objects)
               for run in runs for im, sc in zip(run.images, scenes)]
    assert row["correct"] == pytest.approx(np.mean(correct))
    rms = [((runs[0].images[p] - runs[1].images[p]) ** 2).mean().sqrt().item() for p in range(4)]
    assert row["diversity_pixels"] == pytest.approx(np.mean(rms), rel=1e-4)
    assert set(row["fully_correct_by_count"]) == {"1_object", "2_object"}
    assert 0 < row["diversity_pixels"] < 2 and row["diversity_latents"] > 0
    with pytest.raises(ValueError, match="noise"):
        G.measure(pipe, scenes, nz[:, :3], guidance_scale=5.0)


def test_load_sweep_reads_the_committed_table_and_names_a_missing_one(tmp_path):
    bench = G.load_sweep()
    assert set(bench["scales"]) == {str(w) for w in G.SWEEP_SCALES}
    # the sample size against the sweep's own scene list, rebuilt here (not the table's other counts)
    prompts = len(G.sweep_scenes(bench["n_per_count"]))
    assert bench["n_prompts"] == prompts == 2 * bench["n_per_count"]          # one and two objects
    assert all(row["n_images"] == prompts * bench["seeds"] for row in bench["scales"].values())
    assert prompts * bench["seeds"] >= 128
    with pytest.raises(FileNotFoundError, match="--sweep"):
        G.load_sweep(tmp_path / "missing.json")


def test_one_scale_per_image_matches_one_run_per_scale(pipe, noise):
    w = torch.tensor([2.0, 8.0]).view(-1, 1, 1, 1)
    both = G.guided_sample(pipe, [PROMPTS[0]] * 2, guidance_scale=w, num_inference_steps=5,
                           latents=noise[:1].expand(2, -1, -1, -1).clone())
    for i, wi in enumerate((2.0, 8.0)):
        one = G.guided_sample(pipe, PROMPTS[0], guidance_scale=wi, num_inference_steps=5, latents=noise[:1])
        torch.testing.assert_close(both.latents[i:i + 1], one.latents, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="labels"):
        ldm.slider_html(both.images, ["only one"])
