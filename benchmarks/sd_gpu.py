"""The real SD 1.5 and SDXL U-Nets and VAEs on a CUDA GPU, built from their configs with random
weights (nothing is downloaded): step latency and peak memory, and achieved TFLOP/s against the
device's published dense bf16 peak (chapter 8, section 6).

    python benchmarks/sd_gpu.py                 # on a CUDA GPU: writes benchmarks/gpu.md and
                                                # ldm_tutorial/results/gpu.json
    python benchmarks/sd_gpu.py --tiny --out D  # anywhere: the same grid on tiny configs (a test)

The grid: image side 512 (SD 1.5) and 1024 (SDXL), batch 1 to 4, guidance on (the U-Net sees
2 x batch) and off, float16 and bfloat16, SDPA (`AttnProcessor2_0`) against the written-out
`AttnProcessor`, and `torch.compile` on one row per model. Last, `ldm.sample` against the
diffusers pipeline call on the same components (SD 1.5's U-Net and VAE, a CLIP-L-sized text
encoder, all random; TinySD's tokenizer), as a ratio.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ldm_tutorial import arch, perf  # noqa: E402

# tiny stand-ins with the same code paths (CPU test): diffusers-test-sized configs
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
                 attention_head_dim=2, cross_attention_dim=32, norm_num_groups=32,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
TINY_VAE = dict(block_out_channels=[32, 32], layers_per_block=1, latent_channels=4, norm_num_groups=32,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> dict:
    """Median and spread of `repeats` calls (after `warmup`), and the peak memory of one call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"median_s": statistics.median(seconds), "low_s": min(seconds), "high_s": max(seconds),
            "n": repeats, "peak_bytes": peak}


def build(kind: str, name: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """A U-Net or VAE with random weights: the named config of `arch.CONFIGS`, or a tiny one."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    if kind == "unet":
        config = TINY_UNET if tiny else arch.CONFIGS[name].config
        return UNet2DConditionModel.from_config(dict(config)).to(device, dtype).eval()
    config = TINY_VAE if tiny else arch.CONFIGS[name].config
    return AutoencoderKL.from_config(dict(config)).to(device, dtype).eval()


def unet_inputs(unet, batch: int, side: int, device, dtype) -> tuple[tuple, dict]:
    cfg = unet.config
    h = side // 8
    latents = torch.randn(batch, cfg.in_channels, h, h, device=device, dtype=dtype)          # (B, 4, h, w)
    kw = {"encoder_hidden_states": torch.randn(batch, 77, cfg.cross_attention_dim, device=device, dtype=dtype)}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
                                   "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * batch,
                                                            device=device, dtype=dtype)}
    return (latents, torch.full((batch,), 500, device=device)), kw


def step_flops(name: str, tiny: bool, batch: int, side: int) -> int:
    """FLOPs of one U-Net call, counted on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel

    if tiny:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(dict(TINY_UNET))
    else:
        unet = arch.build_on_meta(name)
    args, kw = unet_inputs(unet, batch, side, torch.device("meta"), torch.float32)
    return arch.forward_flops(unet, *args, **kw)


def grid(tiny: bool, device: torch.device, repeats: int, batches=(1, 2, 3, 4), compile_: bool = True) -> dict:
    models = [("sd15", "sd15-unet", "sd-vae", 64 if tiny else 512),
              ("sdxl", "sdxl-base-unet", "sdxl-vae", 64 if tiny else 1024)]
    dtypes = [torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    peak = perf.PEAKS_BF16_DENSE.get(gpu_key(device)) if device.type == "cuda" else None
    rows, decode_rows = [], []
    for model, unet_name, vae_name, side in models:
        for dtype in dtypes:
            unet = build("unet", unet_name, tiny, device, dtype)
            for attention in ("sdpa", "math"):
                perf.set_attention(unet, attention)
                for batch in batches:
                    for guidance in (True, False):
                        b = 2 * batch if guidance else batch
                        args, kw = unet_inputs(unet, b, side, device, dtype)
                        with torch.no_grad():
                            t = timed(lambda: unet(*args, **kw), device, repeats)
                        flops = step_flops(unet_name, tiny, b, side)
                        rows.append({"model": model, "side": side, "dtype": str(dtype).removeprefix("torch."),
                                     "attention": attention, "batch": batch, "guidance": guidance,
                                     "compiled": False, **t, "tflops": flops / 1e12,
                                     "achieved_tflop_s": flops / t["median_s"] / 1e12,
                                     "share_of_peak": flops / t["median_s"] / peak if peak else None})
            perf.set_attention(unet, "sdpa")
            if compile_:
                compiled = torch.compile(unet)
                args, kw = unet_inputs(unet, 2, side, device, dtype)
                t0 = time.perf_counter()
                with torch.no_grad():
                    compiled(*args, **kw)
                _sync(device)
                compile_s = time.perf_counter() - t0
                with torch.no_grad():
                    t = timed(lambda: compiled(*args, **kw), device, repeats)
                flops = step_flops(unet_name, tiny, 2, side)
                rows.append({"model": model, "side": side, "dtype": str(dtype).removeprefix("torch."),
                             "attention": "sdpa", "batch": 1, "guidance": True, "compiled": True,
                             "compile_s": compile_s, **t, "tflops": flops / 1e12,
                             "achieved_tflop_s": flops / t["median_s"] / 1e12,
                             "share_of_peak": flops / t["median_s"] / peak if peak else None})
            del unet
            vae = build("vae", vae_name, tiny, device, dtype)
            z = torch.randn(1, 4, side // 8 if not tiny else side // 2, side // 8 if not tiny else side // 2,
                            device=device, dtype=dtype)
            with torch.no_grad():
                t = timed(lambda: vae.decode(z).sample, device, repeats)
            decode_rows.append({"model": model, "side": side, "dtype": str(dtype).removeprefix("torch."), **t})
            del vae
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows, "decode_rows": decode_rows}


def gpu_key(device: torch.device) -> str | None:
    """The `perf.PEAKS_BF16_DENSE` entry for this GPU (H100 SXM, A100), None for others."""
    name = torch.cuda.get_device_name(device)
    if "H100" in name and ("SXM" in name or "HBM3" in name):
        return "H100 SXM"
    if "A100" in name:
        return "A100"
    return None


def sample_vs_pipeline(tiny: bool, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """`ldm.sample` against `StableDiffusionPipeline.__call__` on the same random components."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_tutorial.tinysd import load_text_encoder

    _, tokenizer = load_text_encoder()
    unet = build("unet", "sd15-unet", tiny, device, dtype)
    vae = build("vae", "sd-vae", tiny, device, dtype)
    width = unet.config.cross_attention_dim
    text_cfg = {**arch.CLIP_L_TEXT, "hidden_size": width} if not tiny else dict(
        hidden_size=width, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
        max_position_embeddings=77, vocab_size=1000)
    text_cfg.pop("projection_dim", None)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg)).to(device, dtype).eval()
    scheduler = DDIMScheduler.from_config(arch.SD15_SCHEDULER)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    r = perf.sample_vs_pipeline(pipe, "a red circle", num_inference_steps=4 if tiny else 25, repeats=repeats)
    return r


def markdown(res: dict) -> str:
    lines = ["# SD 1.5 and SDXL on a GPU (random weights, configs from ldm_tutorial/arch.py)", "",
             f"Written by `benchmarks/sd_gpu.py`. {res['device']}; driver {res['driver']}; torch {res['torch']}, "
             f"diffusers {res['diffusers']}, CUDA {res['cuda']}; date {res['date']}. Medians of {res['repeats']} "
             "calls after 2 warm-up calls; peak memory is `torch.cuda.max_memory_allocated`.", "",
             "| model | side | dtype | attention | batch | guidance | compiled | ms (min-max) | peak GiB | TFLOP | "
             "TFLOP/s | share of peak |", "|---|---:|---|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        peak = f"{r['peak_bytes'] / 2**30:.2f}" if r["peak_bytes"] is not None else "-"
        share = f"{r['share_of_peak']:.1%}" if r["share_of_peak"] is not None else "-"
        lines.append(f"| {r['model']} | {r['side']} | {r['dtype']} | {r['attention']} | {r['batch']} | "
                     f"{r['guidance']} | {r['compiled']} | {1e3 * r['median_s']:.1f} ({1e3 * r['low_s']:.1f}-"
                     f"{1e3 * r['high_s']:.1f}) | {peak} | {r['tflops']:.2f} | {r['achieved_tflop_s']:.1f} | {share} |")
    lines += ["", "| VAE decode | side | dtype | ms |", "|---|---:|---|---:|"]
    for r in res["decode_rows"]:
        lines.append(f"| {r['model']} | {r['side']} | {r['dtype']} | {1e3 * r['median_s']:.1f} |")
    s = res["sample_vs_pipeline"]
    lines += ["", f"`ldm.sample` against the pipeline call (SD 1.5 components, {s['steps']} steps): ratio "
              f"pipeline/ours {s['ratio_pipeline_over_ours']:.3f} (at least 0.97 required), max pixel difference "
              f"{s['max_pixel_difference']:.2e}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    import diffusers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny configs (a test that runs on the CPU)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=None, help="folder for gpu.md and gpu.json (default: the repository's)")
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not a.tiny:
        sys.exit("no CUDA GPU: run with --tiny for the CPU test; benchmarks/gpu.md is written on a GPU only")
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
           "driver": _driver() if device.type == "cuda" else None, "torch": torch.__version__,
           "diffusers": diffusers.__version__, "cuda": torch.version.cuda,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "repeats": a.repeats, "tiny": a.tiny}
    res.update(grid(a.tiny, device, a.repeats, batches=(1, 2) if a.tiny else (1, 2, 3, 4),
                    compile_=not a.no_compile))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    res["sample_vs_pipeline"] = sample_vs_pipeline(a.tiny, device, dtype, a.repeats)
    md_dir = a.out or REPO / "benchmarks"
    json_path = (a.out / "gpu.json") if a.out else REPO / "ldm_tutorial" / "results" / "gpu.json"
    md_dir.mkdir(parents=True, exist_ok=True)
    (md_dir / "gpu.md").write_text(markdown(res))
    json_path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {md_dir / 'gpu.md'} and {json_path}")
    return res


def _driver() -> str:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
