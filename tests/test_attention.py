"""ldm_tutorial.attention: capture, maps, token positions and Prompt-to-Prompt edits (chapter 3)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ldm_tutorial import attention as A
from ldm_tutorial import tinysd
from ldm_tutorial.tinysd import configs


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return configs.new_unet(**configs.unet_preset("small")).eval()      # heads 2, attention at 16 and 8


@pytest.fixture(scope="module")
def tok():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tinysd.component_dir("tokenizer"))


def _inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 16, 16, generator=g), torch.tensor(500),
            torch.randn(batch, 77, configs.TEXT_WIDTH, generator=g))


@torch.no_grad()
def test_captured_shapes_per_layer_and_calls(unet):
    x, t, text = _inputs()
    with A.capture_cross_attention(unet) as store:
        unet(x, t, encoder_hidden_states=text)
        unet(x, t, encoder_hidden_states=text)
    # small preset: cross-attention at 16x16 (down 0, up 2 twice), 8x8 (down 1, up 1 twice), 4x4 (mid)
    sides = sorted(store.side.values())
    assert sides == [4, 8, 8, 8, 16, 16, 16]
    assert store.steps == 2 and all(len(v) == 2 for v in store.probs.values())
    for name, calls in store.probs.items():
        assert name.endswith("attn2")                                   # self-attention is not captured
        assert calls[0].shape == (2, 2, store.side[name] ** 2, 77)


@torch.no_grad()
def test_probabilities_sum_to_one_over_tokens_and_maps_add_up(unet):
    x, t, text = _inputs()
    with A.capture_cross_attention(unet) as store:
        unet(x, t, encoder_hidden_states=text)
    for calls in store.probs.values():
        s = calls[0].sum(-1)
        torch.testing.assert_close(s, torch.ones_like(s))
    maps = A.token_maps(store, size=32)
    assert maps.shape == (2, 77, 32, 32)
    # bilinear upsampling keeps each pixel's sum over tokens: 7 layers x 2 heads x 1 call
    torch.testing.assert_close(maps.sum(1), torch.full((2, 32, 32), 14.0))
    one = A.token_maps(store, size=32, batch_index=1, normalise=True)
    assert one.shape == (1, 77, 32, 32)
    torch.testing.assert_close(one.flatten(2).amax(-1), torch.ones(1, 77))


@torch.no_grad()
def test_capture_matches_diffusers_and_restores_processors_bit_identically(unet):
    x, t, text = _inputs()
    before_procs = dict(unet.attn_processors)
    ref = unet(x, t, encoder_hidden_states=text).sample
    with A.capture_cross_attention(unet, batch_slice=slice(1, None)) as store:
        during = unet(x, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(during, ref, atol=1e-5, rtol=1e-4)
    assert all(v[0].shape[0] == 1 for v in store.probs.values())       # only the kept half
    assert dict(unet.attn_processors) == before_procs                  # the very same objects
    assert torch.equal(unet(x, t, encoder_hidden_states=text).sample, ref)
    with pytest.raises(RuntimeError, match="boom"):                    # restored after an error too
        with A.capture_cross_attention(unet):
            raise RuntimeError("boom")
    assert dict(unet.attn_processors) == before_procs


@torch.no_grad()
def test_written_out_layer_equals_diffusers_attention(unet):
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(3)
    h, text = torch.randn(2, 256, 32, generator=g), torch.randn(2, 77, configs.TEXT_WIDTH, generator=g)
    out, probs = A.written_out_cross_attention(attn, h, text)
    torch.testing.assert_close(out, attn(h, encoder_hidden_states=text))
    assert probs.shape == (2, attn.heads, 256, 77)


def test_token_index_finds_words_and_names_missing_ones(tok):
    prompt = "a red circle on the left"
    assert A.token_index(tok, prompt, "a") == [1]                     # position 0 is the start token
    assert A.token_index(tok, prompt, "circle") == [3]
    assert A.token_index(tok, prompt, "left") == [6]
    with pytest.raises(ValueError, match=r"word 'square' is not in the prompt 'a red circle on the left'"):
        A.token_index(tok, prompt, "square")
    with pytest.raises(ValueError, match="word must be a non-empty string"):
        A.token_index(tok, prompt, " ")


@torch.no_grad()
def test_clear_errors(unet):
    x, t, text = _inputs()
    with pytest.raises(ValueError, match="store is empty"):
        A.token_maps(A.CrossAttentionStore())
    with pytest.raises(ValueError, match="batch_slice must be a slice"):
        A.capture_cross_attention(unet, batch_slice=1)
    with pytest.raises(ValueError, match=r"token index must be in 0\.\.76, got 77"):
        with A.prompt_to_prompt(unet, reweight={77: 2.0}):
            unet(x, t, encoder_hidden_states=text)
    with pytest.raises(ValueError, match="need inject"):
        A.prompt_to_prompt(unet, keep_own=[3])
    with A.capture_cross_attention(unet) as store:
        unet(x, t, encoder_hidden_states=text)
    with pytest.raises(ValueError, match=r"step must be in 0\.\.0, got 1"):
        A.token_maps(store, steps=[1])
    with pytest.raises(ValueError, match="layers must name captured layers"):
        A.token_maps(store, layers=["mid_block"])
    plain = configs.new_unet(**configs.unet_preset("small"), down_block_types=("DownBlock2D",) * 3,
                             up_block_types=("UpBlock2D",) * 3, mid_block_type="UNetMidBlock2D")
    with pytest.raises(ValueError, match="unet must have cross-attention layers"):
        with A.capture_cross_attention(plain):
            pass


@torch.no_grad()
def test_prompt_to_prompt_reweights_and_injects(unet):
    x, t, text = _inputs()
    ref = unet(x, t, encoder_hidden_states=text).sample
    with A.prompt_to_prompt(unet, reweight={3: 1.0}):
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=text).sample, ref, atol=1e-5, rtol=1e-4)
    rec = A.CrossAttentionStore()
    with A.prompt_to_prompt(unet, reweight={3: 0.0, 4: 2.0}, store=rec):
        changed = unet(x, t, encoder_hidden_states=text).sample
    assert (changed - ref).abs().max() > 1e-3                          # the edit reaches the output
    with A.capture_cross_attention(unet) as plain:
        unet(x, t, encoder_hidden_states=text)
    first = rec.layers[0]                        # later layers see features the edit already changed
    assert first.startswith("down_blocks.0")
    for name in rec.layers:
        assert rec.probs[name][0][..., 3].abs().max() == 0
    torch.testing.assert_close(rec.probs[first][0][..., 4], 2 * plain.probs[first][0][..., 4])
    # word swap: another prompt's run, with the source's maps for every token but position 3
    other = text.clone()
    other[:, 3] = torch.randn(2, configs.TEXT_WIDTH, generator=torch.Generator().manual_seed(9))
    got = A.CrossAttentionStore()
    with A.prompt_to_prompt(unet, inject=plain, keep_own=[3], store=got):
        unet(x, t, encoder_hidden_states=other)
    with A.capture_cross_attention(unet) as own:
        unet(x, t, encoder_hidden_states=other)
    for name in got.layers:
        torch.testing.assert_close(got.probs[name][0][..., :3], plain.probs[name][0][..., :3])
        torch.testing.assert_close(got.probs[name][0][..., 4:], plain.probs[name][0][..., 4:])
    torch.testing.assert_close(got.probs[first][0][..., 3], own.probs[first][0][..., 3])
    assert not torch.allclose(own.probs[first][0][..., 5], plain.probs[first][0][..., 5])


def test_pooled_conditioning_run_exports_a_unet_without_attention(tmp_path):
    from ldm_tutorial.tinysd import train

    with pytest.raises(ValueError, match="conditioning must be one of"):
        train.train_unet(None, None, conditioning="mean")
    out = tmp_path / "w"
    for sub in ("vae", "text_encoder", "tokenizer"):
        shutil.copytree(tinysd.WEIGHTS_DIR / "tinysd" / sub, out / "tinysd" / sub)
    train.main(["unet", "--unet-preset", "small", "--conditioning", "pooled", "--n-scenes", "16", "--batch", "4",
                "--steps", "1", "--out", str(out), "--ckpt-dir", str(tmp_path / "ck")])
    unet, log = tinysd.load_conditioning_unet("pooled", weights_dir=out)
    assert log["conditioning"] == "pooled" and log["steps"] == 1
    assert unet.config.class_embed_type == "projection" and not A.cross_attention_layers(unet)
    assert unet.config.projection_class_embeddings_input_dim == configs.TEXT_WIDTH
    assert 0.6e6 < sum(p.numel() for p in unet.parameters()) < 0.8e6    # the cross arm has 1.02M
    assert "unet-conditioning-pooled" in json.loads((out / "training_log.json").read_text())
    with pytest.raises(ValueError, match="arm must be one of"):
        tinysd.load_conditioning_unet("mean")
    with pytest.raises(FileNotFoundError, match="--conditioning pooled-token"):
        tinysd.load_conditioning_unet("pooled-token", weights_dir=out)


@torch.no_grad()
@pytest.mark.parametrize("variant", ["cross, masked, normed, residual", "self, spatial norm"])
def test_processor_equals_diffusers_attn_processor_with_every_attention_option(variant):
    """The capturing processor is diffusers' AttnProcessor with the probabilities exposed: on an
    Attention layer using the options SD's U-Net leaves off (4-D input, group norm, a normed
    context, a mask, spatial norm, a residual, an output rescale) both give the same output."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    if variant.startswith("cross"):
        attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, norm_num_groups=4,
                         cross_attention_norm="layer_norm", residual_connection=True,
                         rescale_output_factor=2.0)
        x = torch.randn(2, 8, 3, 3)
        mask = torch.zeros(2, 1, 5)
        mask[..., -1] = -1e4                                              # the last token masked out
        kw = dict(encoder_hidden_states=torch.randn(2, 5, 6), attention_mask=mask)
    else:
        attn = Attention(query_dim=32, heads=2, dim_head=8, spatial_norm_dim=3, residual_connection=True)
        x = torch.randn(2, 32, 2, 2)
        kw = dict(temb=torch.randn(2, 3, 1, 1))
    attn.to_out[0].bias.data.normal_()                                    # nothing left at zero
    store = A.CrossAttentionStore()
    ours = A._CrossAttnProcessor("layer", store, None, None)(attn, x, **kw)
    torch.testing.assert_close(ours, AttnProcessor()(attn, x, **kw))
    side, tokens = x.shape[-1], 5 if "attention_mask" in kw else x.shape[-1] ** 2
    (probs,) = store.probs["layer"]
    assert probs.shape == (2, 2, side * side, tokens) and store.side["layer"] == side
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, side * side))
    if "attention_mask" in kw:
        assert probs[..., -1].max() < 1e-6


def test_token_index_sees_only_the_77_positions_the_text_encoder_reads(tok):
    """CLIP reads 77 positions (start, 75 tokens, end): a word past them has no attention map."""
    inside = "a red circle " * 24 + "square"                      # 72 + 1 tokens: "square" at 73
    assert A.token_index(tok, inside, "square") == [73]
    past = "a red circle " * 25 + "square"                        # 76th token: cut with the end token kept
    with pytest.raises(ValueError, match="word 'square' is not in the prompt"):
        A.token_index(tok, past, "square")
    with pytest.raises(ValueError, match="is not in the prompt"):         # position 0 is no word of it
        A.token_index(tok, "a red circle", tok.bos_token)


def test_token_index_error_lists_the_prompt_words(tok):
    with pytest.raises(ValueError) as info:
        A.token_index(tok, "a red circle on the left", "square")
    assert str(info.value) == ("word 'square' is not in the prompt 'a red circle on the left' "
                               "(its words: ['a', 'red', 'circle', 'on', 'the', 'left'])")


@torch.no_grad()
def test_every_error_message_whole_and_the_index_and_call_checks(unet):
    x, t, text = _inputs()
    with pytest.raises(ValueError) as info:
        A.token_maps(A.CrossAttentionStore())
    assert str(info.value) == "store is empty: run the U-Net inside capture_cross_attention first"
    with pytest.raises(ValueError) as info:
        A.prompt_to_prompt(unet, inject_steps=2)
    assert str(info.value) == "keep_own and inject_steps need inject (a CrossAttentionStore of the source run)"
    with A.capture_cross_attention(unet) as store:                        # one U-Net call, batch of 2
        unet(x, t, encoder_hidden_states=text)
    assert A.token_maps(store).shape == (2, 77, 128, 128)                 # TinySD's image size by default
    for bad in (2, -1):
        with pytest.raises(ValueError) as info:
            A.token_maps(store, batch_index=bad)
        assert str(info.value) == f"batch_index must be in 0..1, got {bad}"
    with pytest.raises(ValueError, match="^step must be an int, got float$"):
        A.token_maps(store, steps=[0.0])
    # the source run must hold every call of every layer this run edits
    with A.prompt_to_prompt(unet, inject=store):                          # one call: fine
        unet(x, t, encoder_hidden_states=text)
    layer = store.layers[0]
    with pytest.raises(ValueError) as info:
        with A.prompt_to_prompt(unet, inject=store):
            unet(x, t, encoder_hidden_states=text)
            unet(x, t, encoder_hidden_states=text)                        # a second call: none stored
    assert str(info.value) == (f"inject holds no call 1 of layer {layer!r}: the source run must use "
                               "the same U-Net, batch and number of steps")
    partial = A.CrossAttentionStore({layer: store.probs[layer]}, {layer: store.side[layer]})
    with pytest.raises(ValueError, match=r"^inject holds no call 0 of layer "):
        with A.prompt_to_prompt(unet, inject=partial):                    # the other layers are missing
            unet(x, t, encoder_hidden_states=text)


def test_token_maps_upsample_as_pil_bilinear_does():
    """Pixel-centre bilinear upsampling (align_corners=False) is what PIL's BILINEAR resize does:
    an independent implementation of the same resampling."""
    import numpy as np
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    probs = torch.rand(1, 1, 16, 2, generator=g)                           # one head, 4x4 queries, 2 tokens
    store = A.CrossAttentionStore({"l": [probs]}, {"l": 4})
    maps = A.token_maps(store, size=16)
    for tok_i in range(2):
        small = probs[0, 0, :, tok_i].reshape(4, 4).numpy().astype(np.float32)
        want = np.asarray(Image.fromarray(small, "F").resize((16, 16), Image.BILINEAR))
        np.testing.assert_allclose(maps[0, tok_i].numpy(), want, atol=1e-5)


@torch.no_grad()
def test_index_zero_and_inject_steps_zero_are_allowed(unet):
    x, t, text = _inputs()
    with A.capture_cross_attention(unet) as store:
        plain = unet(x, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(A.token_maps(store, steps=[0]), A.token_maps(store))    # the first call
    with A.prompt_to_prompt(unet, reweight={0: 1.0}):                  # the start token may be reweighted
        same = unet(x, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(same, plain)
    other = torch.randn(text.shape, generator=torch.Generator().manual_seed(9))
    with A.prompt_to_prompt(unet, inject=store, inject_steps=0):        # inject nothing: its own maps
        own = unet(x, t, encoder_hidden_states=other).sample
    torch.testing.assert_close(own, unet(x, t, encoder_hidden_states=other).sample)
    with pytest.raises(ValueError) as info:
        A.prompt_to_prompt(unet, inject=store, inject_steps=-1)
    assert str(info.value) == "inject_steps must be >= 0, got -1"
