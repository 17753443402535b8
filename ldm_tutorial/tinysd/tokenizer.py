"""TinySD's tokenizer: a real `transformers.CLIPTokenizer` with a vocabulary built in memory.

CLIP's tokenizer is byte-level BPE: each word is split into characters (the last one marked
with `</w>`) and merged pair by pair following a ranked merge list. We learn the merges from
the caption grammar's words, so each caption word becomes exactly one token, and
keep every single character in the vocabulary so an unknown word still tokenizes (letter by
letter) instead of vanishing. Context length 77 and the start/end tokens are CLIP's.
"""

from __future__ import annotations

import json
import string

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from transformers import CLIPTokenizer

from .shapes import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


def build_vocab(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-pair encoding on the grammar's words until each is one token.

    A hand-made merge chain per word does not work: BPE applies the globally lowest-ranked
    pair first, so the merge 'a n' (from "an") would break "orange" into 'or an g e'. Letting the
    `tokenizers` BPE trainer learn the merges gives a list that is consistent by construction.
    """
    words = vocabulary() if words is None else words
    alphabet = list(string.ascii_lowercase + string.digits + string.punctuation)
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=10_000, end_of_word_suffix="</w>", initial_alphabet=alphabet,
                                  show_progress=False, min_frequency=1)
    bpe.train_from_iterator([" ".join(words)] * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    for tok in alphabet + [c + "</w>" for c in alphabet] + [BOS, EOS]:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    return vocab, merges


def build_tokenizer(words: list[str] | None = None) -> CLIPTokenizer:
    """A CLIPTokenizer whose every caption word is one token (77-token context)."""
    vocab, merges = build_vocab(words)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = MAX_LENGTH
    return tok
