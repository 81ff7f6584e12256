"""The ZO engine: probes, probe batching over wrapped units, lazy seed-form updates."""
from zoft.engine.core import NO_DECAY, Objective, ZOEngine
from zoft.engine.probes import Probe, Update

__all__ = ["NO_DECAY", "Objective", "Probe", "Update", "ZOEngine"]
