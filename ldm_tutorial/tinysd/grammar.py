"""Read a caption back into a scene (the inverse of `shapes.caption`), and say when a prompt is outside it.

TinySD learned only the caption grammar written out in `shapes` (prefix, object phrases, joiners).
Its tokenizer keeps every single character in its vocabulary, so a word it does not know is split
into pieces without a word of complaint, and the model draws *something*. This module makes that
visible:

* `parse_caption(text)` turns a caption into a `CaptionScene` (a `shapes.Scene`), so a reader's own
  prompt can be rendered (`shapes.render`) and scored against the image TinySD made of it. It
  raises a `ValueError` that names each word it cannot place and says what was expected there.
* `checked_tokenizer.TinySDTokenizer` is the `CLIPTokenizer` that `load_pipeline("tiny")` gives
  TinySD's pipelines. When it encodes a prompt for the text encoder (exactly the 77-token window,
  padded and truncated, as diffusers' pipelines and `ldm.sample` do), it raises a `CaptionWarning`
  for a prompt that `parse_caption` cannot read. The warning names the words, and comes once per
  prompt per process. The empty prompt (the unconditional one) never warns.

`parse_caption`'s docstring has an example to copy: write a prompt, read it, generate it, score it.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..checks import _caller_stacklevel
from . import shapes

_ARTICLES = ("a", "an")
_JOINERS = ("and", ",")
_PREFIXES = tuple(tuple(p.split()) for p in shapes.PREFIXES if p.strip())   # ("a", "picture", "of"), ...
_SIZE_OF = {w: size for size, words in shapes.SIZE_WORDS.items() for w in words}
_POSITION_OF = {tuple(p.split()): pos for pos, phrases in shapes.POSITION_PHRASES.items() for p in phrases}
_SPELLINGS = {"center": "centre"}          # a vocabulary word no training caption holds, read as "centre"
_VOCABULARY = frozenset(shapes.vocabulary())
_EXAMPLE = "a red circle in the centre"


class CaptionWarning(UserWarning):
    """A prompt given to TinySD holds words outside its vocabulary or outside its caption grammar."""


@dataclass
class CaptionScene(shapes.Scene):
    """A `shapes.Scene` read from a caption, with which objects had a size word.

    A caption may leave the size out ("a red circle on the left"); TinySD was trained on such
    captions with either size drawn, so the caption does not fix it. The object then gets
    `parse_caption`'s `default_size` (SceneObject needs a size to be drawn) and
    `size_said[i]` is False. Score with `evaluate.fully_correct` (it ignores size), or with
    `parser.scene_matches(parsed, scene, check_size=scene.check_size)`.
    """

    text: str = ""
    size_said: tuple[bool, ...] = field(default_factory=tuple)

    @property
    def check_size(self) -> bool:
        """True when every object's size was said, so a size mismatch is an error of the image."""
        return all(self.size_said)


def _words(text: str) -> list[str]:
    """Lower-case words and single punctuation marks; a trailing full stop is dropped."""
    text = text.strip().lower()
    text = re.sub(r"\.\s*$", "", text)
    return [_SPELLINGS.get(w, w) for w in re.findall(r"[a-z]+|[^\sa-z]", text)]


def _quote(words) -> str:
    return "'" + " ".join(words) + "'"


def _role(word: str) -> str | None:
    """What a grammar word is, for the hint when it stands in the wrong place."""
    if word in shapes.COLOURS:
        return "a colour"
    if word in shapes.SHAPES:
        return "a shape"
    if word in _SIZE_OF:
        return "a size word"
    if word in _ARTICLES:
        return "an article"
    if any(word in phrase for phrase in _POSITION_OF):
        return "part of a position"
    return None


def _not_a(word: str, slot: str, expected: tuple[str, ...] | list[str]) -> str:
    role = _role(word)
    what = role or ("not in TinySD's vocabulary" if word not in _VOCABULARY else None)
    if role == "a size word":
        what += ": size words go before the colour, as in 'a small red circle'"
    return f"'{word}' is not a {slot}{f' ({what})' if what else ''}: expected one of {', '.join(expected)}"


def _read_object(words: list[str]) -> tuple[str | None, str, str, str]:
    """(size or None, colour, shape, position) of one object phrase; ValueError naming what is wrong."""
    phrase = _quote(words)
    if words[0] not in _ARTICLES:
        why = ("is not in TinySD's vocabulary" if words[0] not in _VOCABULARY else "starts it")
        raise ValueError(f"{phrase} is not an object phrase: '{words[0]}' {why}, and an object phrase "
                         f"starts with 'a' or 'an', as in {_EXAMPLE!r}")
    i = 1
    size = _SIZE_OF.get(words[i]) if i < len(words) else None
    i += size is not None
    if i == len(words) or words[i] in shapes.SHAPES:
        raise ValueError(f"{phrase} has no colour: add one of {', '.join(shapes.COLOURS)}")
    colour = words[i]
    if colour not in shapes.COLOURS:
        raise ValueError(_not_a(colour, "colour", list(shapes.COLOURS)))
    i += 1
    if i == len(words) or _role(words[i]) == "part of a position":
        raise ValueError(f"{phrase} has no shape: add one of {', '.join(shapes.SHAPES)}")
    shape = words[i]
    if shape not in shapes.SHAPES:
        singular = next((shape[:-k] for k in (1, 2) if shape[:-k] in shapes.SHAPES), None)   # plurals
        if singular:
            raise ValueError(f"'{shape}' is not a shape: TinySD's captions name one object per phrase; "
                             f"write 'a {colour} {singular} ...' once for each")
        raise ValueError(_not_a(shape, "shape", shapes.SHAPES))
    rest = tuple(words[i + 1:])
    if not rest:
        raise ValueError(f"{phrase} has no position: add e.g. 'in the centre' "
                         f"(TinySD's captions always say where)")
    if rest in _POSITION_OF:
        return size, colour, shape, _POSITION_OF[rest]
    known = [p for p in _POSITION_OF if rest[:len(p)] == p]
    if known:
        longest = max(known, key=len)
        extra = rest[len(longest):]
        if extra[0] in _ARTICLES:
            raise ValueError(f"{phrase} holds two objects: join them with ' and ' or ', ' before "
                             f"{_quote(extra)}")
        raise ValueError(f"{_quote(extra)} after the position {_quote(longest)} in {phrase}: "
                         f"expected the end of the phrase, ' and ' or ', '")
    unknown = [w for w in rest if w not in _VOCABULARY]
    why = f" ({_quote(unknown)} not in TinySD's vocabulary)" if unknown else ""
    canonical = ", ".join(f"'{p[0]}'" for p in shapes.POSITION_PHRASES.values())
    raise ValueError(f"{_quote(rest)} is not a position{why}: expected one of {canonical} "
                     f"(or another phrasing in shapes.POSITION_PHRASES)")


def parse_caption(text: str, default_size: str = "large") -> CaptionScene:
    """Caption to scene: the inverse of `shapes.caption` and `shapes.describe`.

    Accepts every caption the grammar in `shapes` produces: an optional prefix ("a picture of",
    "an image of", "there is"), then object phrases "a/an [size] colour shape position" joined
    by " and " or ", ". Lenient where a reader would expect: any case, extra spaces, "center"
    for "centre", a trailing full stop, "a" or "an" either way.

    Args:
        text: the caption.
        default_size: the size ("small" or "large") given to an object whose phrase has no size
            word; `size_said` records which objects had one. "large" by default: for one-object
            prompts without a size word, TinySD drew most objects large when this was checked.
    Returns:
        A `CaptionScene` (a `shapes.Scene`: flat grey background, objects at their cell centres)
        that `shapes.render([scene])` draws and `parser.scene_matches` / `evaluate.fully_correct`
        score against. Objects keep the caption's order.
    Raises:
        ValueError: `text` is not a non-empty string, or it holds words the grammar cannot place;
            the message quotes each phrase it cannot read, the word at fault and what was
            expected there (every phrase is checked, not only the first bad one).

    Example: write a prompt, read it, generate it, score it::

        import torch
        import ldm_tutorial as ldm
        from ldm_tutorial.tinysd import evaluate, parse_caption, parser

        prompt = "a big blue cross in the centre and a yellow circle at the top right"
        scene = parse_caption(prompt)        # raises ValueError naming any word it cannot place
        pipe = ldm.load_pipeline("tiny", verbose=False)
        image = ldm.sample(pipe, prompt, generator=torch.Generator().manual_seed(0)).images[0]
        print(evaluate.fully_correct(parser.parse_scene(image), scene.objects))  # colour, shape, cell
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a string (a caption such as {_EXAMPLE!r}), got {type(text).__name__}")
    if default_size not in shapes.SIZES:
        raise ValueError(f"default_size must be one of {list(shapes.SIZES)}, got {default_size!r}")
    words = _words(text)
    objects, said, errors = _read(words, default_size)
    if errors:
        raise ValueError(f"cannot read {text!r} as a TinySD caption: {_explain(words, errors)}")
    return CaptionScene(objects=objects, text=text, size_said=tuple(said))


def _read(words: list[str], default_size: str = "large") -> tuple[list, list[bool], list[str]]:
    """(objects, size said, errors): every phrase is read, so the errors name every bad word."""
    if not words:
        return [], [], [f"it is empty: expected a caption such as {_EXAMPLE!r}"]
    for prefix in _PREFIXES:
        if tuple(words[:len(prefix)]) == prefix:
            words = words[len(prefix):]
            if not words:
                return [], [], [f"{_quote(prefix)} needs object phrases after it, e.g. {_EXAMPLE!r}"]
            break
    # joiners never occur inside an object phrase, so the caption splits into phrases first
    phrases: list[list[str]] = [[]]
    for w in words:
        if w in _JOINERS:
            phrases.append([])
        else:
            phrases[-1].append(w)
    objects, said, errors = [], [], []
    for k, phrase in enumerate(phrases):
        if not phrase:
            where = ("it starts with" if k == 0 else
                     "it ends with" if k == len(phrases) - 1 else "two joiners in a row:")
            errors.append(f"{where} ' and ' or ', ' with no object phrase beside it "
                          f"(an object phrase is e.g. {_EXAMPLE!r})")
            continue
        try:
            size, colour, shape, position = _read_object(phrase)
        except ValueError as e:
            errors.append(str(e))
            continue
        objects.append(shapes.SceneObject(colour, shape, size or default_size, position))
        said.append(size is not None)
    return objects, said, errors


def _unknown(words: list[str]) -> list[str]:
    """The words outside TinySD's vocabulary, in order of appearance, each once."""
    return list(dict.fromkeys(w for w in words if w not in _VOCABULARY))


def _explain(words: list[str], errors: list[str]) -> str:
    unknown = _unknown(words)
    tail = f" Outside TinySD's vocabulary: {', '.join(repr(w) for w in unknown)}." if unknown else ""
    return "; ".join(errors) + "." + tail


# ----------------------------------------------------------------------------- the warning
_WARNED: set[str] = set()          # prompts already warned about in this process
_LIBRARY_DIRS: tuple[str, ...] = ()


def _library_dirs() -> tuple[str, ...]:
    """Where the frames between a reader's call and the warning live, besides ldm_tutorial itself."""
    global _LIBRARY_DIRS
    if not _LIBRARY_DIRS:
        import contextlib  # noqa: PLC0415

        import diffusers  # noqa: PLC0415
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415

        dirs = [Path(m.__file__).parent for m in (diffusers, torch, transformers)]
        _LIBRARY_DIRS = tuple(str(d) + "/" for d in dirs) + (contextlib.__file__,)
    return _LIBRARY_DIRS


def prompt_problem(prompt: str, tokenizer=None) -> str | None:
    """Why TinySD cannot read `prompt` as one of its captions, or None when it can (or it is "").

    The empty prompt is the unconditional one (classifier-free guidance's negative) and is fine.
    With a `tokenizer`, each word outside the vocabulary is shown with the pieces it is split into.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        return None
    words = _words(prompt)
    _, _, errors = _read(words)
    if not errors:
        return None
    message = _explain(words, errors)
    unknown = _unknown(words)
    if unknown and tokenizer is not None:
        pieces = "; ".join(f"{w!r} -> {' '.join(t.removesuffix('</w>') for t in tokenizer.tokenize(w))}"
                           for w in unknown[:8])
        message += (f" The tokenizer splits such words into pieces no training caption held, so their "
                    f"embeddings were never trained ({pieces}).")
    return message


def warn_prompts(prompts: str | list[str], tokenizer=None) -> list[str]:
    """Raise a `CaptionWarning` for each prompt `prompt_problem` objects to, once per prompt per process.

    Returns the prompts warned about by this call. The warning points at the reader's line (the
    first frame outside ldm_tutorial, diffusers, transformers and torch).
    """
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    warned = []
    for p in batch:
        if not isinstance(p, str) or p in _WARNED:
            continue
        problem = prompt_problem(p, tokenizer)
        _WARNED.add(p)
        if problem is None:
            continue
        warned.append(p)
        warnings.warn(f"TinySD cannot read the prompt {p!r} as one of its captions, so the model may not "
                      f"follow it: {problem} (ldm.tinysd.parse_caption(prompt) checks a prompt; this warning "
                      f"comes once per prompt)", CaptionWarning,
                      stacklevel=_caller_stacklevel(_library_dirs()))
    return warned
