"""Train TinySD with Stable Diffusion's recipe, stage by stage.

    python -m ldm_tutorial.tinysd.train clip    [--seconds S | --steps N] [--device cuda|cpu]
    python -m ldm_tutorial.tinysd.train vae     ...
    python -m ldm_tutorial.tinysd.train unet    ...    (needs clip and vae)
    python -m ldm_tutorial.tinysd.train inpaint ...    (needs unet)
    python -m ldm_tutorial.tinysd.train taesd   ...    (needs vae)
    python -m ldm_tutorial.tinysd.train flow    ...    (needs vae; rectified flow, for the DDPM-vs-flow comparison)
    python -m ldm_tutorial.tinysd.train all --seconds-per-stage clip=60,vae=170,...

Every stage shows a progress bar, writes a resumable checkpoint (`--ckpt-dir`, default
`checkpoints/`) every `--ckpt-every` seconds and at the end, resumes from it when present, and
exports its model in diffusers/transformers format under `--out` (default: the package's
shipped weights folder). Seeds are fixed; CUDA is used when present (bf16 autocast), else CPU.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import configs, data, load_text_encoder, load_vae, shapes
from .tokenizer import build_tokenizer

STAGES = ("clip", "vae", "unet", "inpaint", "taesd", "flow")
DATA_PARALLEL_STAGES = ("unet", "inpaint", "flow")   # the stages that run under `accelerate launch` (train_unet)
COSINE_STAGES = ("unet", "inpaint", "flow")       # the stages whose learning rate can decay (--cosine)
LR_SCHEDULES = ("constant", "cosine")             # the U-Net stages' schedules after warm-up (learning_rate)
LATENT_SCALES = ("config", "none")                # unet: latents times the VAE's scaling_factor, or raw (times 1)
CONDITIONINGS = ("cross", "pooled", "pooled-token")  # unet comparison runs: how the text enters (train_unet)
DEFAULT_OUT = Path(__file__).parent / "weights"


# ----------------------------------------------------------------------------- plumbing
@dataclass
class Ctx:
    device: torch.device
    out: Path
    ckpt_dir: Path
    seed: int = 0
    n_scenes: int = 20_000
    ckpt_every: float = 60.0
    latents_cache: Path | None = None
    main_process: bool = True      # False in the other processes of `accelerate launch`: they neither save nor log
    log: dict = field(default_factory=dict)
    _images: torch.Tensor | None = None
    _scenes: list | None = None

    @property
    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def caption_bank(self, tokenizer, k: int = 8) -> torch.Tensor:
        """(N, k, 77) token ids of k paraphrases per training scene, on the training device."""
        if getattr(self, "_bank", None) is None:
            t = time.time()
            self._bank = data.caption_bank(self.dataset()[1], tokenizer, k=k, seed=self.seed + 31).to(self.device)
            print(f"caption bank: {k} paraphrases x {len(self._bank)} scenes in {time.time() - t:.1f}s", flush=True)
        return self._bank

    def dataset(self) -> tuple[torch.Tensor, list]:
        if self._images is None:
            t = time.time()
            self._images, self._scenes = data.render_dataset(self.n_scenes, seed=self.seed)
            if self.device.type == "cuda":
                self._images = self._images.to(self.device)
            print(f"rendered {self.n_scenes} scenes in {time.time() - t:.1f}s", flush=True)
        return self._images, self._scenes


class Budget:
    """Stop after `steps` steps or `seconds` seconds, whichever comes first."""

    def __init__(self, steps: int | None, seconds: float | None):
        if steps is None and seconds is None:
            raise ValueError("give steps or seconds")
        self.steps, self.seconds = steps, seconds
        self.start = time.time()

    def restart(self) -> None:
        """Start the clock now (after data and model setup)."""
        self.start = time.time()

    def frac(self, step: int) -> float:
        if self.steps == 0:
            return 1.0
        f = [step / self.steps] if self.steps else []
        if self.seconds:
            f.append((time.time() - self.start) / self.seconds)
        return max(f)

    def done(self, step: int) -> bool:
        return self.frac(step) >= 1.0


def save_ckpt(ctx: Ctx, stage: str, state: dict) -> None:
    """Write `state` (model, optimiser, step, numpy rng, ...) plus torch's global RNG state, atomically.

    The torch RNG draws each step's noise and timesteps; saving it makes a resumed run continue the
    very sequence of draws a straight run makes (N + M steps resumed == N + M steps in one go).
    Under `accelerate launch` only the main process writes (every process holds the same state)."""
    if not ctx.main_process:
        return
    ctx.ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ctx.ckpt_dir / f"{stage}.pt.tmp"
    rng = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save({**state, **rng}, tmp)
    os.replace(tmp, ctx.ckpt_dir / f"{stage}.pt")


def load_ckpt(ctx: Ctx, stage: str) -> dict | None:
    """The stage's checkpoint, or None; restores torch's global RNG to where the checkpoint left it."""
    p = ctx.ckpt_dir / f"{stage}.pt"
    if p.exists():
        print(f"[{stage}] resuming from {p}", flush=True)
        ck = torch.load(p, map_location="cpu", weights_only=False)
        if "torch_rng" in ck:
            torch.set_rng_state(ck["torch_rng"])
        if "cuda_rng" in ck and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["cuda_rng"])
        return ck
    return None


class Progress:
    """One stage's progress bar and its periodic, resumable checkpoints."""

    def __init__(self, ctx: Ctx, name: str, state_fn):
        self.ctx, self.name, self.state_fn = ctx, name, state_fn
        self.bar = tqdm(desc=name, unit="step", mininterval=5, disable=not ctx.main_process)
        self.last_ck = time.time()

    def tick(self, step: int, postfix_fn) -> None:
        self.bar.update(1)
        if step % 50 == 0:
            self.bar.set_postfix(postfix_fn())
        if time.time() - self.last_ck > self.ctx.ckpt_every:
            save_ckpt(self.ctx, self.name, self.state_fn())
            self.last_ck = time.time()

    def close(self) -> None:
        self.bar.close()
        save_ckpt(self.ctx, self.name, self.state_fn())


def optimiser_step(opt: torch.optim.Optimizer, loss: torch.Tensor, clip_params=None, backward=None) -> None:
    """Zero the gradients, backpropagate (`backward`: e.g. `accelerator.backward`, which all-reduces
    them across processes; default `loss.backward`), clip to norm 1, step."""
    opt.zero_grad(set_to_none=True)
    (backward or torch.Tensor.backward)(loss)
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        # one fused call over all tensors (a Python loop launches one kernel per parameter)
        torch._foreach_lerp_(list(self.shadow.parameters()), [p.detach() for p in model.parameters()], 1 - d)


def _save_fp16(model, path: Path, **kwargs) -> None:
    """Save a copy in float16 (half the bytes; loaders upcast with torch_dtype=float32), shards <= 15MB."""
    m = copy.deepcopy(model).to("cpu", torch.float16)
    m.save_pretrained(path, max_shard_size="15MB", **kwargs)
    cfg_path = Path(path) / "config.json"                 # no machine-specific paths in shipped configs
    cfg = json.loads(cfg_path.read_text())
    # keys its own __init__ does not take make diffusers' loader warn ("passed ... but are not expected"):
    # AutoencoderTiny registers `block_out_channels` for pipelines but does not accept it back
    accepted = inspect.signature(type(model).__init__).parameters
    takes_any = any(q.kind is inspect.Parameter.VAR_KEYWORD for q in accepted.values())
    drop = [k for k in cfg if k == "_name_or_path" or (not takes_any and not k.startswith("_") and k not in accepted)]
    if drop:
        cfg_path.write_text(json.dumps({k: v for k, v in cfg.items() if k not in drop}, indent=2) + "\n")


def tokenize(tokenizer, captions: list[str], device, padding: str = "max_length") -> torch.Tensor:
    """Token ids (B, 77). padding="longest" is exact for CLIP's pooled feature (causal attention,
    pooled at the end token) and about 3x cheaper; the U-Net needs all 77 hidden states."""
    return tokenizer(captions, padding=padding, max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def save_clip(model, folder: Path) -> None:
    """Save the tiny CLIPModel with its image side (vision tower, visual projection) in float16.

    The image side only scores pictures (retrieval, evaluate's CLIP checks), where float16 changes
    no ranking (benchmarks/tinysd.md); the text tower stays float32 because TinySD's U-Net reads
    its hidden states. Loaders pass dtype=torch.float32 and get float32 everywhere.
    """
    m = copy.deepcopy(model).to("cpu", torch.float32).eval()
    m.vision_model.to(torch.float16)
    m.visual_projection.to(torch.float16)
    m.save_pretrained(folder)


def export_text_encoder(ctx: Ctx) -> None:
    """Copy the tiny CLIP's text tower (and tokenizer) into the pipeline folder."""
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer  # noqa: PLC0415

    clip = CLIPModel.from_pretrained(ctx.out / "tinyclip", dtype=torch.float32)
    if isinstance(clip.text_model, CLIPTextModel):      # transformers 5: the text tower is a CLIPTextModel
        text = clip.text_model
    else:                                               # transformers 4: a bare CLIPTextTransformer
        text = CLIPTextModel(clip.config.text_config)
        text.text_model.load_state_dict(clip.text_model.state_dict())
    text.save_pretrained(ctx.out / "tinysd" / "text_encoder")
    CLIPTokenizer.from_pretrained(ctx.out / "tinyclip").save_pretrained(ctx.out / "tinysd" / "tokenizer")


# ----------------------------------------------------------------------------- CLIP
def hard_negative(scene: shapes.Scene, rng: np.random.Generator) -> str:
    k = int(rng.integers(len(scene.objects)))
    attr = rng.choice(["colour", "shape", "position", "size"], p=[0.1, 0.6, 0.2, 0.1])
    objs = list(scene.objects)
    rivals = [v for a, v in shapes.one_attribute_variants(objs[k]) if a == attr]
    objs[k] = rivals[int(rng.integers(len(rivals)))]
    return shapes.caption(shapes.Scene(objs), rng)


def _pooled(out) -> torch.Tensor:
    """Projected features: transformers 5 returns an output object, 4.x a tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


def train_clip(ctx: Ctx, budget: Budget, batch: int = 256, lr: float = 5e-4, init_from_shipped: bool = False) -> dict:
    """Contrastive training of a tiny CLIPModel, with one hard negative caption per image.

    Exports the whole model to `tinyclip/`; `train_unet` copies its text tower into `tinysd/`
    when it starts, so the U-Net and its text encoder always match.
    """
    from transformers import CLIPModel, CLIPTokenizer  # noqa: PLC0415

    torch.manual_seed(ctx.seed)
    images, scenes = ctx.dataset()     # render first: worker processes fork before CUDA starts
    if init_from_shipped:
        # continuing: the vocabulary must be the shipped one, on every resume too
        tok = CLIPTokenizer.from_pretrained(ctx.out / "tinyclip")
        model = CLIPModel.from_pretrained(ctx.out / "tinyclip", dtype=torch.float32).to(ctx.device).train()
        print("[clip] continuing from the shipped weights and tokenizer", flush=True)
    else:
        tok = build_tokenizer()            # deterministic: a resumed run gets the same vocabulary
        model = configs.new_clip(tok).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    step, rng = 0, np.random.default_rng(ctx.seed + 1)
    ck = load_ckpt(ctx, "clip")
    if ck:
        model.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"]); step = ck["step"]
        rng = ck["rng"]

    def state():
        return dict(model=model.state_dict(), opt=opt.state_dict(), step=step, rng=rng)

    budget.restart()
    loss = torch.tensor(float("nan"))
    progress = Progress(ctx, "clip", state)
    while not budget.done(step):
        idx = rng.integers(len(scenes), size=batch)
        x = data.to_float(images[torch.from_numpy(idx).to(images.device)]).to(ctx.device)
        caps = [shapes.caption(scenes[i], rng) for i in idx]
        negs = [hard_negative(scenes[i], rng) for i in idx]
        ids = tokenize(tok, caps + negs, ctx.device, padding="longest")
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 200)
        with ctx.autocast:
            img = F.normalize(_pooled(model.get_image_features(pixel_values=x)), dim=-1)
            txt = F.normalize(_pooled(model.get_text_features(input_ids=ids)), dim=-1)
            scale = model.logit_scale.exp().clamp(max=100)
            logits = scale * img.float() @ txt.float().T          # (B, 2B): own caption, others, hard negatives
            target = torch.arange(batch, device=ctx.device)
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :batch].T, target))
        optimiser_step(opt, loss)
        step += 1
        progress.tick(step, lambda: {"loss": f"{loss.item():.3f}"})
    elapsed = time.time() - budget.start          # training loop only, not setup or export
    progress.close()
    model = model.float().cpu().eval()
    save_clip(model, ctx.out / "tinyclip")
    tok.save_pretrained(ctx.out / "tinyclip")
    return {"steps": step, "final_loss": float(loss.item()), "seconds": elapsed}


# ----------------------------------------------------------------------------- VAE
def _vae_batch(ctx: Ctx, images, rng, photos, gen, batch: int, photo_frac: float) -> torch.Tensor:
    n_photo = int(round(batch * photo_frac))
    idx = rng.integers(len(images), size=batch - n_photo)
    x = data.to_float(images[torch.from_numpy(idx).to(images.device)]).to(ctx.device)
    if n_photo:
        x = torch.cat([x, data.random_photo_crops(photos, n_photo, gen).to(ctx.device)])
    return x


def train_vae(ctx: Ctx, budget: Budget, batch: int = 48, lr: float = 2e-4, photo_frac: float = 0.25,
              disc_start_frac: float = 0.45, loss_cfg=None, name: str = "vae", vae_overrides: dict | None = None,
              decoder_only: bool = False, worst_frac: float = 0.0, worst_weight: float = 0.0) -> dict:
    """Train AutoencoderKL with L1 + perceptual + PatchGAN (adaptive weight, warm-up) + KL 1e-6.

    decoder_only: fine-tune the shipped VAE's decoder with the encoder frozen (what Stability did
    for sd-vae-ft-mse): the latent space, its scaling factor and every U-Net trained on it stay valid.
    worst_frac / worst_weight: add worst_weight x the mean squared error of each image's worst
    worst_frac of pixels. A defect a few pixels wide (a corner smudge, a colour fringe) is a tiny
    share of a mean loss; this term is where it shows (`worst_pixel_loss`).
    """
    if not 0.0 <= worst_frac < 1.0 or worst_weight < 0.0:
        raise ValueError(f"worst_frac must be in [0, 1) and worst_weight >= 0, got {worst_frac}, {worst_weight}")
    from ldm_tutorial.losses import VAELoss, VAELossConfig  # noqa: PLC0415

    torch.manual_seed(ctx.seed)
    images, _ = ctx.dataset()          # render first: worker processes fork before CUDA starts
    if decoder_only:
        vae = load_vae(ctx.device, ctx.out).requires_grad_(False)
        params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
        for p_ in params:
            p_.requires_grad_(True)
        name = name if name != "vae" else "vae-decoder"
    else:
        vae = configs.new_vae(**(vae_overrides or {})).to(ctx.device)
        params = list(vae.parameters())
    # TinySD's first VAE (H100, first session) was trained with kl_reduction="sum", i.e. a KL 49,152 times
    # stronger than LDM's 1e-6 at 128x128 (the VAE-losses chapter measures what that does); the shipped
    # one (third H100 run) uses the LDM ratio, the VAELossConfig default.
    lossf = VAELoss(loss_cfg or VAELossConfig(disc_start=10**9)).to(ctx.device)
    opt = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(lossf.discriminator.parameters(), lr=lr, betas=(0.5, 0.9)) if lossf.cfg.use_gan else None
    step, rng, gen = 0, np.random.default_rng(ctx.seed + 2), torch.Generator().manual_seed(ctx.seed + 3)
    ck = load_ckpt(ctx, name)
    if ck:
        vae.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"]); step = ck["step"]; rng = ck["rng"]
        lossf.load_state_dict(ck["loss"]); lossf.cfg.disc_start = ck["disc_start"]; gen.set_state(ck["gen"])
        if opt_d:
            opt_d.load_state_dict(ck["opt_d"])
    photos = [p.to(ctx.device) for p in data.load_photos("train")]   # crops are cut where training runs
    last_layer = vae.decoder.conv_out.weight
    logs: dict = {}
    def state():
        return dict(model=vae.state_dict(), opt=opt.state_dict(), step=step, rng=rng, loss=lossf.state_dict(),
                    disc_start=lossf.cfg.disc_start, gen=gen.get_state(), opt_d=opt_d.state_dict() if opt_d else None)

    budget.restart()
    progress = Progress(ctx, name, state)
    while not budget.done(step):
        if lossf.cfg.disc_start >= 10**9 and budget.frac(step) >= disc_start_frac:
            lossf.cfg.disc_start = step          # switch the discriminator on (warm-up over)
            print(f"[{name}] discriminator on at step {step}", flush=True)
        x = _vae_batch(ctx, images, rng, photos, gen, batch, photo_frac)
        with ctx.autocast:
            with torch.set_grad_enabled(not decoder_only):
                post = vae.encode(x).latent_dist
            z = post.sample(generator=None)
            x_hat = vae.decode(z).sample
            loss, logs = lossf.generator_loss(x, x_hat.float(), post.kl(), step, last_layer)
            if worst_weight > 0.0:
                worst = worst_pixel_loss(x, x_hat.float(), worst_frac)
                loss = loss + worst_weight * worst
                logs["worst"] = worst.item()
        optimiser_step(opt, loss)
        if opt_d is not None:
            with ctx.autocast:
                d_loss = lossf.discriminator_loss(x, x_hat.float(), step)
            if d_loss is not None:
                optimiser_step(opt_d, d_loss)
                logs["d"] = d_loss.item()
        step += 1
        progress.tick(step, lambda: {k: f"{v:.3g}" for k, v in logs.items()})
    elapsed = time.time() - budget.start          # training loop only, not setup or export
    progress.close()
    vae.eval()
    # scaling factor: 1 / std of latents (posterior samples) over training scenes
    sf = vae.config.scaling_factor if decoder_only else latent_std_inverse(vae, images[: min(len(images), 4096)], ctx)
    vae.register_to_config(scaling_factor=sf)
    _save_fp16(vae, ctx.out / "tinysd" / "vae")
    c = lossf.cfg
    return {"steps": step, "scaling_factor": sf, "disc_start": lossf.cfg.disc_start, **{k: float(v) for k, v in logs.items()},
            "seconds": elapsed, "loss_weights": {"l1": c.l1_weight, "l2": c.l2_weight, "perceptual": c.perceptual_weight,
                                                 "gan": c.use_gan}}


WORST_WEIGHT = 0.1


def worst_pixel_loss(x: torch.Tensor, x_hat: torch.Tensor, frac: float) -> torch.Tensor:
    """Mean over images of the mean squared error (over channels) of each image's worst `frac` of pixels."""
    err = (x_hat - x).pow(2).mean(1).flatten(1)                  # (B, H*W)
    k = max(1, int(round(frac * err.shape[1])))
    return err.topk(k, dim=1).values.mean()


@torch.no_grad()
def latent_std_inverse(vae, images_u8: torch.Tensor, ctx: Ctx, batch: int = 256) -> float:
    zs = []
    g = torch.Generator(device=ctx.device).manual_seed(0)
    for i in range(0, len(images_u8), batch):
        x = data.to_float(images_u8[i:i + batch]).to(ctx.device)
        zs.append(vae.encode(x).latent_dist.sample(generator=g).float().cpu())
    return float(1.0 / torch.cat(zs).std())


@torch.no_grad()
def encode_dataset(ctx: Ctx, vae, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-encode every training scene once (the production habit): posterior mean and std."""
    images, _ = ctx.dataset()
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch), desc="encode", mininterval=5):
        d = vae.encode(data.to_float(images[i:i + batch]).to(ctx.device)).latent_dist
        means.append(d.mean.half()); stds.append(d.std.half())
    return torch.cat(means), torch.cat(stds)


def cached_latents(ctx: Ctx, vae) -> tuple[torch.Tensor, torch.Tensor]:
    """encode_dataset, read from / written to ctx.latents_cache when set (two CPU runs share one encode).

    The cache records the dataset (n_scenes, seed) and a digest of the VAE weights it was encoded
    with; a cache made for other data or another VAE is re-encoded, never silently reused.
    """
    key = {"n_scenes": ctx.n_scenes, "seed": ctx.seed,
           "vae": float(sum(p.detach().double().sum() for p in vae.parameters()))}
    path = ctx.latents_cache
    if path is not None and Path(path).exists():
        c = torch.load(path, map_location="cpu", weights_only=True)
        if c.get("key") == key:
            print(f"latents: read from {path}", flush=True)
            return c["mean"].to(ctx.device), c["std"].to(ctx.device)
        print(f"latents: {path} was made for {c.get('key')}, not {key}: re-encoding", flush=True)
    mean, std = encode_dataset(ctx, vae)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "mean": mean.cpu(), "std": std.cpu()}, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
    return mean, std


# ----------------------------------------------------------------------------- U-Nets
def random_masks(n: int, rng: np.random.Generator, size: int = shapes.IMAGE_SIZE) -> torch.Tensor:
    """(n, 1, size, size) float masks, 1 = repaint: boxes, ellipses, brush strokes, or everything."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    out = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        kind = rng.choice(["box", "ellipse", "stroke", "full"], p=[0.35, 0.3, 0.25, 0.1])
        if kind == "full":
            out[i] = 1
        elif kind == "box":
            w, h = rng.integers(size // 5, size * 3 // 4, size=2)
            x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
            out[i, 0, y0:y0 + h, x0:x0 + w] = 1
        elif kind == "ellipse":
            cx, cy = rng.uniform(0.15, 0.85, size=2) * size
            rx, ry = rng.uniform(0.1, 0.35, size=2) * size
            out[i, 0] = (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2) <= 1
        else:
            m = np.zeros((size, size), bool)
            x, y = rng.uniform(0, size, size=2)
            r = rng.uniform(5, 14)
            for _ in range(int(rng.integers(4, 10))):
                ang = rng.uniform(0, 2 * np.pi)
                for t in np.linspace(0, 1, 8):
                    px, py = x + t * 25 * np.cos(ang), y + t * 25 * np.sin(ang)
                    m |= (xs - px) ** 2 + (ys - py) ** 2 <= r**2
                x, y = np.clip([x + 25 * np.cos(ang), y + 25 * np.sin(ang)], 0, size)
            out[i, 0] = m
    return torch.from_numpy(out)


def flow_targets(z0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rectified flow (SD3's convention): z_sigma = (1 - sigma) z0 + sigma noise, velocity target noise - z0.

    Returns (noisy latents, target, U-Net timestep = sigma * 1000, what FlowMatchEulerDiscreteScheduler feeds).
    """
    s = sigma.view(-1, 1, 1, 1)
    return (1 - s) * z0 + s * noise, noise - z0, sigma * 1000


def masked_image_latents(vae, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What StableDiffusionInpaintPipeline feeds the U-Net: the image with the masked pixels set to 0
    (mask 1 = repaint), encoded (posterior mode) and scaled."""
    return vae.encode(x * (mask < 0.5)).latent_dist.mode().float() * vae.config.scaling_factor


@torch.no_grad()
def inpaint_pool(ctx: Ctx, vae, images_u8: torch.Tensor, mask_pool: torch.Tensor, n: int,
                 rng: np.random.Generator, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n fixed (scene index, mask, masked-image latents) triples, so a CPU step needs no VAE encode."""
    idx = torch.from_numpy(rng.integers(len(images_u8), size=n))
    pick = torch.from_numpy(rng.integers(len(mask_pool), size=n))
    flip = torch.from_numpy(rng.random(n) < 0.5)
    masks = torch.where(flip[:, None, None, None], mask_pool[pick].flip(-1), mask_pool[pick]).cpu()
    lats = []
    for i in tqdm(range(0, n, batch), desc="inpaint pool", mininterval=5):
        x = data.to_float(images_u8[idx[i:i + batch].to(images_u8.device)]).to(ctx.device)
        m = masks[i:i + batch].to(ctx.device)
        with ctx.autocast:
            lats.append(masked_image_latents(vae, x, m).half().cpu())
    return idx, masks.to(torch.uint8), torch.cat(lats)


def learning_rate(base: float, step: int, warmup: int, frac: float, schedule: str = "constant") -> float:
    """The U-Net stages' learning rate: linear warm-up over `warmup` steps, then constant, or for
    "cosine" times 0.5 (1 + cos(pi * frac)), where frac is the share of the budget used (0 to 1)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    lr = base * min(1.0, (step + 1) / warmup)
    if schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, frac))))
    return lr


def make_accelerator(ctx: Ctx):
    """accelerate's Accelerator for the U-Net stages: data parallel under `accelerate launch`
    (one process per device, gloo on CPUs), the plain loop in a single process. Devices stay as
    `ctx.device` says (`main` sets it to the process's own device under a launcher)."""
    from accelerate import Accelerator  # noqa: PLC0415

    accelerator = Accelerator(cpu=ctx.device.type == "cpu", device_placement=False)
    ctx.main_process = accelerator.is_main_process
    return accelerator


def common_frac(accelerator, budget: Budget, step: int) -> float:
    """The budget's used fraction as the main process sees it, on every process, so that a
    --seconds budget stops all processes at the same step and gives them the same learning rate."""
    frac = budget.frac(step)
    if accelerator.num_processes == 1:
        return frac
    from accelerate.utils import broadcast  # noqa: PLC0415

    return float(broadcast(torch.tensor([frac], dtype=torch.float64, device=accelerator.device))[0])


def train_unet(ctx: Ctx, budget: Budget, inpaint: bool = False, batch: int = 256, lr: float = 4e-4,
               drop_prob: float = 0.1, ema_decay: float = 0.999, objective: str = "epsilon",
               init_from_shipped: bool = False, pool: int | None = None, warmup: int = 300,
               lr_schedule: str = "constant", latent_scale: str = "config", unet_preset: str = "default",
               conditioning: str = "cross") -> dict:
    """Epsilon-prediction training on pre-encoded latents with 10% caption dropout (for CFG).

    objective="flow": the same U-Net, data and text encoder trained as a rectified flow instead
    (velocity target, sigma drawn logit-normal as in SD3), exported to `tinysd-flow/` with a
    FlowMatchEulerDiscreteScheduler: the SD-versions chapter's DDPM-vs-flow comparison.

    init_from_shipped: inpainting continues the shipped inpainting U-Net (instead of starting from
    the text U-Net with zero extra channels); text continues the shipped text U-Net; flow starts
    from the shipped (epsilon) text U-Net's weights, so that a flow fine-tune and an epsilon
    continuation of the same length form a controlled comparison on the CPU.
    pool (inpainting only) precomputes that many (scene, mask, masked-image latents) triples, the
    CPU route (the per-step VAE encode dominates a CPU step).
    lr_schedule: "constant" after the linear warm-up (the recipe of the H100 runs), or "cosine": the
    warm-up times a cosine decay to zero over the budget (steps or seconds), the usual way to end a
    fine-tune (`learning_rate`).
    latent_scale / unet_preset (the scaling-factor chapter's comparison): "config" trains on latents
    times the VAE's scaling_factor (SD's recipe), "none" on the raw latents (times 1.0); unet_preset
    names a size in `configs.UNET_PRESETS`. Either one away from its default makes this a
    comparison run: a fresh text U-Net against the text encoder already in `ctx.out` (not
    re-exported), exported to `tinysd-scaling/{scaled,unscaled}/unet` with a `log.json` beside it
    (the loss every 10 steps, and the scaling factor its samples must be decoded with).
    conditioning (the cross-attention chapter's control, a comparison run with a unet_preset):
    "cross" feeds all 77 token states to cross-attention (SD's recipe); "pooled" builds the preset
    without attention blocks (DownBlock2D/UpBlock2D, UNetMidBlock2D) and adds the text encoder's
    pooled output (CLIP's: the final hidden state at the end token) to the time embedding through
    diffusers' class_embed_type="projection"; "pooled-token" keeps the preset's blocks and feeds
    that pooled vector as the only key (cross-attention then adds the same vector everywhere).
    Either is exported to `tinysd-conditioning/<conditioning>/unet` with its log.json.
    """
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
    learning_rate(lr, 0, warmup, 0.0, lr_schedule)        # a bad schedule fails here, before any setup
    if latent_scale not in LATENT_SCALES:
        raise ValueError(f"latent_scale must be one of {LATENT_SCALES}, got {latent_scale!r}")
    preset = configs.unet_preset(unet_preset)             # a bad preset name fails here too
    comparison = scaling_run_name(latent_scale, unet_preset)
    if comparison and (inpaint or objective != "epsilon" or init_from_shipped):
        raise ValueError("latent_scale / unet_preset are for a fresh text U-Net (stage 'unet', "
                         "epsilon objective, without --continue-shipped)")
    if pool and not inpaint:
        raise ValueError("pool is for the inpainting stage only")
    if objective not in ("epsilon", "flow") or (inpaint and objective != "epsilon"):
        raise ValueError(f"objective must be 'epsilon' or 'flow' (flow without inpaint), got {objective!r}")
    name = "inpaint" if inpaint else ("flow" if objective == "flow" else "unet")
    if conditioning != "cross" and not comparison:
        raise ValueError(f"conditioning {conditioning!r} is for a comparison run: give unet_preset (e.g. 'small')")
    if conditioning != "cross":
        comparison = f"unet-conditioning-{conditioning}" + ("" if unet_preset == "small" else f"-{unet_preset}")
    name = comparison or name                 # its own checkpoint name: never resumes another run
    torch.manual_seed(ctx.seed + (7 if inpaint else 5))
    accelerator = make_accelerator(ctx)
    world, rank = accelerator.num_processes, accelerator.process_index
    gbatch = batch * world        # every process draws the same global batch of `world * batch` ...
    mine = slice(rank * batch, (rank + 1) * batch)   # ... and trains on its own slice of it
    if name == "unet" and not init_from_shipped and not (ctx.ckpt_dir / "unet.pt").exists():
        with accelerator.main_process_first():    # the main process writes it, the others then read it
            if ctx.main_process:
                export_text_encoder(ctx)          # a fresh U-Net learns against the current CLIP text tower
    te, tok = load_text_encoder(ctx.device, ctx.out)
    te.requires_grad_(False)
    vae = load_vae(ctx.device, ctx.out).requires_grad_(False)
    sf = vae.config.scaling_factor if latent_scale == "config" else 1.0
    sched = configs.new_scheduler()
    if inpaint and init_from_shipped:
        from diffusers import UNet2DConditionModel  # noqa: PLC0415

        unet = UNet2DConditionModel.from_pretrained(ctx.out / "tinysd-inpaint" / "unet", torch_dtype=torch.float32)
        print("[inpaint] continuing from the shipped inpainting U-Net", flush=True)
    elif inpaint:
        from diffusers import UNet2DConditionModel  # noqa: PLC0415

        base = UNet2DConditionModel.from_pretrained(ctx.out / "tinysd" / "unet", torch_dtype=torch.float32)
        unet = configs.new_unet(in_channels=9)
        sd = base.state_dict()
        w = torch.zeros_like(unet.conv_in.weight)
        w[:, :4] = sd["conv_in.weight"]                  # extra mask + masked-image channels start at zero
        sd["conv_in.weight"] = w
        unet.load_state_dict(sd)
    elif init_from_shipped:
        from diffusers import UNet2DConditionModel  # noqa: PLC0415

        unet = UNet2DConditionModel.from_pretrained(ctx.out / "tinysd" / "unet", torch_dtype=torch.float32)
        print(f"[{name}] starting from the shipped epsilon U-Net's weights", flush=True)
    elif conditioning == "pooled":
        n = len(configs.UNET["block_out_channels"])
        unet = configs.new_unet(**preset, down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
                                mid_block_type="UNetMidBlock2D", class_embed_type="projection",
                                projection_class_embeddings_input_dim=te.config.hidden_size)
    else:
        unet = configs.new_unet(**preset)
    unet.to(ctx.device).train()
    ema = EMA(unet, ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0, fused=ctx.device.type == "cuda")
    step, rng = 0, np.random.default_rng(ctx.seed + (17 if inpaint else 11))
    losses: list[float] = []                  # every 10th step's loss (kept in the checkpoint: the curve survives a resume)
    ck = load_ckpt(ctx, name)
    if ck:
        unet.load_state_dict(ck["model"]); ema.shadow.load_state_dict(ck["ema"]); opt.load_state_dict(ck["opt"])
        step, rng, losses = ck["step"], ck["rng"], list(ck.get("losses", []))
    images, scenes = ctx.dataset()
    if getattr(ctx, "_latents", None) is None:
        with accelerator.main_process_first():    # one process writes the shared cache, the others read it
            ctx._latents = cached_latents(ctx, vae)
    mean, std = ctx._latents
    bank = ctx.caption_bank(tok)                                          # (N, 8, 77) token ids
    empty_ids = tokenize(tok, [""], bank.device).to(bank.dtype)           # (1, 77): "" for classifier-free guidance
    mask_pool = random_masks(2048, np.random.default_rng(ctx.seed + 23)).to(ctx.device) if inpaint else None
    pooled = inpaint_pool(ctx, vae, images, mask_pool, pool, np.random.default_rng(ctx.seed + 29)) if pool else None
    acp = sched.alphas_cumprod.to(ctx.device)
    # data parallel under `accelerate launch` (DDP; one process: the model as it is); gradients are
    # averaged over the processes, so N processes at batch b step like one process at batch N * b
    ddp_unet, opt = accelerator.prepare(unet, opt)

    def state():
        return dict(model=unet.state_dict(), ema=ema.shadow.state_dict(), opt=opt.state_dict(), step=step, rng=rng,
                    losses=losses)

    budget.restart()
    z0_std = None                             # std of the first batch the loop trains on (what latent_scale did)
    progress = Progress(ctx, name, state)
    while (frac := common_frac(accelerator, budget, step)) < 1.0:
        if pooled:
            j = torch.from_numpy(rng.integers(len(pooled[0]), size=gbatch))
            idx = pooled[0][j].numpy()
        else:
            idx = rng.integers(len(scenes), size=gbatch)
        idx_t = torch.from_numpy(idx).to(mean.device)
        z0 = (mean[idx_t].float() + std[idx_t].float() * torch.randn_like(mean[idx_t].float())).to(ctx.device) * sf
        if z0_std is None:
            z0_std = float(z0.std())
        ids = bank[idx_t.to(bank.device), torch.from_numpy(rng.integers(bank.shape[1], size=gbatch)).to(bank.device)]
        dropped = torch.from_numpy(rng.random(gbatch) < drop_prob).to(bank.device)
        ids = torch.where(dropped[:, None], empty_ids, ids).long()[mine]   # caption dropout: the empty prompt
        with torch.no_grad(), ctx.autocast:
            enc = te(ids)
            cond = enc.last_hidden_state
        extra = {}
        if conditioning == "pooled":                 # dropped captions get the empty prompt's pooled vector
            extra = {"class_labels": enc.pooler_output.float()}
        elif conditioning == "pooled-token":
            cond = enc.pooler_output[:, None, :]
        noise = torch.randn_like(z0)
        if objective == "flow":
            sigma = torch.sigmoid(torch.randn(gbatch, device=ctx.device))    # logit-normal(0, 1), SD3's default
            zt, target, t = flow_targets(z0, noise, sigma)
        else:
            t = torch.randint(0, sched.config.num_train_timesteps, (gbatch,), device=ctx.device)
            a = acp[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise            # scheduler.add_noise, written out
            target = noise
        zt, target, t = zt[mine], target[mine], t[mine]           # this process's slice of the global draw
        inp = zt
        if pooled:
            m = pooled[1][j[mine]].to(ctx.device).float()
            masked_lat = pooled[2][j[mine]].to(ctx.device).float()
        elif inpaint:
            m = mask_pool[torch.from_numpy(rng.integers(len(mask_pool), size=gbatch)).to(ctx.device)]
            m = torch.where(torch.rand(gbatch, 1, 1, 1, device=ctx.device) < 0.5, m, m.flip(-1))[mine]
            x = data.to_float(images[idx_t[mine].to(images.device)]).to(ctx.device)
            with torch.no_grad(), ctx.autocast:
                masked_lat = masked_image_latents(vae, x, m)
        if inpaint:
            m_lat = F.interpolate(m, size=z0.shape[-2:])        # diffusers: nearest resize of the mask
            inp = torch.cat([zt, m_lat, masked_lat], dim=1)     # (B, 4 + 1 + 4, 16, 16): diffusers' order
        for g in opt.param_groups:
            g["lr"] = learning_rate(lr, step, warmup, frac, lr_schedule)
        with ctx.autocast:
            pred = ddp_unet(inp, t, encoder_hidden_states=cond.float(), **extra).sample
            loss = F.mse_loss(pred.float(), target)
        optimiser_step(opt, loss, clip_params=unet.parameters(), backward=accelerator.backward)
        ema.update(unet, step)
        step += 1
        if step % 10 == 0:
            losses.append(loss.item())
        progress.tick(step, lambda: {"loss": f"{np.mean(losses[-20:]):.4f}"})
    elapsed = time.time() - budget.start          # training loop only, not setup or export
    progress.close()
    accelerator.wait_for_everyone()
    if not ctx.main_process:                      # only the main process exports
        return {"steps": step, "seconds": elapsed, "process_index": rank}
    if comparison:
        return _export_scaling_run(ctx, ema.shadow, latent_scale, unet_preset, sf, {
            "steps": step, "final_loss": float(np.mean(losses[-50:])) if losses else None, "seconds": elapsed,
            "objective": objective, "latent_scale": latent_scale, "unet_preset": unet_preset,
            "scaling_factor_trained_with": sf, "first_batch_z0_std": z0_std, "warmup": warmup,
            "batch": batch, "lr": lr,
            "n_scenes": ctx.n_scenes, "parameters": sum(p.numel() for p in ema.shadow.parameters()),
            **({"lr_schedule": lr_schedule} if lr_schedule != "constant" else {}),
            **({"conditioning": conditioning} if conditioning != "cross" else {})}, losses)
    _save_fp16(ema.shadow, ctx.out / {"unet": "tinysd", "inpaint": "tinysd-inpaint", "flow": "tinysd-flow"}[name] / "unet")
    if name == "flow":
        from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: PLC0415

        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(ctx.out / "tinysd-flow" / "scheduler")
    elif not inpaint:
        configs.new_scheduler().save_pretrained(ctx.out / "tinysd" / "scheduler")
        write_model_index(ctx.out / "tinysd")
    else:
        write_model_index(ctx.out / "tinysd-inpaint", inpaint=True)
    return {"steps": step, "final_loss": float(np.mean(losses[-50:])) if losses else None,
            "seconds": elapsed, "objective": objective, **({"pool": pool} if pool else {}),
            **({"lr_schedule": lr_schedule} if lr_schedule != "constant" else {}),
            **({"continued": True} if init_from_shipped else {})}


def scaling_run_name(latent_scale: str = "config", unet_preset: str = "default") -> str | None:
    """The scaling-factor comparison's run name (its checkpoint and training-log key), None for the
    shipped recipe: "unet-scaling-scaled" or "unet-scaling-unscaled", plus the preset if not "small"."""
    if latent_scale == "config" and unet_preset == "default":
        return None
    variant = "scaled" if latent_scale == "config" else "unscaled"
    return f"unet-scaling-{variant}" + ("" if unet_preset == "small" else f"-{unet_preset}")


def _export_scaling_run(ctx: Ctx, unet, latent_scale: str, unet_preset: str, sf: float, res: dict,
                        losses: list[float]) -> dict:
    """Write a comparison U-Net to tinysd-scaling/<variant>/unet (float16) and its log.json beside it."""
    variant = "scaled" if latent_scale == "config" else "unscaled"
    folder = ctx.out / "tinysd-scaling" / (variant if unet_preset == "small" else f"{variant}-{unet_preset}")
    if res.get("conditioning", "cross") != "cross":
        c = res["conditioning"]
        folder = ctx.out / "tinysd-conditioning" / (c if unet_preset == "small" else f"{c}-{unet_preset}")
    _save_fp16(unet, folder / "unet")
    how = (f"decode with the VAE's scaling_factor ({sf:g}), as TinySD does" if latent_scale == "config" else
           "trained on raw latents: sample with a VAE whose scaling_factor is 1.0 "
           "(ldm.tinysd.scaling_comparison does this)")
    log = {**res, "decode_scaling_factor": sf, "sampling": how, "loss_every": 10, "losses": losses,
           "device": str(ctx.device)}
    (folder / "log.json").write_text(json.dumps(log, indent=1) + "\n")
    return res


def write_model_index(folder: Path, inpaint: bool = False) -> None:
    """model_index.json as diffusers writes it for StableDiffusionPipeline (no safety checker).

    The vae entry names the class saved in `folder/vae` (fixed_norm.vae_index_entry), AutoencoderKL
    when there is none yet.
    """
    from .fixed_norm import vae_index_entry  # noqa: PLC0415

    has_vae = (folder / "vae" / "config.json").exists()
    vae = vae_index_entry(folder / "vae") if has_vae else ["diffusers", "AutoencoderKL"]
    cls = "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline"
    index = {"_class_name": cls, "_diffusers_version": __import__("diffusers").__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
             "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": vae}
    if inpaint:  # the inpainting folder ships only its U-Net; the rest is shared with tinysd/
        index = {"_class_name": cls, "unet": ["diffusers", "UNet2DConditionModel"], "shared_with": "tinysd"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


# ----------------------------------------------------------------------------- TAESD
def vae_targets(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What TAESD learns from the VAE: its scaled latents (posterior mode) and its decodes of them."""
    sf = vae.config.scaling_factor
    z = vae.encode(x).latent_dist.mode().float() * sf
    return z, vae.decode(z / sf).sample.float().clamp(-1, 1)


@torch.no_grad()
def taesd_targets(ctx: Ctx, vae, images_u8: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """vae_targets for a fixed pool of images, computed once: (z float16, x_vae uint8)."""
    zs, xs = [], []
    for i in tqdm(range(0, len(images_u8), batch), desc="taesd targets", mininterval=5):
        with ctx.autocast:
            z, target = vae_targets(vae, data.to_float(images_u8[i:i + batch]).to(ctx.device))
        zs.append(z.half())
        xs.append(((target + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(zs), torch.cat(xs)


def train_taesd(ctx: Ctx, budget: Budget, batch: int = 64, lr: float = 1e-3, pool: int | None = None,
                init_from_shipped: bool = False) -> dict:
    """Distil AutoencoderTiny from the VAE: encoder -> scaled latents, decoder -> the VAE's decodes.

    pool: compute the VAE's latents and decodes once for that many training scenes and draw batches
    from them (on the 2-core CPU a batch-64 step took 14.1 s with the two VAE passes, 6.6 s without);
    None: run the VAE every step.
    init_from_shipped: continue the shipped preview decoder (after a decoder fine-tune of the VAE, say)
    instead of starting from random weights.
    """
    torch.manual_seed(ctx.seed + 9)
    images, _ = ctx.dataset()
    vae = load_vae(ctx.device, ctx.out).requires_grad_(False)
    if init_from_shipped:
        from diffusers import AutoencoderTiny  # noqa: PLC0415

        taesd = AutoencoderTiny.from_pretrained(ctx.out / "tinysd-taesd", torch_dtype=torch.float32)
        print("[taesd] continuing from the shipped preview decoder", flush=True)
    else:
        taesd = configs.new_taesd()
    taesd = taesd.to(ctx.device).train()
    opt = torch.optim.Adam(taesd.parameters(), lr=lr)
    step, rng = 0, np.random.default_rng(ctx.seed + 19)
    ck = load_ckpt(ctx, "taesd")
    if ck:
        taesd.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"]); step, rng = ck["step"], ck["rng"]
    cached = taesd_targets(ctx, vae, images[:pool]) if pool else None
    n_pool = len(cached[0]) if cached else len(images)

    def state():
        return dict(model=taesd.state_dict(), opt=opt.state_dict(), step=step, rng=rng)

    budget.restart()
    loss = torch.tensor(float("nan"))
    progress = Progress(ctx, "taesd", state)
    while not budget.done(step):
        idx = torch.from_numpy(rng.integers(n_pool, size=batch)).to(images.device)
        x = data.to_float(images[idx]).to(ctx.device)
        if cached:
            z, target = cached[0][idx].float(), data.to_float(cached[1][idx])
        else:
            with torch.no_grad(), ctx.autocast:
                z, target = vae_targets(vae, x)
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(1.0, budget.frac(step))))
        with ctx.autocast:
            z_hat = taesd.encode(x).latents.float()
            x_hat = taesd.decode(z.detach()).sample.float()
            loss = F.l1_loss(z_hat, z) + F.l1_loss(x_hat, target) + F.mse_loss(x_hat, target)
        optimiser_step(opt, loss)
        step += 1
        progress.tick(step, lambda: {"loss": f"{loss.item():.4f}"})
    elapsed = time.time() - budget.start          # training loop only, not setup or export
    progress.close()
    _save_fp16(taesd.eval(), ctx.out / "tinysd-taesd")
    return {"steps": step, "final_loss": float(loss.item()), "seconds": elapsed, "target_pool": pool,
            **({"continued": True} if init_from_shipped else {})}


# ----------------------------------------------------------------------------- CLI
def run_stage(ctx: Ctx, stage: str, budget: Budget, **kw) -> dict:
    fn = {"clip": train_clip, "vae": train_vae, "unet": train_unet,
          "inpaint": lambda c, b, **k: train_unet(c, b, inpaint=True, **k), "taesd": train_taesd,
          "flow": lambda c, b, **k: train_unet(c, b, objective="flow", **k)}[stage]
    print(f"== {stage} on {ctx.device} ==", flush=True)
    res = fn(ctx, budget, **kw)
    params = inspect.signature(train_unet if stage in ("inpaint", "flow") else fn).parameters
    if kw.get("conditioning", "cross") != "cross":
        stage = f"unet-conditioning-{kw['conditioning']}" + ("" if kw.get("unet_preset") == "small"
                                                              else f"-{kw.get('unet_preset')}")
    elif scaling_run_name(kw.get("latent_scale", "config"), kw.get("unet_preset", "default")):
        stage = scaling_run_name(kw.get("latent_scale", "config"), kw.get("unet_preset", "default"))
    elif kw.get("decoder_only"):
        stage = "vae-decoder-finetune"
    elif kw.get("init_from_shipped"):
        stage = f"{stage}-continued"
    if not ctx.main_process:  # the other processes of `accelerate launch` leave logging to the main one
        return res
    log_path = ctx.out / "training_log.json"
    if log_path.exists():     # another stage may have finished meanwhile: merge, don't overwrite
        ctx.log = {**json.loads(log_path.read_text()), **ctx.log}
    res = {**res, **{k: kw.get(k, params[k].default) for k in ("batch", "lr") if k in params}}
    ctx.log[stage] = {**res, "device": str(ctx.device),
                      "gpu": torch.cuda.get_device_name() if ctx.device.type == "cuda" else None}
    log_path.write_text(json.dumps(ctx.log, indent=2, default=str) + "\n")
    print(f"== {stage} done: {json.dumps(res, default=str)}", flush=True)
    return res


def _per_stage(text: str | None, flag: str) -> dict[str, str]:
    """'vae=180,unet=220' -> {'vae': '180', 'unet': '220'}, with a clear error for a typo."""
    out = {}
    for kv in (text or "").split(","):
        if not kv:
            continue
        k, sep, v = kv.partition("=")
        if not sep or k not in STAGES:
            raise SystemExit(f"{flag}: expected stage=value with stage in {STAGES}, got {kv!r}")
        out[k] = v
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ldm_tutorial.tinysd.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES + ("all",))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--seconds-per-stage", default=None, help="for 'all': clip=60,vae=170,unet=180,...")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--batch-per-stage", default=None, help="for 'all': vae=64,unet=512,... (else each stage's default)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--ckpt-dir", type=Path, default=Path("checkpoints"))
    p.add_argument("--ckpt-every", type=float, default=60.0)
    p.add_argument("--n-scenes", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--taesd-pool", "--pool", dest="pool", type=int, default=None,
                   help="taesd / inpaint: precompute the VAE's work for this many examples (the CPU route)")
    p.add_argument("--vae-loss", choices=("recipe", "ft-mse", "ft-mse-worst"), default="recipe",
                   help="recipe: L1 + perceptual + PatchGAN + KL (LDM); ft-mse: MSE + 0.1 perceptual, no GAN "
                        "(how Stability fine-tuned sd-vae-ft-mse's decoder); ft-mse-worst: ft-mse plus "
                        f"{WORST_WEIGHT} x the squared error of each image's worst 1%% of pixels")
    p.add_argument("--continue-shipped", action="store_true",
                   help="clip: start from the shipped tiny CLIP; vae: fine-tune the shipped VAE's decoder only; "
                        "unet / inpaint: continue the shipped U-Net; flow: start from the shipped epsilon U-Net; "
                        "taesd: continue the shipped preview decoder")
    p.add_argument("--cosine", action="store_true",
                   help="unet / inpaint / flow: decay the learning rate to zero over the budget (a cosine, on top of "
                        "the warm-up) instead of keeping it constant")
    p.add_argument("--latents-cache", type=Path, default=None,
                   help="unet / inpaint / flow: keep the pre-encoded latents in this file (runs side by side share it)")
    p.add_argument("--latent-scale", choices=LATENT_SCALES, default="config",
                   help="unet: train on latents times the VAE's scaling_factor (config, SD's recipe) or on the raw "
                        "latents (none); either this or --unet-preset makes a comparison run, exported to "
                        "tinysd-scaling/{scaled,unscaled}/ (the scaling-factor chapter)")
    p.add_argument("--unet-preset", choices=tuple(configs.UNET_PRESETS), default="default",
                   help="unet: the U-Net's size (configs.UNET_PRESETS; small: 1.0M parameters)")
    p.add_argument("--warmup", type=int, default=None, help="unet / inpaint / flow: learning-rate warm-up steps")
    p.add_argument("--conditioning", choices=CONDITIONINGS, default="cross",
                   help="unet with --unet-preset: how the text enters (cross: 77 tokens to cross-attention; pooled: "
                        "the pooled vector added to the time embedding, no attention blocks; pooled-token: the "
                        "pooled vector as the only cross-attention key); exported to tinysd-conditioning/<it>/")
    a = p.parse_args(argv)
    if a.cosine and a.stage not in COSINE_STAGES + ("all",):
        p.error(f"--cosine is for the stages {COSINE_STAGES} (or 'all'), not {a.stage!r}")
    if (a.latent_scale != "config" or a.unet_preset != "default") and a.stage != "unet":
        p.error(f"--latent-scale / --unet-preset are for the stage 'unet', not {a.stage!r}")
    if a.conditioning != "cross" and (a.stage != "unet" or a.unet_preset == "default"):
        p.error("--conditioning pooled / pooled-token is for the stage 'unet' with --unet-preset (a comparison run)")
    if a.warmup is not None and a.stage not in COSINE_STAGES:
        p.error(f"--warmup is for the stages {COSINE_STAGES}, not {a.stage!r}")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:        # under `accelerate launch` / torchrun
        if a.stage not in DATA_PARALLEL_STAGES:
            p.error(f"under accelerate launch only the stages {DATA_PARALLEL_STAGES} run data parallel, "
                    f"not {a.stage!r}: run it in one process")
        from accelerate import PartialState  # noqa: PLC0415

        device = PartialState(cpu=device.type == "cpu").device          # cuda:<local rank>, or cpu
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True      # fixed shapes: let cuDNN pick its fastest kernels once
    ctx = Ctx(device=device, out=a.out, ckpt_dir=a.ckpt_dir, seed=a.seed, n_scenes=a.n_scenes, ckpt_every=a.ckpt_every,
              latents_cache=a.latents_cache)
    log_path = a.out / "training_log.json"
    if log_path.exists():
        ctx.log = json.loads(log_path.read_text())
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.stage == "all":
        per = _per_stage(a.seconds_per_stage, "--seconds-per-stage")
        batches = _per_stage(a.batch_per_stage, "--batch-per-stage")
        for stage in STAGES:
            if stage in per:
                extra = {"batch": int(batches[stage])} if stage in batches else {}
                run_stage(ctx, stage, Budget(a.steps, float(per[stage])), **{**stage_kwargs(a, stage), **extra})
    else:
        run_stage(ctx, a.stage, Budget(a.steps, a.seconds), **stage_kwargs(a, a.stage))


def stage_kwargs(a: argparse.Namespace, stage: str) -> dict:
    """The keyword arguments the command line asks of one stage (also each stage of 'all')."""
    kw: dict = {}
    if a.continue_shipped:
        kw.update({"clip": {"init_from_shipped": True}, "vae": {"decoder_only": True, "disc_start_frac": 0.1},
                   "inpaint": {"init_from_shipped": True, "warmup": 50},
                   "unet": {"init_from_shipped": True, "warmup": 50},
                   "flow": {"init_from_shipped": True, "warmup": 50},
                   "taesd": {"init_from_shipped": True, "lr": 3e-4}}.get(stage, {}))
    if a.batch:
        kw["batch"] = a.batch
    if a.lr:
        kw["lr"] = a.lr
    if stage == "vae" and a.vae_loss in ("ft-mse", "ft-mse-worst"):
        from ldm_tutorial.losses import VAELossConfig  # noqa: PLC0415

        kw["loss_cfg"] = VAELossConfig(l1_weight=0.0, l2_weight=1.0, perceptual_weight=0.1, use_gan=False)
        if a.vae_loss == "ft-mse-worst":   # + the worst 1% of each image's pixels (worst_pixel_loss)
            kw.update(worst_frac=0.01, worst_weight=WORST_WEIGHT)
    if a.pool and stage in ("taesd", "inpaint"):
        kw["pool"] = a.pool
    if a.cosine and stage in COSINE_STAGES:
        kw["lr_schedule"] = "cosine"
    scale, preset = getattr(a, "latent_scale", "config"), getattr(a, "unet_preset", "default")
    if stage == "unet" and scaling_run_name(scale, preset):
        kw.update(latent_scale=scale, unet_preset=preset)
    if stage == "unet" and getattr(a, "conditioning", "cross") != "cross":
        kw["conditioning"] = a.conditioning
    if getattr(a, "warmup", None) is not None and stage in COSINE_STAGES:
        kw["warmup"] = a.warmup
    return kw


if __name__ == "__main__":
    main()
