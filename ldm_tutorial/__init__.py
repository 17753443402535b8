"""ldm_tutorial: the helper package of the ldm-tutorial book.

Chapters use it through one namespace: `import ldm_tutorial as ldm`. Importing it is cheap; models
are built only when a function is called. The `tinysd` subpackage is imported lazily by
`load_pipeline("tiny")`.
"""
from . import metrics, results, schedules, vae_lab
from . import guidance
from . import attention
from . import editing
from .editing import img2img, inpaint
from . import inversion
from .inversion import invert, slerp
from . import perf
from .arch import (CONFIGS, FAMILY, JointAttentionWrittenOut, attention_matrix_bytes, attention_sites, attention_table,
                   build_on_meta, count_parameters, family_table, record_attention, sdxl_pipelines,
                   tiny_sd3_transformer, tiny_sdxl_components, tiny_sdxl_pipelines, tiny_sdxl_refiner_components)
from .latents import LatentHealth, check_latent_health
from .models import REGISTRY, TASKS, ModelSpec, load_pipeline
from .plotting import overlay_heatmap, plot_curves, show_images, slider_html
from .sampling import SampleOutput, flux_sigmas, sample, sigmas_for
from . import signal_leak
from .signal_leak import SignalLeak, fit_signal_leak, signal_leak_latents
from .runtime import (RuntimeInfo, describe_runtime, hub_available, in_colab, pick_device, pick_dtype,
                      seed_everything)

__version__ = "0.1.0"


__all__ = [
    "CONFIGS", "FAMILY", "REGISTRY", "TASKS", "JointAttentionWrittenOut", "ModelSpec", "RuntimeInfo",
    "attention_matrix_bytes", "attention_sites", "attention_table", "build_on_meta", "count_parameters",
    "check_latent_health", "LatentHealth",
    "guidance",
    "attention",
    "editing", "img2img", "inpaint",
    "inversion", "invert", "slerp",
    "perf",
    "describe_runtime", "family_table", "metrics", "results", "vae_lab", "hub_available", "in_colab", "load_pipeline", "overlay_heatmap",
    "pick_device", "pick_dtype", "plot_curves", "record_attention", "sample", "flux_sigmas", "sigmas_for", "SampleOutput", "schedules",
    "sdxl_pipelines", "seed_everything", "signal_leak", "SignalLeak", "fit_signal_leak", "signal_leak_latents",
    "show_images", "slider_html", "tiny_sd3_transformer", "tiny_sdxl_components", "tiny_sdxl_pipelines",
    "tiny_sdxl_refiner_components",
]
