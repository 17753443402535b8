"""TinySD: a miniature Stable Diffusion this project trains itself and ships inside the package.

Same component classes as SD (CLIPTextModel + CLIPTokenizer, AutoencoderKL, UNet2DConditionModel,
DDIMScheduler, AutoencoderTiny; the VAE is `fixed_norm.FixedNormAutoencoderKL`, an AutoencoderKL
whose last decoder stages use frozen norm statistics), saved in diffusers/transformers folder
layout and loaded with `from_pretrained`, the code path that loads the real SD on a GPU.

    weights/tinysd/           StableDiffusionPipeline folder (model_index.json, text_encoder,
                              tokenizer, unet, vae, scheduler)
    weights/tinysd-vae-groupnorm/  the VAE's GroupNorm decoder tail (`load_vae(groupnorm=True)`)
    weights/tinysd-inpaint/   the 9-channel inpainting U-Net (the rest is shared with tinysd/)
    weights/tinysd-taesd/     AutoencoderTiny preview decoder distilled from the VAE
    weights/tinyclip/         the whole tiny CLIPModel (text + vision towers; image side in
                              float16) and tokenizer
    weights/tinysd-scaling/   two small U-Nets trained on scaled and on raw latents (scaling-factor
                              chapter), each with a log.json
    weights/tinysd-conditioning/  small U-Nets conditioned on the pooled text vector only
                              (cross-attention chapter's control), each with a log.json
    weights/tinysd-signal-leak/  a Gaussian model of the training latents (`load_signal_leak`):
                              the initial-latent leak of `ldm.signal_leak_latents`
    weights/training_log.json how each was trained (steps, seconds, device)
"""

from __future__ import annotations

from pathlib import Path

from .grammar import CaptionScene, CaptionWarning, parse_caption

WEIGHTS_DIR = Path(__file__).parent / "weights"
TASKS = ("text2img", "img2img", "inpaint")


def pipeline_dir(task: str = "text2img") -> Path | None:
    """The diffusers folder that `from_pretrained` loads for `task`, or None if not shipped.

    text2img and img2img share `weights/tinysd`; inpaint needs the inpainting U-Net as well
    (load it from `inpaint_unet_dir()` and pass it as `unet=`), so it returns `weights/tinysd`
    only when that U-Net is present too.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    base = WEIGHTS_DIR / "tinysd"
    if not (base / "model_index.json").exists() or not (base / "unet" / "config.json").exists():
        return None
    if task == "inpaint" and inpaint_unet_dir() is None:
        return None
    return base


def inpaint_unet_dir() -> Path | None:
    d = WEIGHTS_DIR / "tinysd-inpaint" / "unet"
    return d if (d / "config.json").exists() else None


def component_dir(name: str, weights_dir: Path | None = None) -> Path:
    """Folder of one component: text_encoder, tokenizer, unet, vae, scheduler, taesd, clip, inpaint_unet,
    vae_groupnorm (the GroupNorm decoder tail `load_vae(groupnorm=True)` puts back), signal_leak
    (`load_signal_leak`'s model of the training latents).

    weights_dir: the zoo's root (default: the shipped `weights/`; training passes its `--out`).
    """
    root = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    dirs = {"taesd": root / "tinysd-taesd", "clip": root / "tinyclip",
            "vae_groupnorm": root / "tinysd-vae-groupnorm", "signal_leak": root / "tinysd-signal-leak",
            "inpaint_unet": root / "tinysd-inpaint" / "unet"}
    for sub in ("text_encoder", "tokenizer", "unet", "vae", "scheduler"):
        dirs[sub] = root / "tinysd" / sub
    if name not in dirs:
        raise ValueError(f"name must be one of {sorted(dirs)}, got {name!r}")
    if not dirs[name].exists():
        how = {"vae_groupnorm": "write it with `python scripts/fixed_norm_tail.py --eval-only --tail FILE "
                                "--export ROOT`",
               "signal_leak": "fit it with `python -m ldm_tutorial.tinysd.leak --out ROOT`"}.get(
                   name, "train it with `python -m ldm_tutorial.tinysd.train`")
        raise FileNotFoundError(f"TinySD component {name!r} is not shipped at {dirs[name]}; {how}")
    return dirs[name]


def load_flow_unet(device="cpu", weights_dir: Path | None = None, dtype=None, control: bool = False):
    """(UNet2DConditionModel, scheduler) of the DDPM-vs-flow comparison (chapter 5).

    control=False: TinySD trained as a rectified flow (SD3's velocity objective) with its
    FlowMatchEulerDiscreteScheduler. control=True: its control, the same starting weights trained
    for the same time on the same data with the epsilon objective, with TinySD's DDIM scheduler.
    Both started from the shipped epsilon U-Net. Swap them into the text-to-image pipeline's
    components and sample with `ldm.sample` (StableDiffusionPipeline expects a DDPM-family scheduler).
    """
    import torch  # noqa: PLC0415
    from ldm_tutorial.runtime import dtype_kwargs, quiet_loading  # noqa: PLC0415
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel  # noqa: PLC0415

    root = (Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR) / "tinysd-flow"
    folder = root / "epsilon-control" / "unet" if control else root / "unet"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"TinySD's {'epsilon control' if control else 'flow'} U-Net is not shipped at {folder}; "
                                f"train it with `python -m ldm_tutorial.tinysd.train "
                                f"{'unet --continue-shipped' if control else 'flow --continue-shipped'}`")
    with quiet_loading():
        unet = UNet2DConditionModel.from_pretrained(folder, **dtype_kwargs(dtype or torch.float32))
    sched = (DDIMScheduler.from_pretrained(component_dir("scheduler", weights_dir)) if control
             else FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"))
    return unet.to(device).eval(), sched


def objective_comparison(pipe=None, weights_dir: Path | None = None) -> dict:
    """The DDPM-vs-flow comparison's three samplers over one TinySD text-to-image pipeline.

    Returns name -> pipeline, sharing `pipe`'s text encoder, tokenizer and VAE:
    * "epsilon, DDIM leading": the epsilon control U-Net (`load_flow_unet(control=True)`) with DDIM as
      SD 1.5 configures it (timestep_spacing "leading", which starts below t = 999 with few steps);
    * "epsilon, DDIM trailing": the same U-Net, DDIM starting at t = 999 (Lin et al., arXiv:2305.08891);
    * "flow, Euler": the rectified-flow U-Net with FlowMatchEulerDiscreteScheduler (sample it with
      `sigmas=ldm.flux_sigmas(n)` for n equal steps).
    Sample them with `ldm.sample` (diffusers' StableDiffusionPipeline expects a DDPM-family scheduler).
    """
    from ldm_tutorial.models import _quiet_torchvision_fallback  # noqa: PLC0415

    _quiet_torchvision_fallback()          # transformers' notice that the PIL image processor is used
    from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: PLC0415

    if pipe is None:
        from ldm_tutorial.models import load_pipeline  # noqa: PLC0415

        pipe = load_pipeline("tiny", verbose=False)
    if pipe.unet.config.in_channels != 4 or not isinstance(pipe.scheduler, DDIMScheduler):
        raise ValueError("pipe must be TinySD's text-to-image pipeline (4-channel U-Net, DDIM scheduler), "
                         f"got a {pipe.unet.config.in_channels}-channel U-Net with {type(pipe.scheduler).__name__}")
    flow_unet, flow_sched = load_flow_unet(pipe.device, weights_dir, dtype=pipe.unet.dtype)
    eps_unet, ddim = load_flow_unet(pipe.device, weights_dir, dtype=pipe.unet.dtype, control=True)

    def build(unet, scheduler):
        return StableDiffusionPipeline(**{**pipe.components, "unet": unet, "scheduler": scheduler},
                                       requires_safety_checker=False)

    return {"epsilon, DDIM leading": build(eps_unet, DDIMScheduler.from_config(ddim.config, timestep_spacing="leading")),
            "epsilon, DDIM trailing": build(eps_unet, DDIMScheduler.from_config(ddim.config, timestep_spacing="trailing")),
            "flow, Euler": build(flow_unet, flow_sched)}


SCALING_VARIANTS = ("scaled", "unscaled")


def load_scaling_unet(variant: str, device="cpu", weights_dir: Path | None = None, dtype=None):
    """(UNet2DConditionModel, decode scaling factor) of the scaling-factor chapter's comparison.

    Two small U-Nets (`configs.UNET_PRESETS["small"]`) trained for the same number of steps on
    the same latents: "scaled" on latents times the VAE's scaling_factor (SD's recipe), "unscaled" on the raw
    latents. The second number is the factor its samples must be decoded with: the VAE's own for
    "scaled", 1.0 for "unscaled" (its U-Net produces raw latents; dividing them by 0.3788 would
    blow them up by 2.6x). `scaling_comparison` builds both pipelines that way.
    """
    import json  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from ldm_tutorial.runtime import dtype_kwargs, quiet_loading  # noqa: PLC0415
    from diffusers import UNet2DConditionModel  # noqa: PLC0415

    if variant not in SCALING_VARIANTS:
        raise ValueError(f"variant must be one of {list(SCALING_VARIANTS)}, got {variant!r}")
    root = (Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR) / "tinysd-scaling" / variant
    if not (root / "unet" / "config.json").exists():
        flag = "config" if variant == "scaled" else "none"
        raise FileNotFoundError(f"the {variant} comparison U-Net is not shipped at {root}; train it with "
                                f"`python -m ldm_tutorial.tinysd.train unet --unet-preset small "
                                f"--latent-scale {flag} --out <a copy of weights/>`")
    log = json.loads((root / "log.json").read_text())
    with quiet_loading():
        unet = UNet2DConditionModel.from_pretrained(root / "unet", **dtype_kwargs(dtype or torch.float32))
    return unet.to(device).eval(), float(log["decode_scaling_factor"])


def load_autoguidance_unet(pipe=None, device=None, weights_dir: Path | None = None, dtype=None):
    """The weak U-Net that autoguides TinySD: `ldm.sample(pipe, ..., autoguidance_unet=this)`.

    Autoguidance (Karras et al., arXiv:2406.02507) needs a weaker model of the same task: same
    latents, same text encoder, same objective. The scaling comparison's "scaled" U-Net is one:
    `configs.UNET_PRESETS["small"]` (1.0M parameters, 800 steps on 4,000 scenes) against the
    shipped U-Net's 8.8M, trained on the same scaled latents with the same text encoder. So it
    costs no extra weights. pipe: put it on that pipeline's U-Net's device and dtype (device and
    dtype override them; the CPU and float32 without either).
    """
    if pipe is not None:
        device = device or pipe.unet.device
        dtype = dtype or pipe.unet.dtype
    return load_scaling_unet("scaled", device or "cpu", weights_dir, dtype=dtype)[0]


CONDITIONING_ARMS = ("cross", "pooled", "pooled-token")


def load_conditioning_unet(arm: str, device="cpu", weights_dir: Path | None = None, dtype=None):
    """(UNet2DConditionModel, log dict) of the cross-attention chapter's controlled comparison.

    Three small U-Nets (`configs.UNET_PRESETS["small"]`) trained with one command, data, seeds and
    step count, differing only in how the text enters: "cross" (all 77 token states through
    cross-attention; the scaling comparison's "scaled" U-Net), "pooled" (no attention blocks; the
    text encoder's pooled output added to the time embedding through class_embed_type="projection":
    pass it as `class_labels=`), "pooled-token" (the cross arm's blocks, fed the pooled vector as
    the only key: `encoder_hidden_states` of shape (B, 1, 128)).
    """
    import json  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from ldm_tutorial.runtime import dtype_kwargs, quiet_loading  # noqa: PLC0415
    from diffusers import UNet2DConditionModel  # noqa: PLC0415

    if arm not in CONDITIONING_ARMS:
        raise ValueError(f"arm must be one of {list(CONDITIONING_ARMS)}, got {arm!r}")
    base = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    root = base / "tinysd-scaling" / "scaled" if arm == "cross" else base / "tinysd-conditioning" / arm
    if not (root / "unet" / "config.json").exists():
        raise FileNotFoundError(f"the {arm!r} conditioning U-Net is not shipped at {root}; train it with "
                                f"`python -m ldm_tutorial.tinysd.train unet --unet-preset small "
                                f"--conditioning {arm} --out <a copy of weights/>`")
    log = json.loads((root / "log.json").read_text())
    with quiet_loading():
        unet = UNet2DConditionModel.from_pretrained(root / "unet", **dtype_kwargs(dtype or torch.float32))
    return unet.to(device).eval(), log


def scaling_comparison(pipe=None, weights_dir: Path | None = None) -> dict:
    """{"scaled": pipeline, "unscaled": pipeline}: the two comparison U-Nets in TinySD's pipeline.

    Both share `pipe`'s text encoder, tokenizer and scheduler. "scaled" uses `pipe`'s VAE as it is;
    "unscaled" gets a copy of it whose config says scaling_factor 1.0, because its U-Net was trained
    on raw latents (the pipeline divides by vae.config.scaling_factor before decoding).
    """
    import copy  # noqa: PLC0415

    from diffusers import StableDiffusionPipeline  # noqa: PLC0415

    if pipe is None:
        from ldm_tutorial.models import load_pipeline  # noqa: PLC0415

        pipe = load_pipeline("tiny", verbose=False)
    out = {}
    for variant in SCALING_VARIANTS:
        unet, sf = load_scaling_unet(variant, pipe.device, weights_dir, dtype=pipe.unet.dtype)
        vae = pipe.vae
        if sf != vae.config.scaling_factor:
            vae = copy.deepcopy(vae)
            vae.register_to_config(scaling_factor=sf)
        out[variant] = StableDiffusionPipeline(**{**pipe.components, "unet": unet, "vae": vae},
                                               requires_safety_checker=False)
    return out


GROUPNORM_TAIL_FILE = "decoder_tail.safetensors"     # in component_dir("vae_groupnorm")


def load_vae(device="cpu", weights_dir: Path | None = None, groupnorm: bool = False):
    """TinySD's AutoencoderKL in float32 (weights ship in float16 to halve the bytes).

    The class is the one the folder's config.json names: diffusers' AutoencoderKL, or
    `fixed_norm.FixedNormAutoencoderKL` (its subclass with frozen-statistics norms; TinySD ships
    this one). groupnorm=True gives the same VAE with a GroupNorm decoder tail instead: a plain
    AutoencoderKL whose last decoder stages normalise each image by its own statistics, and
    so paint the corner smudge chapter 9 studies. Encoder and latents are the same in both.
    """
    import torch  # noqa: PLC0415
    from ldm_tutorial.runtime import dtype_kwargs, quiet_loading  # noqa: PLC0415
    from .fixed_norm import FixedNormAutoencoderKL, vae_class, with_group_norm_tail  # noqa: PLC0415

    if not isinstance(groupnorm, bool):
        raise TypeError(f"groupnorm must be True or False, got {groupnorm!r}")
    path = component_dir("vae", weights_dir)
    with quiet_loading():
        vae = vae_class(path).from_pretrained(path, **dtype_kwargs(torch.float32)).to(device).eval()
    if not groupnorm or type(vae) is not FixedNormAutoencoderKL:
        return vae                       # a GroupNorm folder (train.py writes one) is itself
    from safetensors.torch import load_file  # noqa: PLC0415

    tail = load_file(str(component_dir("vae_groupnorm", weights_dir) / GROUPNORM_TAIL_FILE))
    return with_group_norm_tail(vae, tail)


SIGNAL_LEAK_FILE = "leak.safetensors"     # in component_dir("signal_leak")


def load_signal_leak(weights_dir: Path | None = None):
    """TinySD's `ldm.signal_leak.SignalLeak`: a Gaussian model (mean + 64 principal components +
    isotropic rest) of the shipped VAE's scaled latents of rendered training scenes. It is what
    `ldm.signal_leak_latents(pipe, ...)` puts back into the initial noise (fitted by
    `python -m ldm_tutorial.tinysd.leak`)."""
    from ldm_tutorial.signal_leak import SignalLeak  # noqa: PLC0415

    return SignalLeak.load(component_dir("signal_leak", weights_dir) / SIGNAL_LEAK_FILE)


def load_taesd(device="cpu", weights_dir: Path | None = None):
    """TinySD's AutoencoderTiny preview decoder (works on *scaled* latents, scaling_factor 1.0)."""
    import torch  # noqa: PLC0415
    from ldm_tutorial.runtime import dtype_kwargs, quiet_loading  # noqa: PLC0415
    from diffusers import AutoencoderTiny  # noqa: PLC0415

    with quiet_loading():
        return AutoencoderTiny.from_pretrained(component_dir("taesd", weights_dir), **dtype_kwargs(torch.float32)).to(device).eval()


def load_clip(device="cpu", weights_dir: Path | None = None):
    """(CLIPModel, CLIPTokenizer) of the tiny CLIP trained on the shapes world."""
    import torch  # noqa: PLC0415
    from ldm_tutorial.runtime import quiet_loading  # noqa: PLC0415
    from transformers import CLIPModel, CLIPTokenizer  # noqa: PLC0415

    path = component_dir("clip", weights_dir)
    with quiet_loading():
        return CLIPModel.from_pretrained(path, dtype=torch.float32).to(device).eval(), CLIPTokenizer.from_pretrained(path)


def load_text_encoder(device="cpu", weights_dir: Path | None = None):
    """(CLIPTextModel, CLIPTokenizer): TinySD's frozen text encoder, the tiny CLIP's text tower."""
    import torch  # noqa: PLC0415
    from ldm_tutorial.runtime import quiet_loading  # noqa: PLC0415
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: PLC0415

    with quiet_loading():
        te = CLIPTextModel.from_pretrained(component_dir("text_encoder", weights_dir), dtype=torch.float32).to(device).eval()
    return te, CLIPTokenizer.from_pretrained(component_dir("tokenizer", weights_dir))
