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
        sample(pipe, "a red cross in the centre", num_inference_steps=1)


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
    on_disk = sorted(p.stem for p in results.RESULTS_DIR.glob("*.json"))      # listed independently
    assert "guidance" in on_disk
    with pytest.raises(FileNotFoundError) as info:
        results.load("nope")
    assert str(info.value) == f"no committed result 'nope' in {results.RESULTS_DIR}; there are {on_disk}"
    for bad in ("", "guidance.json", "../x", None):
        with pytest.raises(ValueError, match="name must be a result's bare name"):
            results.path(bad)


# --- mutation-testing follow-ups (benchmarks/mutation.md): each message matched whole, each bound on its edge


def _tokenizer():
    from transformers import CLIPTokenizer

    from ldm_tutorial import tinysd

    return CLIPTokenizer.from_pretrained(tinysd.component_dir("tokenizer"))


@pytest.mark.parametrize("call, message", [
    (lambda: checks.prompts(5, "source_prompt"),
     "source_prompt must be a string or a non-empty list of strings, got 5"),
    (lambda: checks.prompts(("a", None)),
     "prompt must be a string or a non-empty list of strings, got ('a', None)"),
    (lambda: checks.negative_prompts(["x"], 2),
     "negative_prompt must be a string or a list of 2 strings (one per prompt), got a list of 1"),
    (lambda: checks.negative_prompts(("x", "y", "z"), 2, "target_negative"),
     "target_negative must be a string or a list of 2 strings (one per prompt), got a list of 3"),
    (lambda: checks.negative_prompts(["x", 1], 2),
     "negative_prompt must be None, a string or a list of 2 strings, got ['x', 1]"),
    (lambda: checks.positive_int(-3, "steps"), "steps must be a positive integer, got -3"),
    (lambda: checks.positive_int(False, "steps"), "steps must be a positive integer, got False"),
    (lambda: checks.finite_number(None, "eta"), "eta must be a finite number, got None"),
    (lambda: checks.finite_number(True, "eta"), "eta must be a finite number, got True"),
    (lambda: checks.finite_number(float("nan"), "eta", 0.0, 1.0), "eta must be a finite number in [0.0, 1.0], got nan"),
    (lambda: checks.finite_number(2, "eta", 0.0, 1.0), "eta must be a finite number in [0.0, 1.0], got 2.0"),
    (lambda: checks.finite_number(-1e-9, "eta", 0.0, None), "eta must be a finite number in [0.0, None], got -1e-09"),
    (lambda: checks.finite_number(5.5, "w", None, 5.0), "w must be a finite number in [None, 5.0], got 5.5"),
    (lambda: checks.finite_number(torch.tensor(3), "w"), "w must be a finite number, got tensor(3)"),
    (lambda: checks.finite_number(torch.tensor([1.0, 2.0]), "w"), "w must be a finite number, got tensor([1., 2.])"),
    (lambda: checks.image_size(True, None, 8, 128),
     "height must be None (the default, 128) or a positive multiple of vae_scale_factor=8, got True"),
    (lambda: checks.image_size(64, -8, 8, 128),
     "width must be None (the default, 128) or a positive multiple of vae_scale_factor=8, got -8"),
    (lambda: checks.image_size(60, None, 16, 256),
     "height must be None (the default, 256) or a positive multiple of vae_scale_factor=16, got 60"),
    (lambda: checks.generators("seed", 2),
     "generator must be None, a torch.Generator or a list of 2 torch.Generators, got 'seed'"),
    (lambda: checks.generators([torch.Generator()] * 3, 2),
     "generator must be one torch.Generator or a list of 2 (one per image), got a list of 3"),
    (lambda: checks.generators([torch.Generator(), 0], 2, "gen"),
     "gen must be None, a torch.Generator or a list of 2 torch.Generators, got [<torch._C.Generator object at"),
    (lambda: checks.interval((1, 2, 3)),
     "guidance_interval must be None or a pair (low, high) of timesteps, got (1, 2, 3)"),
    (lambda: checks.interval([500.0, 100.0], "window"), "window must be (low, high) with low <= high, got [500.0, 100.0]"),
    (lambda: checks.interval((0, float("inf"))), "guidance_interval must be a finite number, got inf"),
])
def test_every_check_message_names_the_parameter_and_shows_the_value(call, message):
    with pytest.raises(ValueError) as info:
        call()
    text = str(info.value)
    assert text.startswith(message) and (text == message or message.endswith("object at"))


def test_values_at_the_edges_are_accepted_in_the_callers_form():
    assert checks.prompts(("a", "b")) == ["a", "b"] and isinstance(checks.prompts(("a",)), list)
    assert checks.negative_prompts(None, 3) == ["", "", ""]
    assert checks.negative_prompts("blurry", 2) == ["blurry", "blurry"]
    assert checks.negative_prompts(("x", "y"), 2) == ["x", "y"]
    assert checks.positive_int(1, "n") == 1 and type(checks.positive_int(np.int16(3), "n")) is int
    assert checks.finite_number(0.0, "eta", 0.0, 1.0) == 0.0 and checks.finite_number(1, "eta", 0.0, 1.0) == 1.0
    assert type(checks.finite_number(np.float32(2.5), "w")) is float
    assert checks.finite_number(torch.tensor(0.25, dtype=torch.float64), "w") == 0.25
    assert checks.image_size(8, 16, 8, 128) == (8, 16) and checks.image_size(None, None, 8, 96) == (96, 96)
    gens = (torch.Generator(), torch.Generator())
    assert checks.generators(gens, 2) == list(gens) and checks.generators(gens[0], 5) is gens[0]
    assert checks.generators(None, 2) is None
    assert checks.interval(None) is None
    assert checks.interval([300, 300]) == (300.0, 300.0) and checks.interval((0, 1000.5)) == (0.0, 1000.5)


def test_generators_on_two_devices_are_refused():
    class Elsewhere(torch.Generator):                # a generator that reports another device (no GPU here)
        @property
        def device(self):
            return torch.device("meta")

    with pytest.raises(ValueError) as info:
        checks.generators([torch.Generator(), Elsewhere()], 2)
    assert str(info.value) == "generator: every generator must be on the same device, got ['cpu', 'meta']"
    same = [Elsewhere(), Elsewhere()]
    assert checks.generators(same, 2) == same


def test_long_values_are_cut_to_80_characters_in_messages():
    assert checks._shown("a" * 78) == repr("a" * 78)                      # 80 characters: kept whole
    long = "b" * 79                                                         # 81 characters: cut
    assert checks._shown(long) == repr(long)[:77] + "..." and len(checks._shown(long)) == 80
    with pytest.raises(ValueError) as info:
        checks.prompts([1] * 40)
    assert str(info.value).endswith("got " + repr([1] * 40)[:77] + "...")


def test_truncation_warning_names_the_dropped_words():
    tok = _tokenizer()
    limit = tok.model_max_length
    body = ["red"] * (limit - 2)                                # fills the window exactly
    assert len(tok(" ".join(body)).input_ids) == limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checks.warn_truncation(tok, [" ".join(body)])           # a prompt that fits: silent
    with pytest.warns(UserWarning) as record:
        checks.warn_truncation(tok, [" ".join(body + ["blue", "square"])])
    assert len(record) == 1
    assert str(record[0].message) == (f"prompt is {limit + 2} tokens long; the text encoder sees {limit} (start and "
                                      f"end tokens included), so 2 tokens were dropped: 'blue square'")
    with pytest.warns(UserWarning) as record:
        checks.warn_truncation(tok, ["a cat", " ".join(body + ["green"])], "negative_prompt")
    assert len(record) == 1 and str(record[0].message).startswith(f"negative_prompt[1] is {limit + 1} tokens long")
    assert str(record[0].message).endswith("so 1 tokens were dropped: 'green'")
    tail = ["circle"] * 40                                        # 40 dropped words: 279 characters
    with pytest.warns(UserWarning) as record:
        checks.warn_truncation(tok, [" ".join(body + tail)])
    shown = " ".join(tail)[:117] + "..."
    assert str(record[0].message).endswith(f"so 40 tokens were dropped: {shown!r}")


def test_dropped_words_are_shown_whole_up_to_120_characters():
    tok = _tokenizer()
    body = " ".join(["red"] * (tok.model_max_length - 2))
    exactly_120, over = " ".join(["circle"] * 17 + ["a"]), " ".join(["circle"] * 17 + ["an"])
    assert (len(exactly_120), len(over)) == (120, 121)
    for text, shown in ((exactly_120, exactly_120), (over, over[:117] + "...")):
        with pytest.warns(UserWarning) as record:
            checks.warn_truncation(tok, [f"{body} {text}"])
        assert str(record[0].message).endswith(f"dropped: {shown!r}")


def test_image_size_takes_any_positive_multiple_even_one():
    assert checks.image_size(1, 3, 1, 64) == (1, 3)
    with pytest.raises(ValueError, match="got 0$"):
        checks.image_size(0, None, 1, 64)


def test_a_list_of_one_generator_is_the_generator_itself(pipe):
    kw = dict(num_inference_steps=2, guidance_scale=3.0)
    alone = sample(pipe, "a red cross", generator=torch.Generator().manual_seed(21), **kw)
    listed = sample(pipe, "a red cross", generator=[torch.Generator().manual_seed(21)], **kw)
    torch.testing.assert_close(listed.latents, alone.latents, atol=0, rtol=0)


def test_the_truncation_warning_points_at_the_line_that_called_sample(pipe):
    """A reader sees their own cell's line under the warning, not a frame inside the package (or
    above the caller), whatever wraps sample inside (a decorator, a context)."""
    import os

    if "MUTANT_UNDER_TEST" in os.environ:                # mutmut's trampolines add frames outside the package
        pytest.skip("mutmut's trampoline frames sit between sample and its caller")
    long = " and ".join(["a small red circle in the top left corner"] * 12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample(pipe, long, num_inference_steps=1)
    (warning,) = [w for w in caught if "tokens long" in str(w.message)]
    assert warning.filename == __file__
    assert checks._caller_stacklevel() == 1             # called from a test: this frame already


def test_the_truncation_check_adds_no_tokenizer_log_line():
    """The tokenizer would log "Token indices sequence length is longer than ..." for a long prompt
    (once per tokenizer); the check measures with verbose=False, so the reader sees its warning only."""
    import logging

    from transformers import CLIPTokenizer

    from ldm_tutorial import tinysd

    tok = CLIPTokenizer.from_pretrained(tinysd.component_dir("tokenizer"))       # a fresh one: never logged
    long = " and ".join(["a small red circle in the top left corner"] * 12)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        with pytest.warns(UserWarning, match="tokens long"):
            checks.warn_truncation(tok, [long])
        assert not [r for r in records if "sequence length" in r.getMessage()]
        tok([long])                                                    # the tokenizer's own call does log
        assert [r for r in records if "sequence length" in r.getMessage()]
    finally:
        logging.getLogger("transformers").removeHandler(handler)


def test_a_one_sided_bound_is_shown_in_the_message():
    with pytest.raises(ValueError) as info:
        checks.finite_number(float("nan"), "eta", 0.0)
    assert str(info.value) == "eta must be a finite number in [0.0, None], got nan"
