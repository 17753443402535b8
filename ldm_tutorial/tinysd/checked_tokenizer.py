"""TinySD's CLIP tokenizer with the caption check: the one `load_pipeline("tiny")` sets as `pipe.tokenizer`.

Kept apart from `grammar` so that importing `ldm_tutorial.tinysd` does not import transformers.
"""

from __future__ import annotations

from transformers import CLIPTokenizer

from .grammar import warn_prompts


class TinySDTokenizer(CLIPTokenizer):
    """TinySD's CLIP tokenizer, which warns about prompts outside the caption grammar.

    It tokenizes exactly as `CLIPTokenizer` does. When a call asks for exactly the text encoder's
    window (`padding="max_length"` with `truncation=True`), which is how diffusers' pipelines,
    `ldm.sample` and the book's other helpers encode a prompt, it first passes the text to
    `grammar.warn_prompts`. Calls that only count or show tokens stay silent.
    `load_pipeline("tiny")` sets it as `pipe.tokenizer`; the Hub's SD pipelines keep their own.
    """

    def __call__(self, text=None, *args, **kwargs):
        encoding = kwargs.get("padding") == "max_length" and kwargs.get("truncation") is True
        if encoding and (isinstance(text, str) or (
                isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text))):
            warn_prompts(text, self)
        return super().__call__(text, *args, **kwargs)
