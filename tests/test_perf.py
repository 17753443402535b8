"""ldm_tutorial.perf: the production chapter's profiling, FLOP and attention helpers."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ldm_tutorial as ldm
from ldm_tutorial import perf


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    p = ldm.load_pipeline("tiny", verbose=False)
    p.set_progress_bar_config(disable=True)
    return p


def test_written_out_attention_equals_sdpa_with_other_key_length():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 17, 8, generator=g)
    k, v = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g)
    torch.testing.assert_close(perf.attention_written_out(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_written_out_attention_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="query, key, value must be"):
        perf.attention_written_out(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 6), torch.zeros(1, 2, 4, 6))


def test_attention_flops_are_two_matrix_products():
    b, h, n, m, d = 1, 2, 16, 8, 4
    q, k, v = torch.zeros(b, h, n, d), torch.zeros(b, h, m, d), torch.zeros(b, h, m, d)
    expected = 2 * (2 * b * h * n * m * d)          # Q K^T and P V, a multiply-add = 2 FLOPs
    assert ldm.arch.forward_flops(_Fn(perf.attention_written_out), q, k, v) == expected
    # SDPA is counted on the meta device (where the chapter counts); on real CPU tensors torch
    # 2.13's fused CPU kernel is not in FlopCounterMode's table and counts 0
    meta = [x.to("meta") for x in (q, k, v)]
    assert ldm.arch.forward_flops(_Fn(F.scaled_dot_product_attention), *meta) == expected


def test_linear_layer_flops_equal_the_formula_on_meta():
    with torch.device("meta"):
        layer = nn.Linear(32, 16)
    x = torch.zeros(5, 32, device="meta")
    assert ldm.arch.forward_flops(layer, x) == 2 * 5 * 32 * 16


def test_score_matrix_bytes_is_what_the_profiler_sees_written_out_allocate():
    q = torch.randn(1, 4, 512, 16)
    measured = perf.largest_op_allocation(lambda: perf.attention_written_out(q, q, q))
    assert measured == perf.score_matrix_bytes(512, heads=4)           # 4 * 512**2 float32
    assert perf.largest_op_allocation(lambda: F.scaled_dot_product_attention(q, q, q)) < measured / 4
    with pytest.raises(ValueError, match="tokens, heads and batch must be positive"):
        perf.score_matrix_bytes(0)


def test_sd15_unet_flops_double_with_guidance_and_floor_divides():
    guided, plain = perf.flop_split("sd15", guidance=True), perf.flop_split("sd15", guidance=False)
    assert guided["unet_step"] == 2 * plain["unet_step"]
    assert guided["vae_decode"] == plain["vae_decode"] and guided["latent_side"] == 64
    assert 1.5e12 < guided["unet_step"] < 1.7e12        # about 0.8 TFLOP per 64x64 latent
    total = perf.image_flops(guided, 50)
    assert total == guided["text_encoder"] + 50 * guided["unet_step"] + guided["vae_decode"]
    assert perf.compute_floor(total, 1e15) == pytest.approx(total / 1e15)


@pytest.mark.parametrize("call, message", [
    (lambda: perf.flop_split("sd3"), "model must be one of"),
    (lambda: perf.compute_floor(1.0, 0), "peak_flops_per_s must be positive"),
    (lambda: perf.compute_floor(-1.0, 1.0), "flops must be non-negative"),
    (lambda: perf.image_flops({}, 0), "num_inference_steps must be a positive int"),
    (lambda: perf.interleaved_times({}), "fns must name at least one callable"),
    (lambda: perf.interleaved_times({"a": int}, repeats=0), "repeats must be a positive int"),
    (lambda: perf.make_scheduler(None, "PNDM"), "name must be one of"),
    (lambda: perf.PreviewCallback(None, every=0), "every must be a positive int"),
    (lambda: perf.max_pixel_difference(torch.zeros(1, 3), torch.zeros(1, 4)), "a and b must have the same shape"),
    (lambda: perf.set_attention(nn.Linear(1, 1), "flash"), "kind must be one of"),
    (lambda: perf.vae_tiling(None, grid=1), "grid must be an int >= 2"),
])
def test_bad_arguments_name_the_parameter(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_interleaved_times_alternates_the_calls():
    order = []
    t = perf.interleaved_times({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                               repeats=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert t["a"].n == 3 and t["a"].low <= t["a"].median <= t["a"].high


def test_taesd_size_from_its_config_is_diffusers_default_and_not_600k():
    n = perf.taesd_parameters()
    assert n["total"] == n["diffusers_default_total"] == n["encoder"] + n["decoder"]
    assert 2.4e6 < n["total"] < 2.5e6 and n["decoder"] > 2 * 600_000


def test_profile_breakdown_sums_to_the_total(pipe):
    r = perf.profile_image(pipe, "a red circle", num_inference_steps=3, guidance_scale=5.0)
    parts = r["text_encoder_s"] + r["unet_s"] + r["vae_decode_s"]
    assert r["unet_calls"] == 3
    assert 0.8 * r["total_s"] <= parts <= r["total_s"]        # the rest: scheduler and glue
    assert r["unet_s"] > r["text_encoder_s"]


def test_sdpa_and_math_processors_agree_on_tinysd(pipe):
    unet = pipe.unet
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([500, 20])
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    outs = {}
    try:
        for kind in ("sdpa", "math", "sliced"):
            perf.set_attention(unet, kind)
            with torch.no_grad():
                outs[kind] = unet(x, t, encoder_hidden_states=ctx).sample
    finally:
        perf.set_attention(unet, "sdpa")
    torch.testing.assert_close(outs["math"], outs["sdpa"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs["sliced"], outs["sdpa"], atol=1e-4, rtol=1e-4)


def test_schedulers_are_built_from_the_pipeline_config(pipe):
    import diffusers

    for name, cls in [("DDIM", diffusers.DDIMScheduler), ("DPM-Solver++", diffusers.DPMSolverMultistepScheduler),
                      ("Euler", diffusers.EulerDiscreteScheduler), ("UniPC", diffusers.UniPCMultistepScheduler)]:
        other = perf.with_scheduler(pipe, name)
        assert isinstance(other.scheduler, cls) and other.unet is pipe.unet
        torch.testing.assert_close(other.scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod)
    assert perf.make_scheduler(pipe, "DPM-Solver++").config.algorithm_type == "dpmsolver++"
    trailing = perf.make_scheduler(pipe, "DDIM trailing")
    trailing.set_timesteps(25)
    assert trailing.timesteps[0] == 999 and pipe.scheduler.config.timestep_spacing == "leading"
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)           # the original is untouched


def test_preview_callback_decodes_the_latents_of_its_steps(pipe):
    from ldm_tutorial.tinysd import load_taesd

    taesd = load_taesd()
    cb = perf.PreviewCallback(taesd, every=2)
    latents = pipe("a red circle", num_inference_steps=4, callback_on_step_end=cb, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert [s for s, _ in cb.previews] == [2, 4]
    with torch.no_grad():
        torch.testing.assert_close(cb.previews[-1][1], taesd.decode(latents).sample.clamp(-1, 1))


def test_sample_matches_the_pipeline_and_times_both(pipe):
    r = perf.sample_vs_pipeline(pipe, "a red circle", num_inference_steps=2, repeats=1)
    assert r["max_pixel_difference"] < 1e-5
    assert r["ratio_pipeline_over_ours"] == pytest.approx(r["pipeline_s"]["median"] / r["ldm_sample_s"]["median"])


def test_tiled_decode_allocates_less_than_whole(pipe):
    r = perf.vae_tiling(pipe.vae, grid=2)
    assert r["image_side"] == 256
    assert r["tiled_largest_alloc_bytes"] < r["whole_largest_alloc_bytes"]
    assert not pipe.vae.use_tiling                                   # left as it was found
    assert 0 < r["mean_pixel_difference"] < 0.1


def test_max_pixel_difference_is_in_pixel_units():
    a = torch.zeros(1, 3, 2, 2)
    b = a.clone()
    b[0, 0, 0, 0] = 1.0                     # half the [-1, 1] range
    assert perf.max_pixel_difference(a, b) == 0.5
    assert math.isclose(perf.max_pixel_difference(a, a), 0.0)


def test_sd_gpu_benchmark_runs_its_grid_on_tiny_configs(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "sd_gpu.py"
    spec = importlib.util.spec_from_file_location("sd_gpu", path)
    sd_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sd_gpu)
    res = sd_gpu.main(["--tiny", "--repeats", "1", "--no-compile", "--out", str(tmp_path)])
    # 2 models x 1 dtype (float32 on the CPU) x 2 attentions x 2 batches x guidance on/off
    assert len(res["rows"]) == 2 * 2 * 2 * 2
    guided = [r for r in res["rows"] if r["guidance"] and r["batch"] == 1 and r["attention"] == "sdpa"]
    plain = [r for r in res["rows"] if not r["guidance"] and r["batch"] == 1 and r["attention"] == "sdpa"]
    assert all(g["tflops"] == pytest.approx(2 * p["tflops"]) for g, p in zip(guided, plain))
    assert res["sample_vs_pipeline"]["max_pixel_difference"] < 1e-5
    assert (tmp_path / "gpu.md").read_text().startswith("# SD 1.5 and SDXL on a GPU")
