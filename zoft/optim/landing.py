"""Directions that read per-parameter optimizer state: wait until that state is current.

A probe direction that depends on a parameter's state (HiZOO's diagonal Hessian, MeZO-SVRG's
offset to the anchor) must see the state *after* the previous step's update, which the engine
applies lazily, unit by unit, inside the forward pass. The engine draws a unit's first direction
on a worker thread while the main thread applies the pending update to that unit, so the draw of
key k waits here until the update of key k has landed.

``KeyClock`` counts the stateful updates handed out (``hand_out``) and, per key, those applied
(``land``, called by the update's ``apply`` once the key's state is written). ``wait(key, need)``
blocks until key has absorbed ``need`` updates; the optimizer takes ``need`` = the number handed
out when it builds a step's probes, so a draw never waits for an update that is not pending. An
``apply`` that raises calls ``fail(key)``: the waiting draw then raises too instead of waiting.
"""
from __future__ import annotations

import threading
from typing import Any

from zoft.engine.probes import Update

# seconds a draw waits for the update of its key: the main thread applies one unit's update in
# that time unless something went wrong (then the draw stops with an error instead of hanging)
WAIT_S = 600.0


class KeyClock:
    def __init__(self, handed: int = 0):
        self._cv = threading.Condition()
        self.reset(handed)

    def reset(self, handed: int) -> None:
        """Every key current after ``handed`` updates (a fresh or resumed optimizer, between steps)."""
        with self._cv:
            self.handed = handed
            self._base = handed
            self._landed: dict[str, int] = {}
            self._failed: set[str] = set()

    def hand_out(self) -> None:
        with self._cv:
            self.handed += 1

    def land(self, key: str) -> None:
        with self._cv:
            self._landed[key] = self._landed.get(key, self._base) + 1
            self._cv.notify_all()

    def fail(self, key: str) -> None:
        with self._cv:
            self._failed.add(key)
            self._cv.notify_all()

    def wait(self, key: str, need: int) -> None:
        with self._cv:
            if not self._cv.wait_for(lambda: self._landed.get(key, self._base) >= need or key in self._failed,
                                     timeout=WAIT_S):
                raise RuntimeError(f"the state of '{key}' did not receive update {need} within {WAIT_S:.0f} s "
                                   "(the pending update was not applied)")
            if key in self._failed and self._landed.get(key, self._base) < need:
                raise RuntimeError(f"the update of '{key}' failed, so its next direction cannot be drawn")


class LandingUpdate(Update):
    """An update that also advances per-key state the next directions read: ``_apply`` does the
    work, ``apply`` then marks the key landed on ``opt.clock`` (or failed, if ``_apply`` raised).
    Never a no-op: the state advances even when the step is 0."""

    opt: Any

    def is_noop(self) -> bool:
        return False

    def apply(self, key, w, noise, decays):
        try:
            self._apply(key, w, noise, decays)
        except BaseException:
            self.opt.clock.fail(key)  # a draw waiting for this key raises instead of waiting
            raise
        self.opt.clock.land(key)

    def _apply(self, key: str, w: Any, noise: Any, decays: bool) -> None:
        raise NotImplementedError
