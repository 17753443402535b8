"""The Stable Diffusion family as configs, built on the meta device (introduced in chapter 0).

The configs are the key fields of the published diffusers/transformers config files (see
/work/shared/reference/sd-configs.md in the project notes). Building on the meta device allocates
no memory and downloads nothing, so parameter counts and tensor shapes of multi-billion-parameter
models can be computed on a laptop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# --- U-Nets (diffusers UNet2DConditionModel). `attention_head_dim` is diffusers' legacy name for
# the number of heads per attention layer.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, use_linear_projection=False,
    norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
)
SD15_INPAINT_UNET = {**SD15_UNET, "in_channels": 9}
SD21_UNET = {**SD15_UNET, "sample_size": 96, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
             "use_linear_projection": True, "upcast_attention": True}
SDXL_BASE_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280],
    layers_per_block=2, attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
    cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
# Derived from Stability's sd_xl_refiner.yaml with diffusers' converter (not quoted from a config file).
SDXL_REFINER_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=[384, 768, 1536, 1536],
    layers_per_block=2, attention_head_dim=[6, 12, 24, 24], transformer_layers_per_block=4, cross_attention_dim=1280,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560,
)

# --- Autoencoders (diffusers AutoencoderKL / AutoencoderTiny).
SD_VAE = dict(
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, in_channels=3,
    out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SD3_VAE = {**SDXL_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
           "scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159, "mid_block_add_attention": True}
TAESD = dict(
    encoder_block_out_channels=[64] * 4, decoder_block_out_channels=[64] * 4, num_encoder_blocks=[1, 3, 3, 3],
    num_decoder_blocks=[3, 3, 3, 1], latent_channels=4, act_fn="relu", upsample_fn="nearest",
    upsampling_scaling_factor=2, latent_magnitude=3, latent_shift=0.5, scaling_factor=1.0,
)

# --- Text encoders (transformers).
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=49408, projection_dim=768)
OPENCLIP_H_TEXT_SD2 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                           hidden_act="gelu", max_position_embeddings=77, vocab_size=49408, projection_dim=512)
OPENCLIP_BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                          hidden_act="gelu", max_position_embeddings=77, vocab_size=49408, projection_dim=1280)
T5_XXL_ENCODER = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                      feed_forward_proj="gated-gelu")

# --- Diffusion transformers (diffusers).
SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, pos_embed_max_size=192,
)
FLUX1_SCHNELL_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=False, axes_dims_rope=[16, 56, 56],
)
FLUX1_DEV_TRANSFORMER = {**FLUX1_SCHNELL_TRANSFORMER, "guidance_embeds": True}


@dataclass(frozen=True)
class ArchConfig:
    """One named component: which class builds it and with which config."""

    name: str
    cls: str  # "diffusers.UNet2DConditionModel", "transformers.CLIPTextModel", ...
    config: dict[str, Any] = field(repr=False)
    note: str = ""


CONFIGS: dict[str, ArchConfig] = {c.name: c for c in [
    ArchConfig("sd15-unet", "diffusers.UNet2DConditionModel", SD15_UNET),
    ArchConfig("sd15-inpaint-unet", "diffusers.UNet2DConditionModel", SD15_INPAINT_UNET,
               "9 input channels: 4 noisy latents + 4 masked-image latents + 1 mask"),
    ArchConfig("sd21-unet", "diffusers.UNet2DConditionModel", SD21_UNET),
    ArchConfig("sdxl-base-unet", "diffusers.UNet2DConditionModel", SDXL_BASE_UNET),
    ArchConfig("sdxl-refiner-unet", "diffusers.UNet2DConditionModel", SDXL_REFINER_UNET,
               "derived from sd_xl_refiner.yaml with diffusers' converter, not quoted"),
    ArchConfig("sd-vae", "diffusers.AutoencoderKL", SD_VAE),
    ArchConfig("sdxl-vae", "diffusers.AutoencoderKL", SDXL_VAE),
    ArchConfig("sd3-vae", "diffusers.AutoencoderKL", SD3_VAE),
    ArchConfig("flux-vae", "diffusers.AutoencoderKL", FLUX_VAE),
    ArchConfig("taesd", "diffusers.AutoencoderTiny", TAESD),
    ArchConfig("clip-l-text", "transformers.CLIPTextModel", CLIP_L_TEXT),
    ArchConfig("openclip-h-text-sd2", "transformers.CLIPTextModel", OPENCLIP_H_TEXT_SD2,
               "SD 2 uses 23 of OpenCLIP-H's 24 layers"),
    ArchConfig("openclip-bigg-text", "transformers.CLIPTextModelWithProjection", OPENCLIP_BIGG_TEXT),
    ArchConfig("t5-xxl-encoder", "transformers.T5EncoderModel", T5_XXL_ENCODER),
    ArchConfig("sd3-medium-transformer", "diffusers.SD3Transformer2DModel", SD3_MEDIUM_TRANSFORMER),
    ArchConfig("flux1-schnell-transformer", "diffusers.FluxTransformer2DModel", FLUX1_SCHNELL_TRANSFORMER),
    ArchConfig("flux1-dev-transformer", "diffusers.FluxTransformer2DModel", FLUX1_DEV_TRANSFORMER),
]}


def _build(spec: ArchConfig) -> nn.Module:
    library, cls_name = spec.cls.split(".")
    if library == "diffusers":
        import diffusers

        cls = getattr(diffusers, cls_name)
        return cls.from_config(dict(spec.config))
    import transformers

    cls = getattr(transformers, cls_name)
    config_cls = transformers.T5Config if cls_name.startswith("T5") else transformers.CLIPTextConfig
    return cls(config_cls(**spec.config))


def build_on_meta(name: str) -> nn.Module:
    """Build the named component of `CONFIGS` on the meta device (no memory, no download).

    Args:
        name: a key of `CONFIGS`, e.g. "sd15-unet", "sd-vae", "clip-l-text".
    Returns:
        The module, in eval mode, every parameter on the meta device. Forward passes on meta
        tensors give output shapes without computing values.
    """
    if name not in CONFIGS:
        raise ValueError(f"name must be one of {sorted(CONFIGS)}, got {name!r}")
    with torch.device("meta"):
        module = _build(CONFIGS[name])
    return module.eval()


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of `module`, counting a parameter shared by several submodules once."""
    unique = {id(p): p for p in module.parameters()}  # parameters() already skips repeats; be explicit
    return sum(p.numel() for p in unique.values())


@dataclass(frozen=True)
class AttentionRow:
    """Self-attention cost at one U-Net resolution (per head, per attention layer)."""

    latent_hw: tuple[int, int]
    channels: int
    tokens: int            # positions attended over = H * W
    matrix_elements: int   # entries of one head's attention matrix = tokens ** 2


def attention_table(unet_config: dict[str, Any], image_size: int, vae_scale_factor: int = 8) -> list[AttentionRow]:
    """Tokens and attention-matrix size of self-attention at each resolution of a U-Net.

    Args:
        unet_config: a U-Net config such as `SD15_UNET`.
        image_size: image side in pixels (square images).
        vae_scale_factor: pixels per latent along one side (8 for every SD VAE).
    Returns:
        One `AttentionRow` per down-block resolution that has attention, plus the mid block,
        highest resolution first.
    """
    if image_size % vae_scale_factor:
        raise ValueError(f"image_size must be a multiple of vae_scale_factor={vae_scale_factor}, got {image_size}")
    side = image_size // vae_scale_factor
    rows = []
    blocks = unet_config["down_block_types"]
    for i, (block, channels) in enumerate(zip(blocks, unet_config["block_out_channels"])):
        if "Attn" in block:
            rows.append(AttentionRow((side, side), channels, side * side, (side * side) ** 2))
        if i < len(blocks) - 1:
            side //= 2
    if "CrossAttn" in unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn"):
        channels = unet_config["block_out_channels"][-1]
        rows.append(AttentionRow((side, side), channels, side * side, (side * side) ** 2))
    return rows
