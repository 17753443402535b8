"""ldm_tutorial: the helper package of the ldm-tutorial book.

Chapters use it through one namespace: `import ldm_tutorial as ldm`. Importing it is cheap; models
are built only when a function is called. The `tinysd` subpackage is imported lazily by
`load_pipeline("tiny")`.
"""
from . import metrics, schedules
from .arch import (CONFIGS, FAMILY, JointAttentionWrittenOut, attention_matrix_bytes, attention_sites, attention_table,
                   build_on_meta, count_parameters, family_table, record_attention, sdxl_pipelines,
                   tiny_sd3_transformer, tiny_sdxl_components, tiny_sdxl_pipelines, tiny_sdxl_refiner_components)
from .models import REGISTRY, TASKS, ModelSpec, load_pipeline
from .plotting import overlay_heatmap, plot_curves, show_images
from .sampling import SampleOutput, sample
from .runtime import (RuntimeInfo, describe_runtime, hub_available, in_colab, pick_device, pick_dtype,
                      seed_everything)

__version__ = "0.1.0"


def __getattr__(name):
    # heavier modules load on first use: `ldm.vae_lab` builds on TinySD's data
    if name == "vae_lab":
        import importlib  # noqa: PLC0415

        return importlib.import_module(".vae_lab", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CONFIGS", "FAMILY", "REGISTRY", "TASKS", "JointAttentionWrittenOut", "ModelSpec", "RuntimeInfo",
    "attention_matrix_bytes", "attention_sites", "attention_table", "build_on_meta", "count_parameters",
    "describe_runtime", "family_table", "metrics", "hub_available", "in_colab", "load_pipeline", "overlay_heatmap",
    "pick_device", "pick_dtype", "plot_curves", "record_attention", "sample", "SampleOutput", "schedules",
    "sdxl_pipelines", "seed_everything",
    "show_images", "tiny_sd3_transformer", "tiny_sdxl_components", "tiny_sdxl_pipelines",
    "tiny_sdxl_refiner_components",
]
