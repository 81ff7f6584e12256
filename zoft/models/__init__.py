"""Model knowledge: the unit layout of Hugging Face models and loading by alias/path/hub id."""
from zoft.models.layout import Layout, Unit, discover_layout
from zoft.models.loading import (
    DTYPES,
    LoadedModel,
    aliases,
    build_random,
    checkpoint_dtype,
    configs_dir,
    load_model,
    model_kind,
    parse_dtype,
    resolve,
)

__all__ = [
    "DTYPES", "Layout", "LoadedModel", "Unit", "aliases", "build_random", "checkpoint_dtype", "configs_dir",
    "discover_layout", "load_model", "model_kind", "parse_dtype", "resolve",
]
