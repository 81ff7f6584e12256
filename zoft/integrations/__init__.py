"""zoft inside the trainers people already run: ``transformers.Trainer`` and TRL's ``SFTTrainer``.

    from zoft.integrations import ZOTrainer      # transformers.Trainer, ZO steps
    from zoft.integrations import ZOSFTTrainer   # trl.SFTTrainer, ZO steps (needs zoft[hf])

Imported lazily, so ``import zoft.integrations`` needs neither ``trl`` nor ``accelerate``.
"""

_API = {
    "ZOTrainer": "zoft.integrations.trainer",
    "ZOOptimizer": "zoft.integrations.trainer",
    "ZOSFTTrainer": "zoft.integrations.sft",
}


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'zoft.integrations' has no attribute {name!r}")


__all__ = list(_API)
