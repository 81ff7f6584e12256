"""zoft: memory-constrained zeroth-order fine-tuning of large language models.

Top-level API (imported lazily, so ``import zoft.errors`` stays cheap)::

    from zoft import TrainConfig, finetune, replay, load_model
"""

__version__ = "0.1.0"

_API = {
    "TrainConfig": "zoft.config",
    "finetune": "zoft.train",
    "replay": "zoft.train",
    "RunResult": "zoft.train",
    "load_model": "zoft.models",
    "ZOEngine": "zoft.engine",
}


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'zoft' has no attribute {name!r}")


__all__ = list(_API)
