"""TinySD's tokenizer: a real `transformers.CLIPTokenizer` with a vocabulary built in memory.

CLIP's tokenizer is byte-level BPE: each word is split into characters (the last one marked
with `</w>`) and merged pair by pair following a ranked merge list. We learn the merges from
the caption grammar's words, so each caption word becomes exactly one token, and
keep every single character in the vocabulary so an unknown word still tokenizes (letter by
letter) instead of vanishing. Context length 77 and the start/end tokens are CLIP's.
"""

from __future__ import annotations

import string

from transformers import CLIPTokenizer

from .shapes import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair encoding, learned until every word is one symbol, with deterministic tie-breaks.

    Each step merges the most frequent adjacent pair over the word list (ties: the
    lexicographically smallest pair), exactly as BPE training does, so applying the merges in
    rank order reproduces every word as a single token. (The `tokenizers` trainer breaks ties by
    hash order, which changes the vocabulary from run to run: a model trained with one build
    would not match the next.)
    """
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        counts: dict[tuple[str, str], int] = {}
        for s in seqs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for k, s in enumerate(seqs):
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[k] = out
    return merges


def build_vocab(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (every character, alone and word-final, every merged symbol, start/end) and merges."""
    words = vocabulary() if words is None else words
    alphabet = list(string.ascii_lowercase + string.digits + string.punctuation)
    merges = learn_merges(words)
    vocab: dict[str, int] = {}
    for tok in alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + [BOS, EOS]:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def build_tokenizer(words: list[str] | None = None) -> CLIPTokenizer:
    """A CLIPTokenizer whose every caption word is one token (77-token context)."""
    vocab, merges = build_vocab(words)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = MAX_LENGTH
    return tok
