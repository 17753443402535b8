import pytest
import torch
from torch import nn

import ldm_tutorial as ldm


@pytest.mark.parametrize("name, expected", [
    ("sd15-unet", 859.52e6), ("sd-vae", 83.65e6), ("clip-l-text", 123.06e6),
])
def test_sd15_parameter_counts(name, expected):
    model = ldm.build_on_meta(name)
    assert next(model.parameters()).device.type == "meta"
    n = ldm.count_parameters(model)
    assert abs(n - expected) / expected < 0.005, f"{name}: {n:,}"


def test_count_parameters_counts_shared_weights_once():
    shared = nn.Linear(4, 4)  # 20 parameters
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert ldm.count_parameters(model) == 20
    emb, head = nn.Embedding(10, 3), nn.Linear(3, 10, bias=False)
    head.weight = emb.weight  # tied, as in language models
    assert ldm.count_parameters(nn.ModuleList([emb, head])) == 30


def test_t5_tied_embeddings_counted_once_on_meta():
    model = ldm.build_on_meta("t5-xxl-encoder")
    assert model.shared.weight is model.encoder.embed_tokens.weight
    n = ldm.count_parameters(model)
    assert 4.6e9 < n < 4.9e9, n


def test_meta_forward_gives_shapes():
    unet = ldm.build_on_meta("sd15-unet")
    with torch.no_grad():
        out = unet(torch.empty(2, 4, 64, 64, device="meta"), 10,
                   encoder_hidden_states=torch.empty(2, 77, 768, device="meta")).sample
    assert out.shape == (2, 4, 64, 64) and out.device.type == "meta"


def test_attention_table_sd15():
    rows = ldm.attention_table(ldm.CONFIGS["sd15-unet"].config, image_size=512)
    assert [r.latent_hw for r in rows] == [(64, 64), (32, 32), (16, 16), (8, 8)]
    assert rows[0].tokens == 4096 and rows[0].matrix_elements == 4096 ** 2
    sdxl = ldm.attention_table(ldm.CONFIGS["sdxl-base-unet"].config, image_size=1024)
    assert [r.latent_hw for r in sdxl] == [(64, 64), (32, 32), (32, 32)]  # no attention at 128x128


def test_attention_table_rejects_bad_size():
    with pytest.raises(ValueError, match="image_size"):
        ldm.attention_table(ldm.CONFIGS["sd15-unet"].config, image_size=500)


def test_build_on_meta_unknown_name():
    with pytest.raises(ValueError, match="name must be one of"):
        ldm.build_on_meta("sd16-unet")
