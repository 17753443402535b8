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

from .runtime import dtype_kwargs, hub_available, hub_reason, pick_device, pick_dtype, quiet_loading

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

# --- SD 1.5's scheduler config (stable-diffusion-v1-5 `scheduler/scheduler_config.json`): a PNDM
# scheduler (PLMS steps only), not DDIM. Chapter 5 shows what a DDIM built from it inherits.
SD15_SCHEDULER = dict(
    _class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    trained_betas=None, clip_sample=False,
)

# --- A pixel-space U-Net for comparison (chapter 0): ADM, the 256x256 class-conditional model of
# Dhariwal & Nichol 2021 (arXiv:2105.05233; guided-diffusion README flags: num_channels 256,
# channel_mult 1,1,2,2,4,4, num_res_blocks 2, attention at 32,16,8, num_head_channels 64,
# resblock_updown, use_scale_shift_norm, learn_sigma -> 6 output channels, 1000 classes).
# An approximation built from diffusers blocks (UNet2DModel), not a port of guided-diffusion's code:
# ResNet blocks that up/downsample (resblock_updown), scale-shift time conditioning, 64-dim heads.
ADM_256_UNET = dict(
    sample_size=256, in_channels=3, out_channels=6, layers_per_block=2,
    block_out_channels=[256, 256, 512, 512, 1024, 1024],                 # 256 x channel_mult
    down_block_types=["ResnetDownsampleBlock2D"] * 3 + ["AttnDownBlock2D"] * 3,   # attention at 32, 16, 8
    up_block_types=["AttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"] * 3,
    downsample_type="resnet", upsample_type="resnet", resnet_time_scale_shift="scale_shift",
    attention_head_dim=64, norm_num_groups=32, num_class_embeds=1000, add_attention=True,
)


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
    ArchConfig("adm-256-unet", "diffusers.UNet2DModel", ADM_256_UNET,
               "ADM 256x256 (pixel space), approximated with diffusers blocks"),
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


def decoder_features(vae, latents: torch.Tensor, stage: int) -> torch.Tensor:
    """An AutoencoderKL decoder's features entering `up_blocks[stage]`: diffusers' Decoder.forward,
    run up to there (`decoder_rest` runs the rest; together they are `vae.decode(latents).sample`)."""
    d = vae.decoder
    h = d.mid_block(d.conv_in(vae.post_quant_conv(latents)))
    for block in d.up_blocks[:stage]:
        h = block(h)
    return h


def decoder_rest(vae, h: torch.Tensor, stage: int) -> torch.Tensor:
    """The decoder from `up_blocks[stage]` on, given `decoder_features(vae, latents, stage)`."""
    d = vae.decoder
    for block in d.up_blocks[stage:]:
        h = block(h)
    return d.conv_out(d.conv_act(d.conv_norm_out(h)))


def forward_flops(module: nn.Module, *args, **kwargs) -> int:
    """Floating-point operations of one forward pass, counted by `torch.utils.flop_counter`.

    Works on the meta device: shapes are enough to count, so no value is computed and no memory
    is used. A multiply-add counts as 2 operations (PyTorch's convention); convolutions, matrix
    products and attention are counted, elementwise operations and normalizations are not.

    Args:
        module: the network (e.g. `build_on_meta("sd15-unet")`).
        *args, **kwargs: the inputs of `module(...)`, on the module's device.
    Returns:
        The total count, an int (divide by 1e9 for GFLOPs).
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    return int(counter.get_total_flops())


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


# =====================================================================================================
# The SD family side by side (introduced in chapter 5, "Stable Diffusion versions").
# =====================================================================================================

# Text tokens that MM-DiT models put into the joint sequence, by the diffusers pipelines' defaults:
# SD3: 77 CLIP tokens + `max_sequence_length=256` T5 tokens; FLUX.1: `max_sequence_length=512` T5 tokens.
SD3_TEXT_TOKENS = 77 + 256
FLUX_TEXT_TOKENS = 512
CLIP_TOKENS = 77


@dataclass(frozen=True)
class FamilyMember:
    """One component of one model of the family, with its published parameter count (if any)."""

    model: str
    component: str
    name: str                      # key of `CONFIGS`
    kind: str                      # "denoiser", "vae" or "text"
    image_size: int                # native image side in pixels (text encoders: the model's native size)
    published: float | None = None
    source: str = ""


FAMILY: tuple[FamilyMember, ...] = (
    FamilyMember("SD 1.5", "U-Net", "sd15-unet", "denoiser", 512, 860e6, "SDXL paper Tab. 1 (arXiv:2307.01952)"),
    FamilyMember("SD 2.1", "U-Net", "sd21-unet", "denoiser", 768, 865e6, "SDXL paper Tab. 1 (arXiv:2307.01952)"),
    FamilyMember("SDXL base", "U-Net", "sdxl-base-unet", "denoiser", 1024, 2.6e9,
                 "SDXL paper Tab. 1 (arXiv:2307.01952)"),
    FamilyMember("SDXL refiner", "U-Net", "sdxl-refiner-unet", "denoiser", 1024, None,
                 "no published U-Net count; the widely repeated 1.3B is wrong"),
    FamilyMember("SD3-medium", "MM-DiT", "sd3-medium-transformer", "denoiser", 1024, 2e9,
                 "Stability AI, SD3 Medium release (June 2024)"),
    FamilyMember("FLUX.1-schnell", "MM-DiT", "flux1-schnell-transformer", "denoiser", 1024, 12e9,
                 "FLUX.1-schnell model card"),
    FamilyMember("FLUX.1-dev", "MM-DiT", "flux1-dev-transformer", "denoiser", 1024, 12e9, "FLUX.1-dev model card"),
    FamilyMember("SD 1.x / 2.x", "VAE", "sd-vae", "vae", 512),
    FamilyMember("SDXL", "VAE", "sdxl-vae", "vae", 1024),
    FamilyMember("SD3", "VAE", "sd3-vae", "vae", 1024),
    FamilyMember("FLUX.1", "VAE", "flux-vae", "vae", 1024),
    FamilyMember("SD 1.x, SDXL, SD3, FLUX.1", "CLIP-L text", "clip-l-text", "text", 512, 123e6,
                 "CompVis stable-diffusion README (\"123M text encoder\")"),
    FamilyMember("SD 2.x", "OpenCLIP-H text (23/24 l.)", "openclip-h-text-sd2", "text", 768),
    FamilyMember("SDXL, SD3", "OpenCLIP-bigG text", "openclip-bigg-text", "text", 1024, 817e6 - 123e6,
                 "SDXL paper Sec. 2.1: both encoders 817M, minus CLIP-L's 123M"),
    FamilyMember("SD3, FLUX.1", "T5-XXL encoder", "t5-xxl-encoder", "text", 1024, 4.7e9,
                 "SD3 paper (arXiv:2403.03206)"),
)


@dataclass(frozen=True)
class AttentionSite:
    """Self- (U-Net) or joint (MM-DiT) attention at one place of a denoiser, for one image.

    `tokens` is the length of the sequence every query attends over: H*W latent positions for a
    U-Net, image patches plus text tokens for an MM-DiT. Each of `blocks` transformer blocks builds
    `heads` attention matrices of `tokens` x `tokens` entries (if the matrix is materialized).
    """

    where: str
    image_tokens: int
    text_tokens: int
    heads: int
    blocks: int

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens

    @property
    def matrix_elements(self) -> int:
        """Entries of one head's attention matrix."""
        return self.tokens ** 2


def attention_sites(model: nn.Module, image_size: int, vae_scale_factor: int = 8,
                    text_tokens: int | None = None) -> list[AttentionSite]:
    """Where a denoiser attends over the image, read from the built model (chapter 5).

    Args:
        model: a diffusers `UNet2DConditionModel`, `SD3Transformer2DModel` or `FluxTransformer2DModel`
            (on the meta device is fine).
        image_size: image side in pixels (square images).
        vae_scale_factor: pixels per latent along one side (8 for every SD VAE).
        text_tokens: text tokens in an MM-DiT's joint sequence; default `SD3_TEXT_TOKENS` or
            `FLUX_TEXT_TOKENS`. Ignored for U-Nets (their text enters by cross-attention).
    Returns:
        U-Net: one site per resolution that has transformer blocks (self-attention), highest first,
        with resolutions that have none left out. MM-DiT: one site per kind of block.
    """
    if image_size % vae_scale_factor:
        raise ValueError(f"image_size must be a multiple of vae_scale_factor={vae_scale_factor}, got {image_size}")
    latent = image_size // vae_scale_factor
    kind = type(model).__name__
    if kind == "UNet2DConditionModel":
        n = len(model.down_blocks)
        per_side: dict[int, list[int]] = {}       # side -> [heads, blocks]

        def add(block, side):
            for m in block.modules():
                if type(m).__name__ == "BasicTransformerBlock":
                    entry = per_side.setdefault(side, [m.attn1.heads, 0])
                    entry[1] += 1

        for i, block in enumerate(model.down_blocks):
            add(block, latent // 2 ** i)
        add(model.mid_block, latent // 2 ** (n - 1))
        for j, block in enumerate(model.up_blocks):
            add(block, latent // 2 ** (n - 1 - j))
        return [AttentionSite(f"{s}x{s}", s * s, 0, h, b) for s, (h, b) in sorted(per_side.items(), reverse=True)]
    if kind == "SD3Transformer2DModel":
        p = model.config.patch_size
        side = latent // p
        txt = SD3_TEXT_TOKENS if text_tokens is None else text_tokens
        return [AttentionSite(f"joint {side}x{side} patches + {txt} text", side * side, txt,
                              model.config.num_attention_heads, len(model.transformer_blocks))]
    if kind == "FluxTransformer2DModel":
        side = latent // 2                         # the pipeline packs 2x2 latent patches into 64 channels
        txt = FLUX_TEXT_TOKENS if text_tokens is None else text_tokens
        heads = model.config.num_attention_heads
        return [AttentionSite(f"joint (double) {side}x{side} + {txt} text", side * side, txt, heads,
                              len(model.transformer_blocks)),
                AttentionSite(f"joint (single) {side}x{side} + {txt} text", side * side, txt, heads,
                              len(model.single_transformer_blocks))]
    raise ValueError(f"model must be a UNet2DConditionModel, SD3Transformer2DModel or FluxTransformer2DModel, got {kind}")


def attention_matrix_bytes(sites: list[AttentionSite], dtype_bytes: int = 2, batch: int = 1) -> int:
    """Bytes of all self/joint-attention matrices of one forward pass, had each been materialized."""
    return sum(s.blocks * s.heads * s.matrix_elements for s in sites) * dtype_bytes * batch


@dataclass(frozen=True)
class FamilyRow:
    """One row of `family_table`: a component's computed figures beside its published ones."""

    member: FamilyMember
    params: int
    fp16_bytes: int
    width: str          # what the text arrives as: cross-attention width, joint width, or hidden size
    attention: str      # where attention sits (denoisers), latent format (VAEs), tokens (text encoders)


def _describe(member: FamilyMember, model: nn.Module) -> tuple[str, str]:
    cfg = CONFIGS[member.name].config
    if member.kind == "denoiser":
        sites = attention_sites(model, member.image_size)
        if type(model).__name__ == "UNet2DConditionModel":
            latent = member.image_size // 8
            levels = [latent // 2 ** i for i in range(len(model.down_blocks))]
            have = {s.where: s for s in sites}
            where = ", ".join(f"{s}²:{have[f'{s}x{s}'].blocks}" if f"{s}x{s}" in have else f"{s}²:-"
                              for s in levels)
            mid = latent // 2 ** (len(levels) - 1)
            if f"{mid}x{mid}" not in have:
                where += f", {mid}²:-"
            return f"cross {model.config.cross_attention_dim}", where
        width = model.config.num_attention_heads * model.config.attention_head_dim
        where = "; ".join(f"{s.blocks} blocks x {s.tokens} tokens" for s in sites)
        return f"joint {cfg['joint_attention_dim']}->{width}", where
    if member.kind == "vae":
        c = model.config
        shift = c.shift_factor if c.shift_factor is not None else 0
        return "-", f"{c.latent_channels} ch, scale {c.scaling_factor}, shift {shift}"
    hidden = cfg.get("hidden_size", cfg.get("d_model"))
    tokens = cfg.get("max_position_embeddings", "relative positions")
    return f"hidden {hidden}", f"{tokens} tokens" if isinstance(tokens, int) else "no fixed length (relative)"


def family_table(models: dict[str, nn.Module] | None = None) -> list[FamilyRow]:
    """Parameters, fp16 weight bytes, text width and attention layout of the whole family (chapter 5).

    Args:
        models: already built modules by `CONFIGS` name (e.g. from `build_on_meta`), to reuse; the
            missing ones are built on the meta device.
    Returns:
        One `FamilyRow` per entry of `FAMILY`, in that order. Shared (tied) weights count once.
    """
    models = {} if models is None else models
    rows = []
    for member in FAMILY:
        model = models.get(member.name)
        if model is None:
            model = models[member.name] = build_on_meta(member.name)
        n = count_parameters(model)
        width, attention = _describe(member, model)
        rows.append(FamilyRow(member, n, 2 * n, width, attention))
    return rows


# --- A transparent joint-attention processor, and a recorder, for the attention-processor API. ---

class JointAttentionWrittenOut:
    """MM-DiT joint attention written out (chapter 5): what diffusers' `JointAttnProcessor2_0` does.

    Image tokens and text tokens get their own q/k/v projections, are concatenated into one
    sequence, attend with one softmax, and are split again. Install with
    `transformer.set_attn_processor(JointAttentionWrittenOut())`.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        b, n_img, _ = hidden_states.shape                                       # (B, image tokens, C)
        heads = attn.heads

        def split_heads(x):                                                      # (B, N, C) -> (B, heads, N, d)
            return x.view(b, x.shape[1], heads, -1).transpose(1, 2)

        q, k, v = (split_heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            cq, ck, cv = (split_heads(f(encoder_hidden_states))
                          for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = (torch.cat([x, c], dim=2) for x, c in ((q, cq), (k, ck), (v, cv)))  # (B, heads, N_img+N_txt, d)
        scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5                     # (B, heads, N, N)
        out = scores.softmax(dim=-1) @ v                                          # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1])            # (B, N, C)
        img, txt = out[:, :n_img], out[:, n_img:]
        img = attn.to_out[1](attn.to_out[0](img))
        if encoder_hidden_states is None:
            return img
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return img, txt


@dataclass
class AttentionCall:
    """One call of an attention layer: its name, query and key sequence lengths, and heads."""

    name: str
    query_tokens: int
    key_tokens: int
    heads: int


class _Recorder:
    def __init__(self, name: str, inner, log: list[AttentionCall]):
        self.name, self.inner, self.log = name, inner, log

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        n = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        joint = getattr(attn, "add_q_proj", None) is not None        # MM-DiT: text has its own projections
        if encoder_hidden_states is None:
            q, k = n, n                                              # self-attention
        elif joint:
            q = k = n + encoder_hidden_states.shape[1]               # one joint sequence
        else:
            q, k = n, encoder_hidden_states.shape[1]                 # cross-attention
        self.log.append(AttentionCall(self.name, q, k, attn.heads))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


class record_attention:
    """Context manager: record every attention call of `model` through the attention-processor API.

    Usage: `with ldm.record_attention(unet) as calls: unet(...)`; `calls` is a list of
    `AttentionCall`. The model's own processors are wrapped, not replaced, and restored on exit.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> list[AttentionCall]:
        self.original = dict(self.model.attn_processors)
        self.calls: list[AttentionCall] = []
        self.model.set_attn_processor({name: _Recorder(name.removesuffix(".processor"), proc, self.calls)
                                       for name, proc in self.original.items()})
        return self.calls

    def __exit__(self, *exc) -> None:
        self.model.set_attn_processor(self.original)


# --- Tiny random-weight SDXL and SD3 components (diffusers-test style), built in memory. ---

TINY_SDXL = dict(clip_l_width=16, clip_g_width=32, time_id_width=8)


def _tiny_clip(width: int, tokenizer, with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=width, intermediate_size=2 * width, num_attention_heads=4, num_hidden_layers=3,
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=width,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _tiny_sdxl_unet(cross_attention_dim: int, n_time_ids: int, pooled_width: int, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=cross_attention_dim, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=TINY_SDXL["time_id_width"],
        projection_class_embeddings_input_dim=pooled_width + n_time_ids * TINY_SDXL["time_id_width"],
    ).eval()


def tiny_sdxl_components(seed: int = 0) -> dict:
    """Random-weight components of a tiny SDXL base, for `diffusers.StableDiffusionXLPipeline` (chapter 5).

    Mirrors SDXL's structure at tiny widths: a CLIP-L-like encoder (width 16, the real one 768) and a
    bigG-like encoder with projection (width 32, the real one 1280) whose penultimate hidden states
    are concatenated (16 + 32 = 48 = the U-Net's `cross_attention_dim`; SDXL: 2048); a U-Net with
    `addition_embed_type="text_time"` fed the pooled projection (32) and six size/crop ids of 8
    sinusoidal features each (32 + 6*8 = 80; SDXL: 1280 + 6*256 = 2816); a 4-channel VAE with
    `vae_scale_factor` 8; the Euler scheduler SDXL ships with. Same seed, same weights; the global
    RNG state is left untouched.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler

    from .tinysd.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()                  # TinySD's CLIP tokenizer: each caption word is one token
    with torch.random.fork_rng(devices=[]):
        text_encoder = _tiny_clip(TINY_SDXL["clip_l_width"], tokenizer, False, seed)
        text_encoder_2 = _tiny_clip(TINY_SDXL["clip_g_width"], tokenizer, True, seed + 1)
        unet = _tiny_sdxl_unet(TINY_SDXL["clip_l_width"] + TINY_SDXL["clip_g_width"], 6,
                               TINY_SDXL["clip_g_width"], seed + 2)
        torch.manual_seed(seed + 3)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=128, norm_num_groups=8,
            block_out_channels=(8, 16, 16, 16), layers_per_block=1, scaling_factor=SDXL_VAE["scaling_factor"],
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    return dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)


def tiny_sdxl_refiner_components(base: dict, seed: int = 10) -> dict:
    """Components of a tiny SDXL refiner for `StableDiffusionXLImg2ImgPipeline` (chapter 5).

    Like the real refiner: no CLIP-L (`text_encoder=None`), only the bigG-like encoder, shared with
    `base` together with the VAE; the U-Net's cross-attention width is that encoder's (32; the real
    one 1280) and its five added ids are original size, crop corner and an aesthetic score
    (32 + 5*8 = 72; the real one 1280 + 5*256 = 2560). Build the pipeline with
    `requires_aesthetics_score=True`.
    """
    from diffusers import EulerDiscreteScheduler

    with torch.random.fork_rng(devices=[]):
        unet = _tiny_sdxl_unet(TINY_SDXL["clip_g_width"], 5, TINY_SDXL["clip_g_width"], seed)
    return dict(vae=base["vae"], text_encoder=None, text_encoder_2=base["text_encoder_2"], tokenizer=None,
                tokenizer_2=base["tokenizer_2"], unet=unet,
                scheduler=EulerDiscreteScheduler.from_config(base["scheduler"].config))


TINY_SD3 = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                pooled_projection_dim=24, pos_embed_max_size=32)


def tiny_sd3_transformer(seed: int = 0):
    """A random-weight `SD3Transformer2DModel` with SD3's structure at tiny widths (chapter 5).

    16 latent channels and 2x2 patches as in SD3-medium; 2 joint blocks of 2 heads x 8 dims
    (SD3-medium: 24 blocks of 24 x 64); text arrives 32 wide (T5-XXL: 4096) and is projected to 16.
    """
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SD3Transformer2DModel(**TINY_SD3).eval()


def tiny_sdxl_pipelines(seed: int = 0):
    """A tiny SDXL base pipeline and its refiner, sharing the bigG-like encoder and the VAE (chapter 5).

    Returns:
        (`StableDiffusionXLPipeline(**tiny_sdxl_components(seed))`,
         `StableDiffusionXLImg2ImgPipeline(**tiny_sdxl_refiner_components(...), requires_aesthetics_score=True)`),
        on the CPU in float32, progress bars off, no invisible watermark.
    """
    from .models import _quiet_torchvision_fallback

    _quiet_torchvision_fallback()
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base_components = tiny_sdxl_components(seed)
    base = StableDiffusionXLPipeline(**base_components, add_watermarker=False)
    refiner = StableDiffusionXLImg2ImgPipeline(**tiny_sdxl_refiner_components(base_components, seed + 10),
                                               requires_aesthetics_score=True, add_watermarker=False)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    return base, refiner


def sdxl_pipelines(source: str = "auto", device: torch.device | str | None = None, seed: int = 0,
                   verbose: bool = True):
    """SDXL base + refiner pipelines: the real ones from the Hub, or the tiny random-weight ones (chapter 5).

    Args:
        source: "auto" (real when CUDA and the Hub are available, else tiny), "real" or "tiny".
        device: None picks CUDA when available, else CPU.
        seed: seed of the tiny weights (ignored for the real ones).
        verbose: print one line saying what was loaded and why.
    Returns:
        (base `StableDiffusionXLPipeline`, refiner `StableDiffusionXLImg2ImgPipeline`, "real" or "tiny").
        The refiner shares the base's `text_encoder_2` and `vae`; progress bars are off. Real: float16 on
        CUDA ("fp16" weight files) with the fp16-safe SDXL VAE, float32 on CPU.
    Raises:
        ValueError: unknown `source`.
        RuntimeError: source="real" but the Hub cannot be reached.
    """
    from .models import REGISTRY

    if source not in ("auto", "real", "tiny"):
        raise ValueError(f"source must be 'auto', 'real' or 'tiny', got {source!r}")
    device = pick_device(device)
    base_spec, refiner_spec = REGISTRY["sdxl-base"], REGISTRY["sdxl-refiner"]
    if source == "auto":
        cuda, hub = device.type == "cuda", hub_available()   # fast when HF_HUB_OFFLINE=1; probe cached
        source = "real" if cuda and hub else "tiny"
        why = ([] if hub else [hub_reason()]) + ([] if cuda else ["no CUDA"])
        reason = "CUDA and the Hub are available" if source == "real" else "; ".join(why)
    else:
        reason = "asked for by name"

    if source == "tiny":
        base, refiner = tiny_sdxl_pipelines(seed)            # built on the CPU in float32
        label = "tiny random-weight SDXL base + refiner"
    else:
        if not hub_available():
            raise RuntimeError(f"cannot load SDXL ({base_spec.repo_id}): the Hub is {hub_reason()}. "
                               f"Use sdxl_pipelines('tiny') to run offline.")
        from .models import _quiet_torchvision_fallback

        _quiet_torchvision_fallback()
        from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        dtype = pick_dtype(device)
        kwargs = dtype_kwargs(dtype)
        with quiet_loading():
            if dtype == torch.float16:
                # SDXL's own VAE overflows in float16 (the pipeline would upcast it, with a deprecation
                # warning); the fp16-fix VAE is the same architecture fine-tuned to stay in range.
                kwargs["variant"] = base_spec.variant
                kwargs["vae"] = AutoencoderKL.from_pretrained(REGISTRY["sdxl-vae-fp16-fix"].repo_id,
                                                              force_upcast=False, **dtype_kwargs(dtype))
            base = StableDiffusionXLPipeline.from_pretrained(base_spec.repo_id, **kwargs)
            kwargs["vae"] = base.vae                          # shared with the refiner, as is text_encoder_2
            refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                refiner_spec.repo_id, text_encoder_2=base.text_encoder_2, **kwargs)
        dtype_name = str(dtype).removeprefix("torch.")
        label = f"SDXL base + refiner ({base_spec.repo_id}, {refiner_spec.repo_id}, {dtype_name})"
    for pipe in (base, refiner):
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
    if verbose:
        print(f"sdxl_pipelines: {label} on {device.type} ({reason})")
    return base, refiner, source
