"""Cross-attention, read and edited through diffusers' attention-processor API (chapter 3).

Every function here works on a diffusers `UNet2DConditionModel` through `unet.set_attn_processor`
and restores the model's own processors afterwards (as `arch.record_attention` does): nothing is
monkey-patched, and outputs after a `with` block are bit-identical to outputs before it.

    with ldm.attention.capture_cross_attention(pipe.unet) as store:
        pipe(prompt, ...)
    maps = ldm.attention.token_maps(store, batch_index=1)       # (1, 77, 128, 128), DAAM-style

* `capture_cross_attention`: the softmax probabilities of every cross-attention layer, per call
  (one call per layer per U-Net evaluation), as (batch, heads, queries, 77) tensors.
* `token_maps`: DAAM's aggregation (arXiv:2210.04885): each layer's per-token map upsampled to
  the image, summed over heads, layers and steps.
* `token_index`: where a word of a prompt sits among the 77 token positions.
* `prompt_to_prompt`: a processor that reweights one token's attention, or injects stored maps
  for a word swap (Hertz et al., arXiv:2208.01626).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["CrossAttentionStore", "capture_cross_attention", "cross_attention_layers", "token_maps",
           "token_index", "prompt_to_prompt", "written_out_cross_attention"]


def cross_attention_layers(unet) -> dict[str, object]:
    """Processor name -> Attention module, for the cross-attention layers only (attn2 in SD's U-Net)."""
    modules = dict(unet.named_modules())
    out = {}
    for name in unet.attn_processors:
        mod = modules[name.removesuffix(".processor")]
        if getattr(mod, "is_cross_attention", False):
            out[name] = mod
    return out


@dataclass
class CrossAttentionStore:
    """What `capture_cross_attention` recorded: per layer, one probability tensor per call.

    probs[layer][call] has shape (batch, heads, queries, tokens); queries = side * side.
    """

    probs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    side: dict[str, int] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.probs)

    @property
    def steps(self) -> int:
        """Calls per layer (U-Net evaluations while capturing)."""
        return min((len(v) for v in self.probs.values()), default=0)


def written_out_cross_attention(attn, hidden_states: torch.Tensor, text: torch.Tensor):
    """One diffusers `Attention` layer's cross-attention, written out: (output, probabilities).

    hidden_states: (B, N, C) spatial features (N = H * W queries); text: (B, T, D) token states.
    Q from the image, K and V from the text; softmax over the T tokens of Q K^T / sqrt(head dim).
    """
    b, n, _ = hidden_states.shape
    h = attn.heads
    q = attn.to_q(hidden_states)
    k, v = attn.to_k(text), attn.to_v(text)
    d = q.shape[-1] // h
    q, k, v = (t.view(b, -1, h, d).transpose(1, 2) for t in (q, k, v))     # (B, heads, len, d)
    probs = (q @ k.transpose(-1, -2) * d ** -0.5).softmax(dim=-1)          # (B, heads, N, T)
    out = (probs @ v).transpose(1, 2).reshape(b, n, h * d)
    return attn.to_out[1](attn.to_out[0](out)), probs


Edit = Callable[[str, int, torch.Tensor], torch.Tensor]


class _CrossAttnProcessor:
    """diffusers' AttnProcessor for one cross-attention layer, with the probabilities exposed.

    The arithmetic is AttnProcessor's (the explicit softmax path); `edit(name, call, probs)` may
    change the probabilities before they weight the values; `store` keeps them (after `edit`).
    """

    def __init__(self, name: str, store: CrossAttentionStore | None, edit: Edit | None,
                 batch_slice: slice | None):
        self.name, self.store, self.edit, self.batch_slice = name, store, edit, batch_slice
        self.calls = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, seq, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)          # (B * heads, N, T)
        b = probs.shape[0] // attn.heads
        p4 = probs.view(b, attn.heads, probs.shape[1], probs.shape[2])
        if self.edit is not None:
            p4 = self.edit(self.name, self.calls, p4)
            probs = p4.reshape(b * attn.heads, p4.shape[2], p4.shape[3])
        if self.store is not None:
            kept = p4 if self.batch_slice is None else p4[self.batch_slice]
            self.store.probs.setdefault(self.name, []).append(kept.detach().float().cpu())
            self.store.side[self.name] = int(round(probs.shape[1] ** 0.5))
        self.calls += 1
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def _swap_cross_processors(unet, store, edit, batch_slice):
    original = dict(unet.attn_processors)
    cross = cross_attention_layers(unet)
    if not cross:
        raise ValueError("unet must have cross-attention layers (attn2); this one has none")
    procs = {name: (_CrossAttnProcessor(name.removesuffix(".processor"), store, edit, batch_slice)
                    if name in cross else proc) for name, proc in original.items()}
    unet.set_attn_processor(procs)
    try:
        yield store
    finally:
        unet.set_attn_processor(original)


def capture_cross_attention(unet, batch_slice: slice | None = None):
    """Context manager: record every cross-attention layer's probabilities while it is open.

    Usage: `with capture_cross_attention(unet) as store: unet(...)` (or a pipeline call).
    batch_slice: keep only part of the batch (under classifier-free guidance a pipeline stacks
        [unconditional, conditional]: `slice(n, None)` keeps the n conditional images).
    Self-attention layers keep their own processors; all processors are restored on exit.
    """
    if batch_slice is not None and not isinstance(batch_slice, slice):
        raise ValueError(f"batch_slice must be a slice or None, got {type(batch_slice).__name__}")
    return _swap_cross_processors(unet, CrossAttentionStore(), None, batch_slice)


def _check_index(index: int, n_tokens: int, name: str = "token index") -> int:
    if isinstance(index, bool) or not isinstance(index, int):
        raise ValueError(f"{name} must be an int, got {type(index).__name__}")
    if not 0 <= index < n_tokens:
        raise ValueError(f"{name} must be in 0..{n_tokens - 1}, got {index}")
    return index


def token_maps(store: CrossAttentionStore, size: int = 128, layers: list[str] | None = None,
               steps: list[int] | None = None, batch_index: int | None = None,
               normalise: bool = False) -> torch.Tensor:
    """DAAM's per-token heat maps: (batch, tokens, size, size).

    Each layer's probabilities (batch, heads, side*side, tokens) are summed over heads, reshaped
    to side x side, upsampled to `size` (bilinear; DAAM upsamples bicubically) and summed over the
    chosen layers (default all) and calls/steps (default all). batch_index keeps one image (the
    batch axis stays, of length 1). normalise: divide each map by its maximum (DAAM's, before its
    threshold).
    """
    if not store.probs:
        raise ValueError("store is empty: run the U-Net inside capture_cross_attention first")
    names = store.layers if layers is None else layers
    for n in names:
        if n not in store.probs:
            raise ValueError(f"layers must name captured layers such as {store.layers[0]!r}, got {n!r}")
    total = None
    for n in names:
        calls = store.probs[n]
        idx = range(len(calls)) if steps is None else [_check_index(s, len(calls), "step") for s in steps]
        p = sum(calls[s] for s in idx).sum(1)                                   # (B, N, T)
        if batch_index is not None:
            p = p[[_check_index(batch_index, p.shape[0], "batch_index")]]
        side = store.side[n]
        m = p.transpose(1, 2).reshape(p.shape[0], p.shape[2], side, side)
        m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
        total = m if total is None else total + m
    if normalise:
        total = total / total.flatten(2).amax(-1).clamp_min(1e-12)[..., None, None]
    return total


def token_index(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions (among the padded 77) of the tokens that spell `word` in `prompt`.

    A word the vocabulary holds whole is one position; other words split into several pieces (all
    are returned). Position 0 is the start token. ValueError when the word is not in the prompt.
    """
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"word must be a non-empty string, got {word!r}")
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    target = tokenizer(word.strip(), add_special_tokens=False).input_ids
    for i in range(1, len(ids) - len(target) + 1):
        if ids[i:i + len(target)] == target:
            return list(range(i, i + len(target)))
    words = tokenizer.decode(ids, skip_special_tokens=True).split()
    raise ValueError(f"word {word!r} is not in the prompt {prompt!r} (its words: {words})")


def prompt_to_prompt(unet, reweight: dict[int, float] | None = None,
                     inject: CrossAttentionStore | None = None, keep_own: list[int] | None = None,
                     inject_steps: int | None = None, store: CrossAttentionStore | None = None):
    """Context manager: Prompt-to-Prompt edits of cross-attention (Hertz et al., arXiv:2208.01626).

    reweight: {token index: factor}: that token's probabilities are multiplied by the factor
        (the paper's attention re-weighting; rows are not renormalised).
    inject: the store of a run with the source prompt (same token count): its probabilities replace
        this run's for every token except `keep_own` (the swapped word's positions), for the first
        `inject_steps` U-Net calls of each layer (default: all), so the layout of the source stays.
    store: optionally record the (edited) probabilities too.
    """
    reweight = dict(reweight or {})
    keep_own = list(keep_own or [])
    if inject is None and (keep_own or inject_steps is not None):
        raise ValueError("keep_own and inject_steps need inject (a CrossAttentionStore of the source run)")
    if inject is not None and not inject.probs:
        raise ValueError("inject is an empty store: capture the source run first")
    if inject_steps is not None and inject_steps < 0:
        raise ValueError(f"inject_steps must be >= 0, got {inject_steps}")

    def edit(name: str, call: int, p: torch.Tensor) -> torch.Tensor:
        n_tok = p.shape[-1]
        if inject is not None and (inject_steps is None or call < inject_steps):
            if name not in inject.probs or call >= len(inject.probs[name]):
                raise ValueError(f"inject holds no call {call} of layer {name!r}: the source run must use "
                                 "the same U-Net, batch and number of steps")
            src = inject.probs[name][call].to(p.device, p.dtype)
            if src.shape != p.shape:
                raise ValueError(f"inject's layer {name!r} has shape {tuple(src.shape)}, this run {tuple(p.shape)}")
            own = torch.zeros(n_tok, dtype=torch.bool, device=p.device)
            for i in keep_own:
                own[_check_index(i, n_tok)] = True
            p = torch.where(own, p, src)
        if reweight:
            scale = torch.ones(n_tok, dtype=p.dtype, device=p.device)
            for i, f in reweight.items():
                scale[_check_index(i, n_tok)] = f
            p = p * scale
        return p

    return _swap_cross_processors(unet, store, edit, None)
