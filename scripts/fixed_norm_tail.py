"""Is the corner smudge the price of GroupNorm? Fine-tune TinySD's decoder tail without it.

The diagnosis in benchmarks/tinysd.md ("Why the decoder draws the corner smudge") found a
normalisation spike: the decoder's last stages write a strong feature block into the top-left
corner, and GroupNorm's per-image statistics let that block set the scale of the whole picture.
Losses on the output could not remove it (eight fine-tunes). This prototype removes the
mechanism instead: every GroupNorm of the shared tail (`vae_lab.TRAINED_PREFIXES`: up_blocks 2
and 3, conv_norm_out) becomes a per-channel affine whose statistics are frozen at their average
over training scenes (`FixedNorm`), so no position can steer the scale any more. The tail then
starts as the GroupNorm one on average and is fine-tuned on the frozen stages' features (encoder
and the first two decoder stages frozen, so every U-Net stays valid).

diffusers' AutoencoderKL has no decoder without GroupNorm; the package's
`tinysd.fixed_norm.FixedNormAutoencoderKL` is one, and `--export ROOT` writes the fine-tuned tail
into it as a diffusers folder of a weights root. TinySD ships that export; the script starts
from the GroupNorm decoder (`tinysd.load_vae(groupnorm=True)`), so it reruns from the shipped
weights, or from a VAE `python -m ldm_tutorial.tinysd.train` trained.

    OMP_NUM_THREADS=1 nice .venv/bin/python scripts/fixed_norm_tail.py --steps 2000 --out runs/fnt
    (again with --resume to continue; --eval-only scores the last checkpoint with the defect rows;
    --eval-only --tail benchmarks/fixed_norm_tail.safetensors scores the committed 2,000-step tail,
    and with --export ROOT writes it as ROOT/tinysd/vae, a FixedNormAutoencoderKL folder, beside
    ROOT/tinysd-vae-groupnorm; --export ldm_tutorial/tinysd/weights is how TinySD's ships)
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm_tutorial.arch import decoder_features  # noqa: E402
from ldm_tutorial.metrics import psnr  # noqa: E402
from ldm_tutorial.tinysd import data, defects, load_vae, shapes  # noqa: E402
from ldm_tutorial.tinysd.fixed_norm import FixedNorm, group_stats  # noqa: E402

STAGE = 2          # the tail starts at up_blocks[2] (vae_lab.TRAINED_PREFIXES)


class Tail(nn.Module):
    """The decoder from up_blocks[STAGE] on, as `arch.decoder_rest` runs it."""

    def __init__(self, vae):
        super().__init__()
        d = vae.decoder
        self.blocks = copy.deepcopy(d.up_blocks[STAGE:])
        self.norm_out = copy.deepcopy(d.conv_norm_out)
        self.act = copy.deepcopy(d.conv_act)
        self.conv_out = copy.deepcopy(d.conv_out)

    def forward(self, h: torch.Tensor, swap_at_last_stage: int = 0) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if swap_at_last_stage and i == len(self.blocks) - 1:   # corner_dependence's probe
                s = swap_at_last_stage
                h = h.clone()
                h[..., :s, :s] = h[..., s:2 * s, s:2 * s]
            h = block(h)
        return self.conv_out(self.act(self.norm_out(h)))

    def group_norms(self) -> list[tuple[nn.Module, str, nn.GroupNorm]]:
        out = []
        for parent in self.modules():
            for name, child in parent.named_children():
                if isinstance(child, nn.GroupNorm):
                    out.append((parent, name, child))
        return out


@torch.no_grad()
def freeze_norms(tail: Tail, feats: torch.Tensor, batch: int = 16) -> int:
    """Replace every GroupNorm of `tail` by a FixedNorm at its statistics averaged over `feats`."""
    sites = tail.group_norms()
    sums = {id(gn): [0.0, 0.0] for _, _, gn in sites}
    hooks = []
    for _, _, gn in sites:
        def hook(mod, args, key=id(gn)):
            m, s = group_stats(mod, args[0])
            sums[key][0] = sums[key][0] + m.sum(0)
            sums[key][1] = sums[key][1] + s.sum(0)
        hooks.append(gn.register_forward_pre_hook(hook))
    for i in range(0, len(feats), batch):
        tail(feats[i:i + batch].float())
    for h in hooks:
        h.remove()
    n = len(feats)
    for parent, name, gn in sites:
        m, s = sums[id(gn)]
        setattr(parent, name, FixedNorm.from_group_norm(gn, m / n, s / n))
    return len(sites)


@torch.no_grad()
def features(vae, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        z = vae.encode(images[i:i + batch]).latent_dist.mean
        out.append(decoder_features(vae, z, STAGE).half())
    return torch.cat(out)


@torch.no_grad()
def constant_features(vae, images: torch.Tensor) -> torch.Tensor:
    z = vae.encode(images).latent_dist.mode()
    return decoder_features(vae, z.mean((2, 3), keepdim=True).expand_as(z).contiguous(), STAGE)


@torch.no_grad()
def score(tail: Tail, feats: torch.Tensor, inputs: torch.Tensor, const_feats: torch.Tensor) -> dict:
    """Round-trip PSNR, the top-left corner against the inputs', the corner-swap probe, and the
    top-left against the centre chroma of constant latents."""
    tail.eval()
    rec = torch.cat([tail(feats[i:i + 16].float()) for i in range(0, len(feats), 16)]).clamp(-1, 1)
    swapped = torch.cat([tail(feats[i:i + 16].float(), swap_at_last_stage=4)
                         for i in range(0, len(feats), 16)]).clamp(-1, 1)
    const = torch.cat([tail(const_feats[i:i + 16]) for i in range(0, len(const_feats), 16)])
    c = defects.chroma(const.clamp(-1, 1))
    h, w = c.shape[1:]
    m = h // 8
    inner = (..., slice(m, h - m), slice(m, w - m))
    smudge = defects.corner_smudge(rec, inputs, paired=True)
    tail.train()
    return {"psnr": float(psnr(rec, inputs).mean()),
            "top_left_x_input": smudge["ratio"], "smudged": smudge["smudged_share"],
            "interior_psnr": float(psnr(rec[inner], inputs[inner]).mean()),
            "interior_psnr_top_left_swapped": float(psnr(swapped[inner], inputs[inner]).mean()),
            "constant_top_left": float(c[:, :6, :6].mean()),
            "constant_centre": float(c[:, h // 2 - 3:h // 2 + 3, w // 2 - 3:w // 2 + 3].mean())}


@torch.no_grad()
def full_eval(tail: Tail, vae, n_per_count: int = 96, log=print, label: str = "frozen-norm decoder") -> dict:
    """evaluate.margin_study's rows with the tail in place of the margin: the same round trips,
    constant latents and text-to-image latents (the shipped pipeline's) decoded by `vae` (the
    GroupNorm decoder, `load_vae(groupnorm=True)`) and by `vae` with `tail`."""
    from ldm_tutorial.models import load_pipeline
    from ldm_tutorial.tinysd import evaluate as ev

    tail.eval()
    pipe = load_pipeline("tiny", verbose=False)          # generates; its U-Net needs no decoder
    sf = vae.config.scaling_factor
    ref, ref_parsed = ev.defect_reference()
    scenes32, gen_scenes = ev.defect_scenes(32), ev.defect_scenes(n_per_count)
    x = shapes.render(scenes32)
    z = vae.encode(x).latent_dist.mode()
    t0 = time.perf_counter()
    latents = ev.generation_latents(pipe, gen_scenes, n_per_count=n_per_count)
    log(f"generation: {time.perf_counter() - t0:.0f} s for {len(gen_scenes)} images")
    decoders = {"GroupNorm decoder": lambda lat: vae.decode(lat).sample,
                label: lambda lat: tail(decoder_features(vae, lat, STAGE))}
    rows, adherence = {}, {}
    for tag, d in decoders.items():
        def dec(lat):
            return torch.cat([d(lat[i:i + 64]).clamp(-1, 1) for i in range(0, len(lat), 64)])
        rows[f"VAE round trip, {tag}"] = defects.all_defects(dec(z), scenes32, inputs=x,
                                                             train_reference=ref, train_parsed=ref_parsed)
        rows[f"constant latents, {tag}"] = defects.all_defects(
            dec(z.mean((2, 3), keepdim=True).expand_as(z).contiguous()), train_reference=ref,
            train_parsed=ref_parsed)
        images = dec(latents / sf)
        rows[f"text-to-image, {tag}"] = defects.all_defects(images, gen_scenes, train_reference=ref,
                                                            train_parsed=ref_parsed)
        adherence[tag] = ev._adherence(images, gen_scenes, n_per_count)
    return {"n_per_count": n_per_count, "rows": rows, "adherence": adherence,
            "table": ev.defect_table(rows), "machine": {"cpu": ev.cpu_name(),
                                                        "threads": torch.get_num_threads()}}


FIXED_NORM_PREFIXES = ("decoder.up_blocks.2.", "decoder.up_blocks.3.", "decoder.conv_norm_out")


@torch.no_grad()
def export(vae, tail: Tail, root: Path) -> Path:
    """Write TinySD's VAE with `tail` in place of `vae`'s decoder tail into a weights root:
    root/tinysd/vae, a float16 FixedNormAutoencoderKL folder checked to decode as `tail` does (and
    root/tinysd/model_index.json naming it), and
    root/tinysd-vae-groupnorm/decoder_tail.safetensors, `vae`'s own GroupNorm tail (float16),
    which `tinysd.load_vae(groupnorm=True)` and vae_lab's shared variants start from."""
    from safetensors.torch import save_file
    from ldm_tutorial.tinysd import GROUPNORM_TAIL_FILE
    from ldm_tutorial.tinysd.fixed_norm import TAIL_PREFIXES, FixedNormAutoencoderKL
    from ldm_tutorial.tinysd.train import _save_fp16, write_model_index

    if type(vae).__name__ != "AutoencoderKL":
        raise TypeError(f"vae must be the GroupNorm AutoencoderKL the tail was trained on "
                        f"(load_vae(groupnorm=True)), got {type(vae).__name__}")

    cfg = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    model = FixedNormAutoencoderKL(**cfg, fixed_norm_prefixes=FIXED_NORM_PREFIXES)
    names = {"blocks.0.": "decoder.up_blocks.2.", "blocks.1.": "decoder.up_blocks.3.",
             "norm_out.": "decoder.conv_norm_out.", "conv_out.": "decoder.conv_out."}
    state = {k: v for k, v in vae.state_dict().items()
             if not k.startswith(tuple(names.values()))}
    for k, v in tail.state_dict().items():
        prefix = next(p for p in names if k.startswith(p))
        state[names[prefix] + k[len(prefix):]] = v
    model.load_state_dict(state, strict=True)
    model.eval()
    z = vae.encode(shapes.render(shapes.sample_scenes(4, seed=3))).latent_dist.mode()
    err = (model.decode(z).sample - tail.eval()(decoder_features(vae, z, STAGE))).abs().max()
    if err > 1e-4:
        raise RuntimeError(f"the exported decoder differs from the tail by {float(err):.2e}")
    _save_fp16(model, root / "tinysd" / "vae")   # as train.py ships every model: float16
    write_model_index(root / "tinysd")             # its vae entry names FixedNormAutoencoderKL
    gn = root / "tinysd-vae-groupnorm"
    gn.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in vae.state_dict().items()
               if k.startswith(TAIL_PREFIXES)}, str(gn / GROUPNORM_TAIL_FILE))
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--n-scenes", type=int, default=1200)
    ap.add_argument("--n-photos", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--norm", choices=("fixed", "group"), default="fixed",
                    help="fixed: GroupNorms frozen to per-channel affines; group: the shipped tail as is")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--eval-only", action="store_true",
                    help="score the checkpoint in --out with evaluate's defect rows and adherence")
    ap.add_argument("--export", type=Path, default=None,
                    help="--eval-only --norm fixed: write the VAE with this tail into this weights "
                         "root (ROOT/tinysd/vae and ROOT/tinysd-vae-groupnorm)")
    ap.add_argument("--tail", type=Path, default=None,
                    help="--eval-only: load the tail from this safetensors file (float16, as "
                         "benchmarks/fixed_norm_tail.safetensors) instead of --out/tail.pt")
    ap.add_argument("--n-per-count", type=int, default=96, help="--eval-only: prompts per count")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.steps < 0 or args.batch < 1 or args.eval_every < 1:
        ap.error("--steps must be >= 0, --batch and --eval-every >= 1")
    if args.export is not None and not (args.eval_only and args.norm == "fixed"):
        ap.error("--export needs --eval-only --norm fixed")
    if args.tail is not None and not args.tail.is_file():
        ap.error(f"--tail {args.tail} is not a file")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)

    vae = load_vae(groupnorm=True).requires_grad_(False)     # the GroupNorm decoder it replaces
    held = shapes.render(shapes.sample_scenes(64, seed=10002))
    held_feats = features(vae, held)
    const_feats = constant_features(vae, held)
    tail = Tail(vae)
    if args.eval_only:
        if args.norm == "fixed":          # the modules only: the checkpoint sets scale and shift
            freeze_norms(tail, held_feats[:16])
        if args.tail is not None:
            from safetensors.torch import load_file
            tail.load_state_dict({k: v.float() for k, v in load_file(str(args.tail)).items()})
        else:
            tail.load_state_dict(torch.load(args.out / "tail.pt")["tail"])
        if args.export is not None:
            print(f"exported to {export(vae, tail, args.export)}", flush=True)
            return 0
        res = full_eval(tail, vae, args.n_per_count,
                        label="frozen-norm decoder" if args.norm == "fixed" else "GroupNorm control tail")
        res["command"] = "python scripts/fixed_norm_tail.py " + " ".join(argv or sys.argv[1:])
        res["date"] = str(datetime.date.today())
        (args.out / "full_eval.json").write_text(json.dumps(res, indent=1))
        print("\n".join(res["table"]), "\n", json.dumps(res["adherence"]), flush=True)
        return 0
    t0 = time.time()
    train_imgs = torch.cat([shapes.render(shapes.sample_scenes(args.n_scenes, seed=1)),
                            data.random_photo_crops(data.load_photos("train"), args.n_photos,
                                                    torch.Generator().manual_seed(1))])
    train_feats = features(vae, train_imgs)
    print(f"features of {len(train_imgs)} training images in {time.time() - t0:.0f} s", flush=True)
    log = {"config": {k: str(v) for k, v in vars(args).items()}, "evals": []}
    log["evals"].append({"step": 0, "norm": "group", **score(tail, held_feats, held, const_feats)})
    if args.norm == "fixed":
        n = freeze_norms(tail, train_feats[:256])
        log["n_fixed_norms"] = n
        log["evals"].append({"step": 0, "norm": "fixed", **score(tail, held_feats, held, const_feats)})
    tail.requires_grad_(True)
    opt = torch.optim.Adam(tail.parameters(), lr=args.lr)
    step = 0
    ckpt = args.out / "tail.pt"
    if args.resume and ckpt.exists():
        state = torch.load(ckpt)
        tail.load_state_dict(state["tail"])
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
    print(json.dumps(log["evals"][-1]), flush=True)
    gen = torch.Generator().manual_seed(1000 + step)
    t0 = time.time()
    while step < args.steps:
        idx = torch.randint(len(train_feats), (args.batch,), generator=gen)
        out = tail(train_feats[idx].float())
        target = train_imgs[idx]
        loss = F.mse_loss(out, target) + 0.5 * F.l1_loss(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % args.eval_every == 0 or step == args.steps:
            row = {"step": step, "norm": args.norm, "loss": float(loss.detach()),
                   "s_per_step": (time.time() - t0) / args.eval_every,
                   **score(tail, held_feats, held, const_feats)}
            log["evals"].append(row)
            torch.save({"tail": tail.state_dict(), "opt": opt.state_dict(), "step": step, "log": log},
                       ckpt)
            (args.out / "log.json").write_text(json.dumps(log, indent=1))
            print(json.dumps(row), flush=True)
            t0 = time.time()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
