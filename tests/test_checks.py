"""Bad input to `ldm.sample` (and, through ldm_tutorial/checks.py, the editing helpers) fails fast with a
ValueError that names the parameter and what was expected; good input of every accepted form works."""
import math
import warnings

import numpy as np
import pytest
import torch

import ldm_tutorial as ldm
from ldm_tutorial import checks
from ldm_tutorial.sampling import sample


@pytest.fixture(scope="module")
def pipe():
    return ldm.load_pipeline("tiny", verbose=False)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"prompt": None}, r"prompt must be a string or a non-empty list of strings, got None"),
    ({"prompt": []}, r"prompt must be a string or a non-empty list of strings, got \[\]"),
    ({"prompt": ["a red cross", 3]}, r"prompt must be a string or a non-empty list"),
    ({"negative_prompt": ["x", "y"]}, r"negative_prompt must be a string or a list of 1 strings"),
    ({"negative_prompt": 5}, r"negative_prompt must be None, a string or a list of 1 strings"),
    ({"num_inference_steps": 2.5}, r"num_inference_steps must be a positive integer, got 2.5"),
    ({"num_inference_steps": 0}, r"num_inference_steps must be a positive integer, got 0"),
    ({"num_inference_steps": True}, r"num_inference_steps must be a positive integer, got True"),
    ({"guidance_scale": float("nan")}, r"guidance_scale must be a finite number, got nan"),
    ({"guidance_scale": math.inf}, r"guidance_scale must be a finite number, got inf"),
    ({"guidance_scale": "7.5"}, r"guidance_scale must be a finite number, got '7.5'"),
    ({"guidance_rescale": 1.5}, r"guidance_rescale must be a finite number in \[0.0, 1.0\], got 1.5"),
    ({"guidance_interval": (800, 200)}, r"guidance_interval must be \(low, high\) with low <= high"),
    ({"guidance_interval": 500}, r"guidance_interval must be None or a pair \(low, high\)"),
    ({"eta": -0.1}, r"eta must be a finite number in \[0.0, 1.0\], got -0.1"),
    ({"height": 0}, r"height must be None \(the default, 128\) or a positive multiple of vae_scale_factor=8, got 0"),
    ({"width": 100}, r"width must be None \(the default, 128\) or a positive multiple of vae_scale_factor=8"),
    ({"height": 64.0}, r"height must be None \(the default, 128\) or a positive multiple"),
    ({"generator": 0}, r"generator must be None, a torch.Generator or a list of 1 torch.Generators, got 0"),
    ({"generator": [torch.Generator(), torch.Generator()]}, r"generator must be one torch.Generator or a list of 1"),
])
def test_bad_arguments_fail_before_the_model_runs(pipe, kwargs, pattern):
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        args = {"prompt": "a red cross", "num_inference_steps": 2, **kwargs}
        with pytest.raises(ValueError, match=pattern):
            sample(pipe, **args)
    finally:
        handle.remove()
    assert not calls, "the check must run before the U-Net does"


def test_numpy_integers_and_tensor_scalars_are_accepted():
    assert checks.positive_int(np.int64(4), "num_inference_steps") == 4
    assert checks.finite_number(torch.tensor(7.5), "guidance_scale") == 7.5
    assert checks.image_size(None, np.int32(64), 8, 128) == (128, 64)


def test_a_list_of_generators_seeds_each_image_on_its_own(pipe):
    prompts = ["a red cross", "a small blue square on the right"]
    batch = sample(pipe, prompts, num_inference_steps=3,
                   generator=[torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)])
    for i, seed in enumerate((11, 12)):
        alone = sample(pipe, prompts[i], num_inference_steps=3, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(batch.latents[i:i + 1], alone.latents, atol=1e-4, rtol=0)
    ref = pipe(prompts, num_inference_steps=3, guidance_scale=5.0, output_type="latent",
               generator=[torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]).images
    torch.testing.assert_close(batch.latents, ref, atol=1e-4, rtol=0)


def test_a_long_prompt_says_how_many_tokens_were_dropped(pipe):
    prompt = " and ".join(["a small red circle in the top left corner"] * 12)
    n_tokens = len(pipe.tokenizer(prompt, truncation=False, verbose=False).input_ids)   # counted independently
    limit = pipe.tokenizer.model_max_length
    assert n_tokens > limit
    with pytest.warns(UserWarning, match=rf"prompt is {n_tokens} tokens long; .* so {n_tokens - limit} tokens "
                                         rf"were dropped"):
        sample(pipe, prompt, num_inference_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # a prompt that fits says nothing
        sample(pipe, "a red cross", num_inference_steps=1)


def test_height_none_is_the_default_and_a_multiple_of_8_works(pipe):
    assert sample(pipe, "a red cross", num_inference_steps=1).images.shape[-2:] == (128, 128)
    assert sample(pipe, "a red cross", num_inference_steps=1, height=64, width=96).images.shape[-2:] == (64, 96)


def test_negative_prompt_and_batch_of_two_match_the_pipeline(pipe):
    """A real negative prompt, two images: ours equals diffusers' call, and the negative prompt matters."""
    prompts, negatives = ["a red circle", "a green cross on the left"], ["a red circle", "a blue square"]
    ours = sample(pipe, prompts, negative_prompt=negatives, num_inference_steps=4, guidance_scale=6.0,
                  generator=torch.Generator().manual_seed(5))
    ref = pipe(prompts, negative_prompt=negatives, num_inference_steps=4, guidance_scale=6.0,
               generator=torch.Generator().manual_seed(5), output_type="latent").images
    torch.testing.assert_close(ours.latents, ref, atol=1e-4, rtol=0)
    empty = sample(pipe, prompts, num_inference_steps=4, guidance_scale=6.0, generator=torch.Generator().manual_seed(5))
    assert (empty.latents - ours.latents).abs().mean() > 1e-2          # "" would give another result
    none = sample(pipe, prompts, negative_prompt=None, num_inference_steps=4, guidance_scale=6.0,
                  generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(none.latents, empty.latents, atol=0, rtol=0)   # None means the empty prompt


def test_trajectory_holds_each_step_and_ends_on_the_result(pipe):
    out = sample(pipe, "a red cross", num_inference_steps=4, keep_trajectory=True,
                 generator=torch.Generator().manual_seed(0))
    assert len(out.trajectory) == 4
    torch.testing.assert_close(out.trajectory[-1], out.latents.cpu(), atol=0, rtol=0)
    short = sample(pipe, "a red cross", num_inference_steps=4, keep_trajectory=True,
                   generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(out.trajectory, short.trajectory))
    steps = [(a - b).abs().mean().item() for a, b in zip(out.trajectory[1:], out.trajectory[:-1])]
    assert min(steps) > 0                                  # every stored step is a new state


def test_guidance_rescale_matches_the_pipeline(pipe):
    kw = dict(num_inference_steps=4, guidance_scale=9.0)
    ours = sample(pipe, "a blue square", guidance_rescale=0.7, generator=torch.Generator().manual_seed(2), **kw)
    ref = pipe("a blue square", guidance_rescale=0.7, generator=torch.Generator().manual_seed(2),
               output_type="latent", **kw).images
    torch.testing.assert_close(ours.latents, ref, atol=1e-4, rtol=0)
    plain = sample(pipe, "a blue square", generator=torch.Generator().manual_seed(2), **kw)
    assert (plain.latents - ours.latents).abs().mean() > 1e-3


def test_guidance_interval_limits_guidance_to_its_steps(pipe):
    kw = dict(num_inference_steps=5, guidance_scale=7.0)
    full = sample(pipe, "a red cross", generator=torch.Generator().manual_seed(4), **kw)
    everywhere = sample(pipe, "a red cross", guidance_interval=(0, 1000), generator=torch.Generator().manual_seed(4), **kw)
    torch.testing.assert_close(everywhere.latents, full.latents, atol=0, rtol=0)
    nowhere = sample(pipe, "a red cross", guidance_interval=(1001, 2000), generator=torch.Generator().manual_seed(4), **kw)
    unguided = sample(pipe, "a red cross", num_inference_steps=5, guidance_scale=1.0,
                      generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(nowhere.latents, unguided.latents, atol=1e-5, rtol=0)
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        some = sample(pipe, "a red cross", guidance_interval=(400, 700), generator=torch.Generator().manual_seed(4), **kw)
    finally:
        handle.remove()
    ts = some.timesteps
    assert calls == [2 if 400 <= t <= 700 else 1 for t in ts] and 1 in calls and 2 in calls
    assert (some.latents - full.latents).abs().mean() > 1e-4


def test_committed_results_ship_in_the_package_and_load_by_name():
    from ldm_tutorial import results

    assert {"guidance", "scaling_factor"} <= set(results.available())
    assert results.path("guidance").parent == results.RESULTS_DIR
    assert results.RESULTS_DIR.parent == __import__("pathlib").Path(ldm.__file__).parent   # inside the package
    assert results.load("guidance")["scales"]["5.0"]["n_images"] >= 128
    with pytest.raises(FileNotFoundError, match=r"no committed result 'nope' .* there are \['guidance'"):
        results.load("nope")
    for bad in ("", "guidance.json", "../x", None):
        with pytest.raises(ValueError, match="name must be a result's bare name"):
            results.path(bad)
