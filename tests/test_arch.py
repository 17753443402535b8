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


def test_adm_256_approximation_matches_the_published_parameter_count():
    """ADM 256x256 (arXiv:2105.05233, hyper-parameter table): 554M parameters."""
    adm = ldm.build_on_meta("adm-256-unet")
    n = ldm.count_parameters(adm)
    assert abs(n - 554e6) / 554e6 < 0.01, f"{n:,}"
    assert adm.config.out_channels == 6 and adm.config.resnet_time_scale_shift == "scale_shift"


def test_forward_flops_counts_a_convolution_exactly_and_works_on_meta():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    flops = ldm.arch.forward_flops(conv, torch.zeros(1, 3, 16, 16))
    assert flops == 2 * 3 * 8 * 3 * 3 * 16 * 16                       # 2 per multiply-add
    with torch.device("meta"):
        meta_conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    assert ldm.arch.forward_flops(meta_conv, torch.empty(1, 3, 16, 16, device="meta")) == flops


def test_forward_flops_pixel_adm_costs_more_than_sd15_latent_unet():
    adm = ldm.build_on_meta("adm-256-unet")
    sd15 = ldm.build_on_meta("sd15-unet")
    meta = dict(device="meta")
    adm_flops = ldm.arch.forward_flops(adm, torch.empty(1, 3, 256, 256, **meta), torch.tensor([500], **meta),
                                       class_labels=torch.zeros(1, dtype=torch.long, **meta))
    sd_flops = ldm.arch.forward_flops(sd15, torch.empty(1, 4, 64, 64, **meta), 500,
                                      encoder_hidden_states=torch.empty(1, 77, 768, **meta))
    assert 2.1e12 < adm_flops < 2.4e12 and 0.75e12 < sd_flops < 0.85e12
    assert adm_flops / sd_flops > 2.5                                   # and SD's output has 4x the pixels


def test_forward_flops_rejects_a_non_module():
    with pytest.raises(ValueError, match="module must be a torch.nn.Module"):
        ldm.arch.forward_flops(lambda x: x, torch.zeros(1))
