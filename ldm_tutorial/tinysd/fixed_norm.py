"""TinySD's decoder with the GroupNorms of its last stages frozen to per-channel affines.

GroupNorm normalises each image by that image's own statistics, so one strong feature block
anywhere (TinySD's decoder wrote one into the top-left corner) sets the scale of the whole
picture. `FixedNorm` is the same layer with its statistics frozen at their average over training
scenes: y = scale * x + shift per channel, so no position can steer another's scale.

`FixedNormAutoencoderKL` is diffusers' AutoencoderKL with one more config entry,
`fixed_norm_prefixes`: every GroupNorm whose module name starts with one of them is a FixedNorm.
It saves and loads with `save_pretrained` / `from_pretrained` like its parent. Its parameters are
named `scale` and `shift`, not `weight` and `bias`, so loading its folder as a plain
AutoencoderKL is not silent: diffusers warns that it lacks the GroupNorm weights, which it
leaves on the meta device, so a decode raises.
A pipeline folder names it in model_index.json as ("ldm_tutorial.tinysd.fixed_norm",
"FixedNormAutoencoderKL"); diffusers resolves that name from the modules already imported, which
`ldm.load_pipeline` and `tinysd.load_vae` do.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
# diffusers' pipeline loader finds a component's load method by looking up the base classes it
# knows (ModelMixin, ...) on the component's module, so the module must expose ModelMixin
from diffusers import ModelMixin  # noqa: F401
from diffusers.configuration_utils import register_to_config
from torch import nn

__all__ = ["FixedNorm", "FixedNormAutoencoderKL", "TAIL_PREFIXES", "group_norm_names", "group_stats",
           "with_group_norm_tail", "vae_class", "vae_index_entry"]

# the decoder's last two stages and its output layers: the tensors a decoder fine-tune trains
# (vae_lab's shared variants, scripts/fixed_norm_tail.py) while encoder and latents stay fixed
TAIL_PREFIXES = ("decoder.up_blocks.2.", "decoder.up_blocks.3.", "decoder.conv_norm_out.",
                 "decoder.conv_out.")


class FixedNorm(nn.Module):
    """y = scale * x + shift per channel: a GroupNorm whose statistics are frozen.

    `from_group_norm(gn, mean, std)` builds it from a GroupNorm and per-channel statistics
    (`group_stats` of its inputs, averaged over training images); it then equals
    `gn` on any input whose statistics are those averages.
    """

    def __init__(self, num_channels: int):
        super().__init__()
        if not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        self.num_channels = num_channels
        self.scale = nn.Parameter(torch.ones(num_channels))
        self.shift = nn.Parameter(torch.zeros(num_channels))

    @classmethod
    def from_group_norm(cls, gn: nn.GroupNorm, mean: torch.Tensor, std: torch.Tensor) -> FixedNorm:
        if not isinstance(gn, nn.GroupNorm) or not gn.affine:
            raise TypeError(f"gn must be an affine nn.GroupNorm, got {type(gn).__name__}")
        c = gn.num_channels
        if tuple(mean.shape) != (c,) or tuple(std.shape) != (c,):
            raise ValueError(f"mean and std must have shape ({c},), got "
                             f"{tuple(mean.shape)} and {tuple(std.shape)}")
        if not bool((std > 0).all()):
            raise ValueError("std must be positive in every channel")
        out = cls(c).to(gn.weight.device)
        with torch.no_grad():
            scale = gn.weight.float() / std.float()
            out.scale.copy_(scale)
            out.shift.copy_(gn.bias.float() - scale * mean.float())
        return out.to(gn.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.num_channels:
            raise ValueError(f"FixedNorm expects (B, {self.num_channels}, H, W), got {tuple(x.shape)}")
        return x * self.scale[:, None, None] + self.shift[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.num_channels}"


def group_stats(gn: nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image group mean and std of x as GroupNorm computes them, spread to channels: (B, C) each."""
    b, c = x.shape[:2]
    g = x.float().reshape(b, gn.num_groups, -1)
    mean = g.mean(-1)
    std = (g.var(-1, unbiased=False) + gn.eps).sqrt()
    rep = c // gn.num_groups
    return mean.repeat_interleave(rep, 1), std.repeat_interleave(rep, 1)


def group_norm_names(model: nn.Module, prefixes=("",)) -> list[str]:
    """Names of the nn.GroupNorm modules of `model` that start with one of `prefixes`."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.GroupNorm) and any(n.startswith(p) for p in prefixes)]


class FixedNormAutoencoderKL(AutoencoderKL):
    """AutoencoderKL whose GroupNorms under `fixed_norm_prefixes` are `FixedNorm`s.

    fixed_norm_prefixes: module-name prefixes, e.g. ("decoder.up_blocks.2.",
    "decoder.conv_norm_out"). Every other argument is AutoencoderKL's. With no prefix it is an
    AutoencoderKL.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: tuple[float] | None = None,
        latents_std: tuple[float] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
        fixed_norm_prefixes: tuple[str, ...] = (),
    ):
        super().__init__(
            in_channels=in_channels, out_channels=out_channels,
            down_block_types=down_block_types, up_block_types=up_block_types,
            block_out_channels=block_out_channels, layers_per_block=layers_per_block,
            act_fn=act_fn, latent_channels=latent_channels, norm_num_groups=norm_num_groups,
            sample_size=sample_size, scaling_factor=scaling_factor, shift_factor=shift_factor,
            latents_mean=latents_mean, latents_std=latents_std, force_upcast=force_upcast,
            use_quant_conv=use_quant_conv, use_post_quant_conv=use_post_quant_conv,
            mid_block_add_attention=mid_block_add_attention)
        if isinstance(fixed_norm_prefixes, str) or not all(
                isinstance(p, str) and p for p in fixed_norm_prefixes):
            raise ValueError("fixed_norm_prefixes must be a list of non-empty module-name "
                             f"prefixes, got {fixed_norm_prefixes!r}")
        prefixes = tuple(fixed_norm_prefixes)
        names = group_norm_names(self, prefixes)
        unmatched = [p for p in prefixes if not any(n.startswith(p) for n in names)]
        if unmatched:
            raise ValueError(f"fixed_norm_prefixes {unmatched} match no GroupNorm of this "
                             f"AutoencoderKL (its GroupNorms: {group_norm_names(self)[:4]}...)")
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = self.get_submodule(parent_name)
            setattr(parent, child, FixedNorm(getattr(parent, child).num_channels))

    def fixed_norm_names(self) -> list[str]:
        return [n for n, m in self.named_modules() if isinstance(m, FixedNorm)]


# model_index.json entries ([library, class]) of the autoencoder classes a TinySD folder may hold
VAE_CLASSES = {"AutoencoderKL": ["diffusers", "AutoencoderKL"],
               "FixedNormAutoencoderKL": [__name__, "FixedNormAutoencoderKL"]}


def vae_index_entry(folder) -> list[str]:
    """The model_index.json entry of the autoencoder saved in `folder` (from its config.json)."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"folder must hold a diffusers autoencoder (config.json): {cfg} is missing")
    name = json.loads(cfg.read_text()).get("_class_name")
    if name not in VAE_CLASSES:
        raise ValueError(f"{cfg}: _class_name must be one of {sorted(VAE_CLASSES)}, got {name!r}")
    return list(VAE_CLASSES[name])


def with_group_norm_tail(vae: AutoencoderKL, tail: dict[str, torch.Tensor]) -> AutoencoderKL:
    """A plain AutoencoderKL (float32, eval): `vae` with the decoder tail in `tail` in place of its own.

    tail: every tensor of a GroupNorm AutoencoderKL under TAIL_PREFIXES (a GroupNorm decoder's
    last stages, e.g. TinySD's before its norms were frozen). The rest (encoder, latents,
    earlier decoder stages) is `vae`'s, so both decode the same latents.
    """
    if not isinstance(vae, AutoencoderKL):
        raise TypeError(f"vae must be a diffusers AutoencoderKL, got {type(vae).__name__}")
    cfg = {k: v for k, v in vae.config.items() if not k.startswith("_") and k != "fixed_norm_prefixes"}
    model = AutoencoderKL(**cfg)
    want = {k for k in model.state_dict() if k.startswith(TAIL_PREFIXES)}
    if set(tail) != want:
        raise ValueError(f"tail must hold exactly the tensors under {TAIL_PREFIXES}: missing "
                         f"{sorted(want - set(tail))[:3]}, extra {sorted(set(tail) - want)[:3]}")
    state = {k: v for k, v in vae.state_dict().items() if not k.startswith(TAIL_PREFIXES)}
    state.update(tail)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.to(vae.device).eval()


def vae_class(folder) -> type:
    """AutoencoderKL or FixedNormAutoencoderKL, as the config.json in `folder` names it."""
    return FixedNormAutoencoderKL if vae_index_entry(folder)[1] == "FixedNormAutoencoderKL" else AutoencoderKL
