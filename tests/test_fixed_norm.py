"""tinysd.fixed_norm: a GroupNorm with frozen statistics, and an AutoencoderKL built with it."""
import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from ldm_tutorial import tinysd
from ldm_tutorial.metrics import psnr
from ldm_tutorial.tinysd import configs, defects, shapes, train
from ldm_tutorial.tinysd.fixed_norm import (TAIL_PREFIXES, FixedNorm, FixedNormAutoencoderKL,
                                            group_norm_names, group_stats, vae_class,
                                            vae_index_entry, with_group_norm_tail)

PREFIXES = ("decoder.up_blocks.2.", "decoder.up_blocks.3.", "decoder.conv_norm_out")


def _image_stats(gn, x):
    """group_stats of the first image of x: what FixedNorm freezes to reproduce gn on it."""
    mean, std = group_stats(gn, x)
    return mean[0], std[0]


def test_fixed_norm_is_the_group_norm_at_its_statistics_and_local():
    torch.manual_seed(0)
    gn = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 2.0), gn.bias.uniform_(-1, 1)
    x = torch.randn(1, 8, 16, 16) * 3 + 1
    fn = FixedNorm.from_group_norm(gn, *_image_stats(gn, x))
    assert torch.allclose(fn(x), gn(x), atol=1e-5)
    # a bright block in the corner rescales the whole GroupNorm output, not the FixedNorm one
    y = x.clone()
    y[..., :4, :4] += 50
    inner = (..., slice(8, None), slice(8, None))
    assert (gn(y)[inner] - gn(x)[inner]).abs().max() > 0.1
    assert torch.equal(fn(y)[inner], fn(x)[inner])


def test_fixed_norm_refuses_bad_input():
    gn = torch.nn.GroupNorm(4, 8)
    with pytest.raises(ValueError, match=r"mean and std must have shape \(8,\)"):
        FixedNorm.from_group_norm(gn, torch.zeros(4), torch.ones(8))
    with pytest.raises(ValueError, match="std must be positive"):
        FixedNorm.from_group_norm(gn, torch.zeros(8), torch.zeros(8))
    with pytest.raises(ValueError, match="num_channels"):
        FixedNorm(0)
    with pytest.raises(ValueError, match=r"expects \(B, 8, H, W\)"):
        FixedNorm(8)(torch.zeros(1, 3, 4, 4))


def test_autoencoder_replaces_exactly_the_named_group_norms():
    vae = FixedNormAutoencoderKL(**configs.VAE, fixed_norm_prefixes=PREFIXES)
    plain = AutoencoderKL(**configs.VAE)
    fixed = vae.fixed_norm_names()
    assert fixed == group_norm_names(plain, PREFIXES) and len(fixed) == 9
    assert len(group_norm_names(vae)) == len(group_norm_names(plain)) - 9
    assert FixedNormAutoencoderKL(**configs.VAE).fixed_norm_names() == []
    with pytest.raises(ValueError, match="fixed_norm_prefixes"):
        FixedNormAutoencoderKL(**configs.VAE, fixed_norm_prefixes=("decoder.nowhere",))
    with pytest.raises(ValueError, match="fixed_norm_prefixes"):
        FixedNormAutoencoderKL(**configs.VAE, fixed_norm_prefixes="decoder.")


def _fixed_norm_vae():
    """TinySD's VAE with its tail norms frozen at one scene's statistics (no training needed)."""
    src = tinysd.load_vae(groupnorm=True)      # the GroupNorm decoder
    vae = FixedNormAutoencoderKL(**configs.VAE, fixed_norm_prefixes=PREFIXES)
    state = {k: v for k, v in src.state_dict().items() if not k.startswith(PREFIXES)}
    x = shapes.render(shapes.sample_scenes(1, seed=7))
    stats, hooks = {}, []
    for name in vae.fixed_norm_names():
        gn = src.get_submodule(name)
        hooks.append(gn.register_forward_pre_hook(
            lambda m, a, name=name: stats.__setitem__(name, _image_stats(m, a[0]))))
    with torch.no_grad():
        ref = src(x).sample
    for h in hooks:
        h.remove()
    for k, v in src.state_dict().items():
        if k.startswith(PREFIXES) and not any(k.startswith(n + ".") for n in stats):
            state[k] = v
    for name, (mean, std) in stats.items():
        fn = FixedNorm.from_group_norm(src.get_submodule(name), mean, std)
        state[name + ".scale"], state[name + ".shift"] = fn.scale.data, fn.shift.data
    vae.load_state_dict(state, strict=True)
    return vae.eval(), x, ref


def test_saved_folder_round_trips_and_a_plain_autoencoder_load_is_flagged(tmp_path, caplog):
    vae, x, ref = _fixed_norm_vae()
    with torch.no_grad():
        out = vae(x).sample
    assert torch.allclose(out, ref, atol=1e-3)       # frozen at this scene's statistics
    vae.save_pretrained(tmp_path / "vae")
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert cfg["_class_name"] == "FixedNormAutoencoderKL"
    assert cfg["fixed_norm_prefixes"] == list(PREFIXES)
    again = FixedNormAutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    with torch.no_grad():
        assert torch.equal(again(x).sample, out)
    # diffusers' own class cannot hold FixedNorms (their tensors are scale/shift, not
    # weight/bias): it names the GroupNorm weights it lacks, and they stay unusable
    plain = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert "decoder.conv_norm_out.weight" in caplog.text and "newly initialized" in caplog.text
    with torch.no_grad(), pytest.raises(RuntimeError, match="meta"):
        plain(x)


def test_pipeline_folder_that_names_the_class_loads_it(tmp_path):
    vae, x, _ = _fixed_norm_vae()
    folder = tmp_path / "tinysd"
    shutil.copytree(tinysd.pipeline_dir("text2img"), folder,
                    ignore=shutil.ignore_patterns("vae"))
    vae.save_pretrained(folder / "vae")
    train.write_model_index(folder)               # names the class its vae/ folder holds
    index = json.loads((folder / "model_index.json").read_text())
    assert index["vae"] == ["ldm_tutorial.tinysd.fixed_norm", "FixedNormAutoencoderKL"]
    assert tinysd.load_vae(weights_dir=tmp_path).fixed_norm_names() == vae.fixed_norm_names()
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert type(pipe.vae) is FixedNormAutoencoderKL
    assert len(pipe.vae.fixed_norm_names()) == 9
    with torch.no_grad():
        assert torch.equal(pipe.vae(x).sample, vae(x).sample)


def test_vae_class_reads_the_folder_and_refuses_others(tmp_path):
    shipped = tinysd.component_dir("vae")
    assert vae_class(shipped) is FixedNormAutoencoderKL
    assert vae_index_entry(shipped) == ["ldm_tutorial.tinysd.fixed_norm", "FixedNormAutoencoderKL"]
    assert type(tinysd.load_vae()) is FixedNormAutoencoderKL
    with pytest.raises(FileNotFoundError, match="config.json"):
        vae_class(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    assert vae_class(tmp_path) is AutoencoderKL
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    with pytest.raises(ValueError, match="_class_name must be one of"):
        vae_class(tmp_path)


def test_model_index_names_the_vae_class_of_the_folder(tmp_path):
    (tmp_path / "vae").mkdir()
    shutil.copy(tinysd.component_dir("vae") / "config.json", tmp_path / "vae")
    train.write_model_index(tmp_path)
    shipped = json.loads((tinysd.pipeline_dir("text2img") / "model_index.json").read_text())
    assert json.loads((tmp_path / "model_index.json").read_text()) == shipped
    tinysd.load_vae(groupnorm=True).save_pretrained(tmp_path / "vae")   # a GroupNorm folder
    train.write_model_index(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert {k: v for k, v in index.items() if k != "vae"} == {
        k: v for k, v in shipped.items() if k != "vae"}


def test_shipped_decoder_has_no_corner_smudge_and_the_groupnorm_tail_has():
    shipped, gn = tinysd.load_vae(), tinysd.load_vae(groupnorm=True)
    assert len(shipped.fixed_norm_names()) == 9
    assert type(gn) is AutoencoderKL and not any(isinstance(m, FixedNorm) for m in gn.modules())
    x = shapes.render(shapes.sample_scenes(16, seed=21))
    with torch.no_grad():
        z = shipped.encode(x).latent_dist.mode()
        assert torch.equal(z, gn.encode(x).latent_dist.mode())      # one encoder, one latent space
        fixed = shipped.decode(z).sample.clamp(-1, 1)
        group = gn.decode(z).sample.clamp(-1, 1)
    f = defects.corner_smudge(fixed, x, paired=True)
    g = defects.corner_smudge(group, x, paired=True)
    assert g["ratio"] > 3 and g["smudged_share"] > 0.4            # measured 4.4x, 10 of 16
    assert f["ratio"] < 2 and f["smudged_share"] < 0.2            # measured 1.4x, 1 of 16
    assert psnr(fixed, x).mean() > psnr(group, x).mean()          # and no blurrier


def test_with_group_norm_tail_refuses_a_wrong_tail():
    shipped = tinysd.load_vae()
    from safetensors.torch import load_file
    tail = load_file(str(tinysd.component_dir("vae_groupnorm") / tinysd.GROUPNORM_TAIL_FILE))
    assert all(k.startswith(TAIL_PREFIXES) for k in tail)
    short = dict(tail)
    short.pop("decoder.conv_norm_out.weight")
    with pytest.raises(ValueError, match="missing .*decoder.conv_norm_out.weight"):
        with_group_norm_tail(shipped, short)
    with pytest.raises(TypeError, match="vae must be a diffusers AutoencoderKL"):
        with_group_norm_tail(torch.nn.Linear(2, 2), tail)
    with pytest.raises(TypeError, match="groupnorm must be True or False"):
        tinysd.load_vae(groupnorm="yes")


def test_groupnorm_load_without_the_tail_names_the_missing_file(tmp_path):
    shutil.copytree(tinysd.component_dir("vae"), tmp_path / "tinysd" / "vae")
    assert type(tinysd.load_vae(weights_dir=tmp_path)) is FixedNormAutoencoderKL
    with pytest.raises(FileNotFoundError, match="tinysd-vae-groupnorm.*--export ROOT"):
        tinysd.load_vae(weights_dir=tmp_path, groupnorm=True)
