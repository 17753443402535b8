"""parse_caption (caption -> scene, the inverse of the grammar) and the CaptionWarning on TinySD's prompts."""

import contextlib
import io
import textwrap
import warnings

import numpy as np
import pytest
import torch

import ldm_tutorial as ldm
from ldm_tutorial.tinysd import CaptionScene, CaptionWarning, evaluate, grammar, parse_caption, parser, shapes


def _key(o, size=True):
    return (o.colour, o.shape, o.position) + ((o.size,) if size else ())


# ----------------------------------------------------------------------------- parse_caption
def test_every_caption_the_grammar_makes_parses_back_to_its_scene():
    rng = np.random.default_rng(21)
    scenes = shapes.sample_scenes(3000, seed=21)
    unsaid = total = 0
    for scene in scenes:
        wanted = sorted(_key(o) for o in scene.objects)
        text = shapes.caption(scene, rng)                            # sizes said with probability 0.7
        read = parse_caption(text)
        assert isinstance(read, shapes.Scene) and len(read.size_said) == len(read.objects)
        # objects come back in the caption's (shuffled) order: compare as multisets
        assert sorted(_key(o, False) for o in read.objects) == sorted(_key(o, False) for o in scene.objects), text
        sizes = {_key(o, False): o.size for o in scene.objects}      # one object per cell: a unique key
        for o, said in zip(read.objects, read.size_said):
            assert o.size == (sizes[_key(o, False)] if said else "large"), text
        unsaid += read.size_said.count(False)
        total += len(read.objects)
        every = parse_caption(shapes.caption(scene, rng, p_size=1.0))
        assert every.check_size and sorted(_key(o) for o in every.objects) == wanted
        assert not any(parse_caption(shapes.caption(scene, rng, p_size=0.0)).size_said)
        assert sorted(_key(o) for o in parse_caption(shapes.describe(scene)).objects) == wanted
    assert 0.25 < unsaid / total < 0.35                    # shapes.caption drops the size 30% of the time


def test_a_dropped_size_is_the_default_and_recorded():
    read = parse_caption("a red circle on the left and a little blue square at the top", default_size="small")
    assert [o.size for o in read.objects] == ["small", "small"] and read.size_said == (False, True)
    assert not read.check_size
    assert parse_caption("a red circle on the left").objects[0].size == "large"
    with pytest.raises(ValueError, match=r"default_size must be one of \['small', 'large'\], got 'medium'"):
        parse_caption("a red circle on the left", default_size="medium")


def test_a_parsed_caption_renders_and_scores_like_a_scene():
    texts = ["a large red circle on the left and a small blue cross in the bottom right corner",
             "there is a big green triangle at the top, an orange square in the middle"]
    scenes = [parse_caption(t) for t in texts]
    images = shapes.render(scenes)
    for image, scene in zip(images, scenes):
        read = parser.parse_scene(image)
        assert parser.scene_matches(read, scene, check_size=scene.check_size)
        assert evaluate.fully_correct(read, scene.objects)
    wrong = parse_caption("a large red circle on the right and a small blue cross in the bottom right corner")
    assert not evaluate.fully_correct(parser.parse_scene(images[0]), wrong.objects)


@pytest.mark.parametrize("text", [
    "A Large RED Circle   on the LEFT", "a large red circle on the left.", "  a large red circle on the left . ",
    "an large red circle on the left", "a large red circle at the left",
])
def test_case_spaces_a_full_stop_and_either_article_are_accepted(text):
    read = parse_caption(text)
    assert [_key(o) for o in read.objects] == [("red", "circle", "left", "large")] and read.text == text


def test_center_is_read_as_centre_and_every_prefix_is_accepted():
    for prefix in ("", "a picture of ", "an image of ", "there is "):
        read = parse_caption(f"{prefix}a small purple cross in the center and an orange circle in the middle")
        assert [o.position for o in read.objects] == ["centre", "centre"]
        assert [o.colour for o in read.objects] == ["purple", "orange"]


@pytest.mark.parametrize("text, message", [
    ("a pink circle on the left", r"'pink' is not a colour \(not in TinySD's vocabulary\): expected one of "
                                  r"red, orange, yellow, green, blue, purple"),
    ("a red hexagon on the left", r"'hexagon' is not a shape \(not in TinySD's vocabulary\): expected one of "
                                  r"circle, square, triangle, cross"),
    ("a red circle", r"'a red circle' has no position: add e.g. 'in the centre'"),
    ("a circle on the left", r"'a circle on the left' has no colour: add one of red, orange"),
    ("a red on the left", r"'a red on the left' has no shape: add one of circle, square"),
    ("red circle on the left", r"'red circle on the left' is not an object phrase: 'red' starts it, and an "
                               r"object phrase starts with 'a' or 'an'"),
    ("a red big circle on the left", r"'big' is not a shape \(a size word: size words go before the colour"),
    ("a red circles on the left", r"'circles' is not a shape: TinySD's captions name one object per phrase"),
    ("a red crosses on the left", r"'crosses' is not a shape: .* write 'a red cross \.\.\.' once for each"),
    ("a red circle in the corner", r"'in the corner' is not a position: expected one of 'in the top left corner'"),
    ("a red circle on the left please", r"'please' after the position 'on the left'.*Outside TinySD's "
                                        r"vocabulary: 'please'\."),
    ("a red circle on the left a blue square on the right", r"holds two objects: join them with ' and ' or "
                                                            r"', ' before 'a blue square on the right'"),
    ("a red circle on the left and", r"it ends with ' and ' or ', ' with no object phrase"),
    ("a red circle on the left, , a blue square on the right", r"two joiners in a row"),
    ("a picture of", r"'a picture of' needs object phrases after it"),
    ("", r"it is empty: expected a caption such as 'a red circle in the centre'"),
    ("blurry, low quality", r"'blurry' is not in TinySD's vocabulary.*Outside TinySD's vocabulary: 'blurry', "
                            r"'low', 'quality'\."),
])
def test_each_error_names_the_words_it_cannot_place_and_what_was_expected(text, message):
    with pytest.raises(ValueError, match=message):
        parse_caption(text)


def test_one_message_names_every_bad_phrase_not_only_the_first():
    with pytest.raises(ValueError) as err:
        parse_caption("a crimson circle in the centre and a red hexagon at the top and a blue square on the left")
    text = str(err.value)
    assert text.startswith("cannot read 'a crimson circle")
    assert "'crimson' is not a colour" in text and "'hexagon' is not a shape" in text
    assert text.endswith("Outside TinySD's vocabulary: 'crimson', 'hexagon'.")
    assert text.count("; ") == 1                           # two errors; the good third phrase is not one


def test_text_must_be_a_string():
    with pytest.raises(ValueError, match="text must be a string .* got list"):
        parse_caption(["a red circle on the left"])


def test_prompt_problem_is_none_for_the_empty_prompt_and_for_captions():
    assert grammar.prompt_problem("") is None and grammar.prompt_problem("   ") is None
    assert grammar.prompt_problem("an image of a yellow cross at the bottom") is None
    assert "'blurry'" in grammar.prompt_problem("blurry")
    with pytest.raises(ValueError, match="prompt must be a string, got NoneType"):
        grammar.prompt_problem(None)


# ----------------------------------------------------------------------------- the warning
@pytest.fixture(scope="module")
def pipe():
    return ldm.load_pipeline("tiny", verbose=False)


@pytest.fixture
def fresh(monkeypatch):
    """Forget the prompts warned about so far, so each test sees its own first warning."""
    monkeypatch.setattr(grammar, "_WARNED", set())


def _caption_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if issubclass(w.category, CaptionWarning)]


def test_the_pipeline_call_warns_once_naming_the_word(pipe, fresh):
    run = lambda p: pipe(p, num_inference_steps=1, generator=torch.Generator().manual_seed(0))  # noqa: E731
    first = _caption_warnings(lambda: [run("a crimson circle in the centre") for _ in range(3)])
    assert len(first) == 1
    message = str(first[0].message)
    assert "'crimson' is not a colour" in message and "'crimson' -> c ri m s on" in message
    assert first[0].filename == __file__                      # points at the caller, not at diffusers
    assert _caption_warnings(lambda: run("a crimson circle in the centre")) == []   # once per process


def test_ldm_sample_warns_for_prompt_and_negative_but_not_for_captions_or_the_empty_prompt(pipe, fresh):
    def run(prompt, negative=""):
        ldm.sample(pipe, prompt, negative_prompt=negative, num_inference_steps=1,
                   generator=torch.Generator().manual_seed(0))

    assert _caption_warnings(lambda: run("a red circle on the left and a big blue square in the center.")) == []
    assert _caption_warnings(lambda: run(["a red circle on the left", "an image of a green cross at the top"],
                                         negative=None)) == []
    caught = _caption_warnings(lambda: [run("a red hexagon on the left", negative="blurry") for _ in range(2)])
    assert len(caught) == 2 and caught[0].filename == __file__
    assert "'hexagon' is not a shape" in str(caught[0].message) and "'blurry'" in str(caught[1].message)
    with pytest.warns(CaptionWarning, match=r"'a red circle' has no position"):
        run("a red circle")


def test_every_task_and_the_pipe_call_share_the_one_time_record(pipe, fresh):
    img2img = ldm.load_pipeline("tiny", task="img2img", verbose=False)
    inpaint = ldm.load_pipeline("tiny", task="inpaint", verbose=False)
    # every TinySD task gets the checking tokenizer (the Hub's SD pipelines get no tokenizer argument:
    # test_models checks the exact from_pretrained arguments of the Hub tier)
    assert {type(p.tokenizer).__name__ for p in (pipe, img2img, inpaint)} == {"TinySDTokenizer"}
    image = shapes.render([parse_caption("a red circle on the left")]) * 0.5 + 0.5
    caught = _caption_warnings(lambda: img2img("a red blob on the left", image=image, strength=0.5,
                                               num_inference_steps=2))
    assert len(caught) == 1 and "'blob' is not a shape" in str(caught[0].message)
    assert _caption_warnings(lambda: ldm.sample(pipe, "a red blob on the left", num_inference_steps=1)) == []


def test_tokens_are_unchanged_and_only_encoding_calls_check(pipe, fresh):
    from transformers import CLIPTokenizer

    plain = CLIPTokenizer.from_pretrained(ldm.tinysd.component_dir("tokenizer"))
    kw = dict(padding="max_length", max_length=77, truncation=True)
    for text in ("a red circle on the left", "a crimson hexagon", ""):
        caught = _caption_warnings(lambda: pipe.tokenizer(text, **kw))
        assert pipe.tokenizer(text, **kw).input_ids == plain(text, **kw).input_ids
        assert len(caught) == (text == "a crimson hexagon")
    # counting or showing tokens (no padding: warn_truncation, attention.token_index) stays silent
    assert _caption_warnings(lambda: pipe.tokenizer("a teal circle", truncation=False).input_ids) == []
    assert _caption_warnings(lambda: pipe.tokenizer("a teal circle", padding="max_length", max_length=77)) == []
    caught = _caption_warnings(lambda: pipe.tokenizer(["a teal circle", ""], padding="max_length", max_length=77,
                                                      truncation=True))
    assert len(caught) == 1 and "'teal' is not a colour" in str(caught[0].message)
    # a plain CLIPTokenizer (what the Hub's SD pipelines keep) never checks
    assert _caption_warnings(lambda: plain("a mauve circle", padding="max_length", max_length=77)) == []


def test_the_warning_can_be_filtered_by_its_class(pipe, fresh):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=CaptionWarning)
        pipe("a scarlet circle on the left", num_inference_steps=1)
    assert not any(issubclass(w.category, CaptionWarning) for w in caught)
    assert issubclass(CaptionWarning, UserWarning) and CaptionScene.__mro__[1] is shapes.Scene


def test_the_docstring_example_runs_and_scores_its_prompt_fully_correct(pipe):
    code = textwrap.dedent(parse_caption.__doc__.split("score it::")[1])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {})
    assert out.getvalue().strip() == "True"
