"""Directions that read per-parameter optimizer state: drawn only once that state is current.

A probe direction that depends on a parameter's state (HiZOO's diagonal Hessian, MeZO-SVRG's
offset to the anchor, Sparse MeZO's re-derived mask) must see the state *after* the previous
step's update, which the engine applies lazily inside the forward pass: a module's pre-hook applies
the pending update to its parameters, then builds their perturbed copies, on the one thread that
runs the forward. So the engine's own order draws a key's direction after its update.

``KeyClock`` checks that order. It counts the stateful updates handed out (``hand_out``) and, per
key, those applied (``land``, called by the update's ``apply`` once the key's state is written);
``check(key, need)`` raises unless key has absorbed ``need`` updates. The optimizer takes ``need``
= the number handed out when it builds a step's probes, so a direction drawn from stale state (before
its key's pending update) is an error at once, never a wrong direction. An ``apply`` that raises
calls ``fail(key)``: the check of that key then says so.
"""
from __future__ import annotations

from typing import Any

from zoft.engine.probes import Update


class KeyClock:
    def __init__(self, handed: int = 0):
        self.reset(handed)

    def reset(self, handed: int) -> None:
        """Every key current after ``handed`` updates (a fresh or resumed optimizer, between steps)."""
        self.handed = handed
        self._base = handed
        self._landed: dict[str, int] = {}
        self._failed: set[str] = set()

    def hand_out(self) -> None:
        self.handed += 1

    def land(self, key: str) -> None:
        self._landed[key] = self._landed.get(key, self._base) + 1

    def fail(self, key: str) -> None:
        self._failed.add(key)

    def check(self, key: str, need: int) -> None:
        """Raise ``RuntimeError`` unless the state of ``key`` has absorbed ``need`` updates."""
        if self._landed.get(key, self._base) >= need:
            return
        if key in self._failed:
            raise RuntimeError(f"the update of '{key}' failed, so its next direction cannot be drawn")
        raise RuntimeError(f"the direction of '{key}' was drawn before update {need} of its state was applied "
                           "(it would read stale state)")


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
            self.opt.clock.fail(key)  # the next check of this key names the failed update
            raise
        self.opt.clock.land(key)

    def _apply(self, key: str, w: Any, noise: Any, decays: bool) -> None:
        raise NotImplementedError
