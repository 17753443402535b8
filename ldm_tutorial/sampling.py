"""A transparent text-to-image sampling loop: what `StableDiffusionPipeline.__call__` does, step by step.

The pipeline call is the right tool in practice; this loop is the one the chapters walk through,
with every tensor named as diffusers names it. `tests/test_sampling.py` checks that both give the
same latents (max abs difference <= 1e-4 in float32) for the same seed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from . import checks


@dataclass
class SampleOutput:
    images: torch.Tensor                 # (B, 3, H, W) in [-1, 1]
    latents: torch.Tensor                # (B, C, h, w) final, *scaled* latents
    timesteps: list[int] | list[float]     # flow-matching schedulers use sigma * 1000, not integers
    trajectory: list[torch.Tensor] = field(default_factory=list)   # latents after each step, if kept

    def to_pil(self):
        from PIL import Image  # noqa: PLC0415

        arr = ((self.images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]


def encode_prompt(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    """(B, 77, hidden) last hidden states, padded to the tokenizer's full length as SD does."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]


def flux_sigmas(num_inference_steps: int) -> list[float]:
    """FLUX's pipeline default for a flow-matching scheduler: n equal steps from sigma 1 down to 1/n, then 0.

    diffusers' FlowMatchEulerDiscreteScheduler on its own spaces n steps from 1 down to 0.001, so its
    last step moves from 0.001 to 0 and does almost nothing: n calls of the model, n - 1 real steps.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    return torch.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps).tolist()


def sigmas_for(scheduler, num_inference_steps: int) -> list[float] | None:
    """The noise levels the book samples a scheduler at: `flux_sigmas(n)` for a flow-matching scheduler,
    None (the scheduler's own spacing) for the DDPM family."""
    from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: PLC0415

    return flux_sigmas(num_inference_steps) if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) else None


def set_timesteps(scheduler, num_inference_steps: int, device=None, sigmas: list[float] | None = None) -> torch.Tensor:
    """scheduler.set_timesteps, with `sigmas` (flow-matching schedulers only) checked; returns the timesteps."""
    if sigmas is None:
        scheduler.set_timesteps(num_inference_steps, device=device)
    elif "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise ValueError(f"sigmas is for flow-matching schedulers; {type(scheduler).__name__} takes none (pass None)")
    elif len(sigmas) != num_inference_steps or not all(0 < s <= 1 for s in sigmas):
        raise ValueError(f"sigmas must hold num_inference_steps={num_inference_steps} values in (0, 1], got {list(sigmas)}")
    else:
        scheduler.set_timesteps(num_inference_steps, device=device, sigmas=list(sigmas))
    return scheduler.timesteps


def sample(pipe, prompt: str | list[str], negative_prompt: str | list[str] | None = "", num_inference_steps: int = 25,
           guidance_scale: float = 5.0, generator: torch.Generator | list[torch.Generator] | None = None,
           latents: torch.Tensor | None = None, height: int | None = None, width: int | None = None,
           keep_trajectory: bool = False, eta: float = 0.0, sigmas: list[float] | None = None,
           guidance_rescale: float = 0.0, guidance_interval: tuple[float, float] | None = None,
           autoguidance_unet=None, autoguidance_scale: float = 2.0) -> SampleOutput:
    """Text to image with classifier-free guidance, written out. Introduced in chapter 0.

    Args:
        pipe: a StableDiffusionPipeline (its tokenizer, text_encoder, unet, scheduler, vae are used).
        prompt / negative_prompt: a string or a list (one per image).
        guidance_scale: w in eps_uncond + w * (eps_text - eps_uncond); <= 1 switches guidance off.
        generator: seeds the initial noise (CPU generator: identical on every device); a list of one
            generator per image seeds each image on its own, as diffusers' pipelines accept.
        latents: optional initial noise (B, C, h, w); overrides `generator` for the start.
        sigmas: flow-matching schedulers only: the `num_inference_steps` noise levels to visit, e.g.
            `flux_sigmas(n)` (FLUX's pipeline default; `sigmas_for` picks it for flow schedulers);
            None keeps the scheduler's own spacing.
        guidance_rescale: phi of Lin et al. (arXiv:2305.08891, sec. 3.4), as diffusers' `rescale_noise_cfg`:
            the guided prediction is rescaled to the text prediction's std, mixed in with weight phi.
        guidance_interval: (low, high): guide only the steps whose timestep t has low <= t <= high
            (Kynkaanniemi et al., arXiv:2404.07724); the other steps run the U-Net once, on the prompt
            alone (w = 1). None guides every step.
        autoguidance_unet: a weaker U-Net trained for the same task (same latents, same text encoder),
            e.g. `ldm.tinysd.load_autoguidance_unet()`. Autoguidance (Karras et al., arXiv:2406.02507)
            adds (autoguidance_scale - 1) * (eps_text - eps_weak) at every step, eps_weak being the
            weak model's prediction for the prompt: it pushes away from the weak model's errors
            rather than from the unconditional prediction. Stacks on CFG (guidance_scale); with
            guidance_scale <= 1 it is autoguidance alone. None (the default): plain CFG.
        autoguidance_scale: w_ag >= 1 in that formula (1 switches it off); used only with
            autoguidance_unet.
    Raises:
        ValueError: a bad argument, named, with what was expected (the checks live in `checks.py`).
    Warns:
        UserWarning: a prompt longer than the tokenizer's window, with the number of tokens dropped.
        ldm.tinysd.CaptionWarning: (TinySD only, once per prompt) a prompt or negative prompt that
            TinySD's caption grammar cannot read, naming the words; its tokenizer checks as it encodes.
    Returns:
        SampleOutput with images in [-1, 1], final latents, timesteps and (optionally) the trajectory.
    """
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg  # noqa: PLC0415
    from diffusers.utils.torch_utils import randn_tensor  # noqa: PLC0415

    # no_grad as a context, not a decorator: mutmut 3 skips decorated functions (benchmarks/mutation.md)
    with torch.no_grad():
        # 1. Check inputs (shared with the editing helpers: ldm_tutorial/checks.py)
        prompts = checks.prompts(prompt)
        negatives = checks.negative_prompts(negative_prompt, len(prompts))
        num_inference_steps = checks.positive_int(num_inference_steps, "num_inference_steps")
        guidance_scale = checks.finite_number(guidance_scale, "guidance_scale")
        guidance_rescale = checks.finite_number(guidance_rescale, "guidance_rescale", 0.0, 1.0)
        guidance_interval = checks.interval(guidance_interval)
        eta = checks.finite_number(eta, "eta", 0.0, 1.0)
        autoguidance_scale = checks.finite_number(autoguidance_scale, "autoguidance_scale", 1.0, None)
        weak = checks.autoguidance_unet(autoguidance_unet, pipe.unet)
        generator = checks.generators(generator, len(prompts))
        vsf = pipe.vae_scale_factor
        height, width = checks.image_size(height, width, vsf, pipe.unet.config.sample_size * vsf)
        checks.warn_truncation(pipe.tokenizer, prompts)
        if do_cfg := guidance_scale > 1.0:
            checks.warn_truncation(pipe.tokenizer, negatives, "negative_prompt")
        device, dtype = pipe.unet.device, pipe.unet.dtype

        # 2. Encode the prompt (and the negative prompt for guidance)
        prompt_embeds = encode_prompt(pipe.tokenizer, pipe.text_encoder, prompts, device)       # (B, 77, D)
        if do_cfg:
            negative_prompt_embeds = encode_prompt(pipe.tokenizer, pipe.text_encoder, negatives, device)
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])                  # (2B, 77, D)

        # 3. Timesteps
        scheduler = pipe.scheduler
        set_timesteps(scheduler, num_inference_steps, device=device, sigmas=sigmas)

        # 4. Initial latents: Gaussian noise scaled by the scheduler's initial sigma
        shape = (len(prompts), pipe.unet.config.in_channels, height // vsf, width // vsf)     # (B, C, h, w)
        if latents is None:            # randn_tensor: what the pipelines call; a list seeds image by image
            first = generator[0] if isinstance(generator, list) else generator
            latents = randn_tensor(shape, generator=generator, dtype=dtype,
                                   device=torch.device("cpu") if first is None else first.device).to(device)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        # (flow-matching schedulers start from unit noise and have no init_noise_sigma / scale_model_input)
        latents = latents.to(device, dtype) * getattr(scheduler, "init_noise_sigma", 1.0)

        step_kwargs = {}
        step_params = inspect.signature(scheduler.step).parameters
        if "eta" in step_params:
            step_kwargs["eta"] = eta
        if "generator" in step_params:
            step_kwargs["generator"] = generator

        # 5. Denoising loop
        trajectory = []
        text_embeds = prompt_embeds.chunk(2)[1] if do_cfg else prompt_embeds                  # (B, 77, D)
        for t in scheduler.timesteps:
            guide = do_cfg and (guidance_interval is None
                                or guidance_interval[0] <= float(t) <= guidance_interval[1])
            latent_model_input = torch.cat([latents] * 2) if guide else latents               # (2B, C, h, w)
            if hasattr(scheduler, "scale_model_input"):
                latent_model_input = scheduler.scale_model_input(latent_model_input, t)
            embeds = prompt_embeds if guide or not do_cfg else prompt_embeds.chunk(2)[1]      # the prompt half
            noise_pred = pipe.unet(latent_model_input, t, encoder_hidden_states=embeds).sample
            noise_pred_text = noise_pred.chunk(2)[1] if guide else noise_pred
            if guide:
                noise_pred_uncond = noise_pred.chunk(2)[0]
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                if guidance_rescale > 0.0:
                    noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale)
            if weak is not None and autoguidance_scale != 1.0:    # the weak model, on the prompt
                weak_input = latent_model_input.chunk(2)[1] if guide else latent_model_input
                noise_pred_weak = weak(weak_input.to(weak.dtype), t,
                                       encoder_hidden_states=text_embeds.to(weak.dtype)).sample
                noise_pred = noise_pred + (autoguidance_scale - 1) * (noise_pred_text
                                                                      - noise_pred_weak.to(noise_pred))
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
            if keep_trajectory:
                trajectory.append(latents.detach().cpu())

        # 6. Decode: undo the scaling factor, then the VAE decoder
        images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample                # (B, 3, H, W)
        return SampleOutput(images=images.clamp(-1, 1), latents=latents,
                            timesteps=[t.item() for t in scheduler.timesteps], trajectory=trajectory)
