"""TinySD's architectures: Stable Diffusion's component classes at a small size.

| component      | class                              | TinySD                                   | SD 1.5                     |
|----------------|------------------------------------|------------------------------------------|----------------------------|
| text encoder   | transformers CLIPTextModel         | 4 layers, width 128, 77 tokens            | 12 layers, width 768       |
| autoencoder    | diffusers AutoencoderKL            | f=8, 4 latent channels, 128->16x16x4      | f=8, 4 channels, 512->64x64x4 |
| denoiser       | diffusers UNet2DConditionModel     | 3 levels (64,128,192), attention at 16, 8 | 4 levels (320..1280)       |
| preview decoder| diffusers AutoencoderTiny          | TAESD layout, width 32                    | TAESD width 64             |
| scheduler      | DDIM, scaled-linear betas 0.00085..0.012, 1000 steps, epsilon prediction (SD's)  |
"""

from __future__ import annotations

from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from .shapes import IMAGE_SIZE
from .tokenizer import MAX_LENGTH

TEXT_WIDTH = 128
LATENT_CHANNELS = 4
VAE_FACTOR = 8
LATENT_SIZE = IMAGE_SIZE // VAE_FACTOR

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")

VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 128, 128), layers_per_block=1,
           latent_channels=LATENT_CHANNELS, norm_num_groups=32, sample_size=IMAGE_SIZE)

UNET = dict(sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
            block_out_channels=(64, 128, 192), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_WIDTH, attention_head_dim=4)  # diffusers' legacy name: 4 *heads*

TAESD = dict(in_channels=3, out_channels=3, encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4,
             num_encoder_blocks=(1, 2, 2, 2), num_decoder_blocks=(2, 2, 2, 1), latent_channels=LATENT_CHANNELS,
             scaling_factor=1.0)


def clip_config(vocab_size: int, bos_token_id: int, eos_token_id: int) -> CLIPConfig:
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                          num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
                          bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
                          projection_dim=TEXT_WIDTH)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=16, hidden_size=TEXT_WIDTH,
                              intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=4, num_attention_heads=4,
                              projection_dim=TEXT_WIDTH)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=TEXT_WIDTH)


def new_clip(tokenizer) -> CLIPModel:
    return CLIPModel(clip_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id))


def new_vae(**overrides) -> AutoencoderKL:
    return AutoencoderKL(**{**VAE, **overrides})


def new_unet(**overrides) -> UNet2DConditionModel:
    return UNet2DConditionModel(**{**UNET, **overrides})


def new_taesd(**overrides) -> AutoencoderTiny:
    return AutoencoderTiny(**{**TAESD, **overrides})


def new_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER)


# A small U-Net for the scaling-factor chapter's comparison (scaled against unscaled latents):
# the same block types and attention levels as UNET at a third to a half of its width (1.0M
# parameters against 8.8M), so two of them train on the CPU in minutes and ship in 4 MB (float16).
UNET_PRESETS = {"default": {}, "small": dict(block_out_channels=(32, 32, 64), attention_head_dim=2)}


def unet_preset(name: str) -> dict:
    """The overrides of UNET that a named preset applies ("default": none)."""
    if name not in UNET_PRESETS:
        raise ValueError(f"unet_preset must be one of {sorted(UNET_PRESETS)}, got {name!r}")
    return dict(UNET_PRESETS[name])
