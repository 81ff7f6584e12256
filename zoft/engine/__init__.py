"""The ZO engine: probes, probe batching over wrapped units, lazy seed-form updates, streaming."""
from zoft.engine.core import NO_DECAY, Objective, ZOEngine
from zoft.engine.offload import Meter, Offloader, Streaming
from zoft.engine.probes import Probe, Update

__all__ = ["NO_DECAY", "Meter", "Objective", "Offloader", "Probe", "Streaming", "Update", "ZOEngine"]
