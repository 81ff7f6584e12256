"""The zeroth-order engine: probe batching through the model's own ``forward``.

Every unit of the layout (``zoft.models.discover_layout``) and every *leaf* of a unit (a module
owning parameters directly: ``zoft.models.layout.leaves``) gets a forward pre-hook and a forward
hook (PyTorch's public hook API; the model's modules, names and ``forward`` stay untouched). A
step runs the model once on the P probes' rows (probe-major). While it is active the pre-hook of
a perturbed module (a leaf; a whole unit on the unit path):

1. applies the pending update of the previous step to its parameters (lazily: each parameter
   once, tied ones included),
2. leaves the weights ``w0`` where they are and, for each probe's row segment but the first,
   writes ``w0 + scale_p * z_p`` into scratch, points ``p.data`` at it and calls
   ``module.forward`` on that segment's rows,
3. does the same for the first segment and lets the regular call run on its rows;

the forward hook then points ``p.data`` back at ``w0`` (never written during the probes, so the
restore is exact and costs no pass over the weights) and concatenates the outputs. Parameter-free
work between leaves (attention, activations) runs once on all rows, one leaf holds a perturbed
copy at a time, and each streamed unit (a block or a group of its leaves) is in a device slot
from its first module's call to its last module's.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from zoft.engine.offload import Meter, Offloader, tensor_bytes
from zoft.engine.precision import apply_update_, perturb_bytes, perturb_z_mode, update_bytes, z_mode
from zoft.engine.probes import Probe, Update, combine_outputs, is_split, repeat_rows, split_args
from zoft.errors import UsageError
from zoft.models.layout import Layout, call_order, discover_layout, leaves, pack_groups, unit_path
from zoft.models.quant import keep_canonical_layout
from zoft.noise import NoiseBackend, key_hash, make_noise, mix

# MeZO skips weight decay for names containing "bias", "layer_norm", "layernorm"; "norm" and
# "ln_" cover those and the other families' norms (model.norm, ln_f, input_layernorm, ...).
NO_DECAY = ("bias", "norm", "ln_")


class Objective(Protocol):
    """What ``ZOEngine.evaluate`` needs: any ``zoft.tasks`` task, or a custom objective."""

    def forward(self, model: nn.Module, batch: Any) -> Any:
        """Run ``model`` on ``batch`` (already repeated P times) and return its outputs."""
        ...

    def loss(self, outputs: Any, batch: Any, num_probes: int) -> torch.Tensor:
        """One scalar per probe, shape (P,)."""
        ...


@dataclass
class _Residency:
    """Per-call state of one perturbed module (a leaf, or a unit on the unit path) while it runs
    its row segments."""

    params: list[tuple[str, nn.Parameter]]
    segs: list[tuple[int, int, int]]  # (probe, first row, rows) of this call, in row order
    w0: dict[str, torch.Tensor] = field(default_factory=dict)  # the unperturbed storage of each p
    outputs: dict[int, Any] = field(default_factory=dict)  # segment index -> its output
    was_split: bool = True
    in_bytes: int = 0  # the whole call's inputs (for the device-bytes meter)
    out: torch.Tensor | None = None  # an ``nn.Linear``'s output, every segment written in place


@dataclass
class _Held:
    """A streamed unit (block or group) between its acquire and its release."""

    s: Any  # ``zoft.engine.offload._Streamed``
    write: bool | None = False  # ``Offloader.release``'s ``write``: nothing changed yet
    todo: bool = False  # the pending update had keys of this unit left to apply at acquire


class ZOEngine:
    """Runs P perturbed evaluations of a model in one forward pass and applies seed-form updates.

    model:    an unmodified Hugging Face model (kept in eval mode; ``use_cache`` must be off).
    noise:    the keyed noise backend (default: per-tensor ``torch.Generator``, Gaussian).
    no_decay: substrings of parameter names that take no weight decay.

    offload:  a ``zoft.engine.offload.Streaming`` placement (device, resident blocks, prefetch,
              codec, streaming groups): streamed blocks live in CPU memory and pass through device
              slots; the results are those of the resident engine (``tests/test_offload.py``).
    granularity: ``"param"`` (default): one leaf module (a Linear, a norm, an embedding) holds a
              perturbed copy at a time, and parameter-free work runs once on all probes' rows;
              units that cannot be read leaf by leaf (``zoft.models.layout.unit_path``) and
              ``"unit"`` perturb a whole unit for each probe's call (today's reference path).

    Trainable parameters are those with ``requires_grad`` (floating point); the rest are never
    perturbed nor written. ``close()`` removes the hooks; the model is then exactly the plain model.
    """

    def __init__(self, model: nn.Module, noise: NoiseBackend | None = None,
                 no_decay: Sequence[str] = NO_DECAY, layout: Layout | None = None,
                 offload: Any = None, micro_batch: int | None = None, granularity: str = "param"):
        if granularity not in ("param", "unit"):
            raise UsageError(f"granularity must be 'param' or 'unit', not '{granularity}'")
        self.model = model
        keep_canonical_layout(model)  # bitsandbytes 4-bit layers: one layout on every CPU, before any view
        self.layout = layout or discover_layout(model)
        self.noise = noise or make_noise()
        self.meter = Meter()  # bytes on the device that the engine and the scheduler own
        # examples per probe that a block runs at once (None: the probe's whole slice); the
        # planner's choice under a budget. Each block is still loaded once per step.
        self.micro_batch = micro_batch or (offload.micro_batch if offload is not None else None)
        # units perturbed leaf by leaf -> their leaves (call order for blocks, for streaming groups)
        self._leaves: dict[int, list[nn.Module]] = {}
        if granularity == "param":
            for u in self.layout.units:
                found = leaves(u.module)
                if not unit_path(model, u) and [m for _, m in found] != [u.module]:  # (a leaf itself: alike)
                    self._leaves[id(u.module)] = [m for _, m in found]
        groups = None
        if offload is not None and getattr(offload, "group_bytes", None) is not None:
            if self.micro_batch:
                raise UsageError("streaming groups and micro-batches do not combine (a micro-batched block runs "
                                 "its chunks one after another and needs all of its groups each time): drop one")
            groups = {}
            for u in self.layout.blocks[offload.resident_blocks:]:
                if id(u.module) in self._leaves:
                    order = self._leaves[id(u.module)] = call_order(model, u.module)
                    groups[id(u.module)] = pack_groups(order, offload.group_bytes)
        self.offload: Offloader | None = None
        if offload is not None:
            self.offload = Offloader(model, self.layout, offload.device, resident_blocks=offload.resident_blocks,
                                     prefetch=offload.prefetch, transfer=offload.transfer, meter=self.meter,
                                     writeback_every=offload.writeback_every, groups=groups)
        self._held: dict[int, _Held] = {}  # streamed index -> the acquired unit
        # deferred write-back: the updates set so far are versions 1..V; a streamed unit's master is
        # at some version s and the updates s+1.. (update, rounding key) are re-applied after upload
        self._version = 0
        self._log: dict[int, tuple[Update, int]] = {}
        self._flushing = False
        self._partial: set[int] = set()  # streamed units written back holding part of the pending update
        self._paused = False
        self._streamed_keys = {k for s in self.offload.streamed for k, _ in s.params} if self.offload else set()
        self._blocks = {id(u.module) for u in self.layout.blocks}
        self.no_decay = tuple(no_decay)
        self._probes: list[Probe] | None = None
        self._segs: list[tuple[int, int, int]] = []  # the rows of the running call: (probe, first, rows)
        self._rows = 0  # rows of the running call
        self._fan_out: int | None = None  # feature reuse: id of the unit not yet reached (``evaluate``)
        self._pending: Update | None = None
        self._applied: set[str] = set()
        self._live: dict[int, _Residency] = {}
        self._chunked: dict[int, tuple[list[tuple[int, int, int]], dict[int, Any], bool]] = {}
        self._leaf_unit: dict[int, nn.Module] = {}  # leaf -> the unit module holding it
        self._names: dict[int, str] = {}  # perturbed module -> its path (error messages)
        for u in self.layout.units:
            self._names[id(u.module)] = u.name
            for name, m in leaves(u.module) or []:
                self._leaf_unit[id(m)] = u.module
                self._names[id(m)] = f"{u.name}.{name}" if name else u.name
        # perturbation scratch, one flat buffer per (dtype, device), grown to the largest perturbed
        # module (a leaf; a unit on the unit path) and reused by every one of them
        self._arena: dict[tuple, torch.Tensor] = {}
        self._scalars: dict[tuple, torch.Tensor] = {}  # (dtype, device) -> a 0-dim tensor (``z_like``)
        self._live_in = 0  # bytes of the running module's inputs (the meter's view during an update)
        self.refresh_trainable()
        self._handles = []
        for u in self.layout.units:
            self._handles.append(u.module.register_forward_pre_hook(self._unit_pre, with_kwargs=True))
            self._handles.append(u.module.register_forward_hook(self._unit_post, with_kwargs=True))
            for m in self._leaves.get(id(u.module), []):
                self._handles.append(m.register_forward_pre_hook(self._leaf_pre, with_kwargs=True))
                self._handles.append(m.register_forward_hook(self._leaf_post, with_kwargs=True))

    # -- parameters -----------------------------------------------------------------------
    def refresh_trainable(self) -> None:
        """Re-read which parameters are trainable (``requires_grad``), e.g. after adding adapters."""
        if getattr(self, "offload", None) is not None and any(
                s.version > s.master_version for s in self.offload.streamed):
            self.flush()  # masters current before the set of re-applied keys changes
        self.params: dict[str, nn.Parameter] = {}
        for u in self.layout.units:
            for k, p in u.params:
                if p.requires_grad and p.dtype.is_floating_point:
                    self.params[k] = p
        self.decays = {k: not any(s in k.lower() for s in self.no_decay) for k in self.params}
        # each perturbed module's trainable (key, parameter) pairs, a key once: read by every hook
        # call (units on the unit path; the leaves of the others)
        key = {id(p): k for k, p in self.params.items()}
        self._site_params: dict[int, list[tuple[str, nn.Parameter]]] = {}
        for u in self.layout.units:
            for m in self._leaves.get(id(u.module), [u.module]):
                ps = m.parameters(recurse=m is u.module)
                self._site_params[id(m)] = list(dict((key[id(p)], p) for p in ps if id(p) in key).items())
        if getattr(self, "offload", None) is not None:
            self.offload.refresh_trainable()

    # -- pending update -------------------------------------------------------------------
    @property
    def pending(self) -> Update | None:
        return self._pending

    def set_update(self, update: Update | None) -> None:
        """Queue ``update``; it is applied lazily as units next run, or by ``flush()``."""
        self._apply_all_pending()
        self._pending = None if update is None or update.is_noop() else update
        self._applied = set()
        if self._pending is not None:  # stochastic rounding is keyed by the whole update (seeds,
            # coefficients, decay) and the parameter: replay rounds identically, steps differ
            self._sround_seed = key_hash(repr((self._pending.terms, self._pending.decay)))
            if self.offload is not None:
                self._version += 1
                self._log[self._version] = (self._pending, self._sround_seed)
                oldest = min((s.master_version for s in self.offload.streamed if s.trainable), default=self._version)
                for v in [v for v in self._log if v <= oldest]:
                    del self._log[v]

    def _apply_pending(self, key: str, p: nn.Parameter) -> None:
        if self._pending is None or key in self._applied:
            return
        # a stateful optimizer's buffers (momentum, Adam moments) come to the parameter's device
        # on first use (a resumed run loads them on the host); those of a streamed unit live on
        # the host between steps and come to the device only while the unit is there
        store = getattr(self._pending, "store", None)
        if store:
            self._move_state(store, key, p.device)
        self._apply_update(self._pending, self._sround_seed, key, p)
        if store and key in self._streamed_keys:
            self._move_state(store, key, torch.device("cpu"))
        self._applied.add(key)

    def _apply_update(self, update: Update, sround_seed: int, key: str, p: nn.Parameter) -> None:
        # transients of the update, for the meter (``update_bytes``; the planner counts the same)
        mode = z_mode(update, self.noise, p)
        self.meter.observe(self._live_in + update_bytes(p.numel(), p.element_size(), mode))
        with torch.no_grad():  # low precision: in fp32 pieces, stochastically rounded back
            apply_update_(update, key, p.data, self.noise, self.decays[key], mix(sround_seed, key + "/sround"))

    def _acquire(self, s: Any) -> _Held:
        """Bring streamed unit ``s`` (a block or a group) into a slot and up to date with the
        updates its master has not absorbed (deferred write-back): each re-applied update is the
        same ``apply`` with the same rounding key as when it was first applied, so the weights
        equal the resident engine's bit for bit. The pending update is applied later, a parameter
        at its module's first call, and whatever is left of it at ``_release_unit``."""
        self.offload.acquire(s)  # weights now in a device slot (its master's version)
        h = self._held[s.index] = _Held(s)
        keys = [k for k, _ in s.params if k in self.params]
        h.todo = self._pending is not None and any(k not in self._applied for k in keys)
        behind = range(s.master_version + 1, s.version + 1)
        for v in behind:  # an exception here leaves ``write`` False: the half-updated slot is dropped
            update, sround_seed = self._log[v]
            for k, p in s.params:
                if k in self.params:
                    self._apply_update(update, sround_seed, k, p)
        if behind and keys:
            h.write = True
        return h

    def _apply_pending_held(self, params: list[tuple[str, nn.Parameter]], h: _Held | None) -> None:
        if h is not None and any(self._pending is not None and k not in self._applied for k, _ in params):
            h.write = True  # a partially applied pending update reaches the master with its keys
        for k, p in params:
            self._apply_pending(k, p)

    def _release_unit(self, h: _Held) -> None:
        """Finish the pending update on ``h``'s unit (parameters whose module was not called), then
        release it: written back now, never, or once ``writeback_every`` updates ahead."""
        s = h.s
        del self._held[s.index]
        params = [(k, p) for k, p in s.params if k in self.params]
        try:
            self._apply_pending_held(params, h)
        finally:
            done = self._pending is None or all(k in self._applied for k, _ in params)
            # a master holding part of the pending update (an earlier residency raised) cannot be
            # caught up by re-applying it: the residency that completes it writes back too
            partial = s.index in self._partial
            if h.todo and done:
                s.version = self._version
                self._partial.discard(s.index)
            elif h.write is True and not done:
                self._partial.add(s.index)
            if h.write and done and not (self._flushing or partial) and all(
                    type(self._log[v][0]).apply is Update.apply for v in range(s.master_version + 1, s.version + 1)):
                h.write = None  # seed-form updates only: the write-back may wait (``writeback_every``)
            self.offload.release(s, h.write)

    def _move_state(self, store: dict[str, dict[str, torch.Tensor]], key: str, device: torch.device) -> None:
        for bufs in store.values():
            t = bufs.get(key)
            if t is not None and t.device != device:
                # no host synchronisation: device -> host lands in page-locked memory (what
                # ``non_blocking`` allocates), host -> device reads it back in stream order; the
                # host reads these buffers only after ``flush`` (checkpoints)
                bufs[key] = t.to(device, non_blocking=True)
                if self.offload is None:  # a resident engine bringing resumed state to its device
                    continue
                nbytes = t.numel() * t.element_size()
                if device.type == "cpu":
                    self.offload.stats.writeback_bytes += nbytes
                else:
                    self.offload.stats.upload_bytes += nbytes

    def _visit(self, s: Any) -> None:
        """Stream unit ``s`` in and out outside a forward: catch up, apply the pending update."""
        self._release_unit(self._acquire(s))

    def _apply_all_pending(self) -> None:
        self._live_in = 0
        if self._pending is not None:
            if self.offload is not None:  # stream the units the last pass did not reach
                for s in self.offload.streamed:
                    if any(k in self.params and k not in self._applied for k, _ in s.params):
                        self._visit(s)
            for k, p in self.params.items():
                self._apply_pending(k, p)
        self._pending = None
        self._applied = set()

    def flush(self) -> None:
        """Apply whatever is left of the pending update to every parameter, write every streamed
        unit that is ahead of its master back to it (deferred write-back) and wait for every
        transfer: the model's weights (streamed ones in their CPU masters) are then final
        (before eval, save, first-order steps and exit)."""
        if self.offload is None:
            self._apply_all_pending()
            return
        self._flushing = True
        try:
            self._apply_all_pending()
            for s in self.offload.streamed:
                if s.version > s.master_version:
                    self._visit(s)
        finally:
            self._flushing = False
        self.offload.synchronize()

    # -- probes ---------------------------------------------------------------------------
    def _perturb(self, res: _Residency, probe: Probe) -> None:
        """Point the module's parameters at ``w0 + scale * z(seed)`` (scratch), or at ``w0``."""
        if probe.seed is None or probe.scale == 0.0:
            for k, p in res.params:
                p.data = res.w0[k]
            return
        bufs = self._views(res.params)
        # live beside each parameter's z: the call's inputs and the segment outputs made so far
        live = res.in_bytes + tensor_bytes(res.out) + tensor_bytes(list(res.outputs.values()))
        for k, p in res.params:  # one pass: read w0, make z piece by piece (or in registers), write
            w0 = res.w0[k]
            # the transient of making the copy (z's piece, or all of it, and its cast; bytes):
            # ``perturb_bytes``, which the planner counts in its perturbation scratch too
            self.meter.observe(live + perturb_bytes(w0.numel(), w0.element_size(),
                                                    perturb_z_mode(self.noise, w0, probe.seed)))
            self.noise.perturb_into(bufs[k], w0, probe.seed, k, probe.scale)
            p.data = bufs[k]

    def _views(self, params: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
        """Per parameter, a view of the engine's scratch with its shape and dtype for its perturbed
        copy. One flat buffer per (dtype, device), grown to the largest perturbed module and never
        shrunk: scratch is one such module's worth (a leaf, or a unit on the unit path), counted
        by the meter (the backend's z pieces are a transient ``_perturb`` observes)."""
        need: dict[tuple, int] = {}
        for _, p in params:
            need[(p.dtype, p.data.device)] = need.get((p.dtype, p.data.device), 0) + p.numel()
        for key, n in need.items():
            arena = self._arena.get(key)
            if arena is None or arena.numel() < n:
                if arena is not None:
                    self.meter.free(arena.numel() * arena.element_size(), "scratch")
                arena = self._arena[key] = torch.empty(n, dtype=key[0], device=key[1])
                self.meter.alloc(n * arena.element_size(), "scratch")
        pos = dict.fromkeys(need, 0)
        out = {}
        for k, p in params:
            key, n = (p.dtype, p.data.device), p.numel()
            out[k] = self._arena[key][pos[key]:pos[key] + n].view(p.shape)
            pos[key] += n
        return out

    @property
    def compute_device(self) -> torch.device:
        """Where the engine draws z and computes: the streaming device, else the first
        trainable parameter's (the model's) device."""
        if self.offload is not None:
            return self.offload.device
        p = next(iter(self.params.values()), None)
        p = p if p is not None else next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def z_like(self) -> dict[str, torch.Tensor]:
        """Per trainable key, a stand-in for the parameter that holds no memory (an expanded
        scalar) with its shape and dtype on the device where the engine draws its z. Streamed
        parameters live on the host between steps but their z is drawn on the compute device:
        anything that recomputes the engine's z (``zoft.optim.directions.z_norm``) draws it here."""
        out = {}
        for k, p in self.params.items():
            dev = self.offload.device if k in self._streamed_keys else p.device
            one = self._scalars.get((p.dtype, dev))
            if one is None:
                one = self._scalars[(p.dtype, dev)] = torch.zeros((), dtype=p.dtype, device=dev)
            out[k] = one.expand(p.shape)
        return out

    @staticmethod
    def _restore(res: _Residency) -> None:
        for k, p in res.params:
            p.data = res.w0[k]  # w0 was never written while perturbed: exact

    def _run_segments(self, module: nn.Module, params: list[tuple[str, nn.Parameter]], args: tuple,
                      kwargs: dict, chunk: int | None, held: _Held | None):
        """The perturbed module's pre-hook: apply its pending update, run every row segment of the
        call but the first under its probe's weights (``module.forward`` on that slice), then set
        the first segment's weights and hand the regular call its slice. ``chunk``: rows per
        micro-batch of each segment (a unit on the unit path)."""
        probes = self._probes
        segs = self._segs
        if chunk:
            segs = [(p, a + lo, min(chunk, n - lo)) for p, a, n in segs for lo in range(0, n, chunk)]
        self._apply_pending_held(params, held)
        res = _Residency(params, segs, w0={k: p.data for k, p in params}, in_bytes=self._live_in)
        self._live[id(module)] = res
        p0 = segs[0][0]
        with torch.no_grad():
            if len(segs) == 1:
                self._perturb(res, probes[p0])
                return None
            if self._linear_in_place(module, res, args, kwargs):
                return (args[0][:0],), {}  # the regular call runs on no rows
            rest = range(1, len(segs))  # segment 0's probe last: the regular call runs segment 0
            cur = None
            for i in [*(i for i in rest if segs[i][0] != p0), *(i for i in rest if segs[i][0] == p0)]:
                p, a, n = segs[i]
                if p != cur:
                    self._perturb(res, probes[p])
                    cur = p
                x, split_x = split_args(args, a, n, self._rows)
                kw, split_kw = split_args(kwargs, a, n, self._rows)
                res.outputs[i] = module.forward(*x, **kw)
                res.was_split = split_x or split_kw
            self._perturb(res, probes[p0])
        return split_args(args, segs[0][1], segs[0][2], self._rows)[0], \
            split_args(kwargs, segs[0][1], segs[0][2], self._rows)[0]

    def _linear_in_place(self, module: nn.Module, res: _Residency, args: tuple, kwargs: dict) -> bool:
        """An ``nn.Linear`` (most of a block's bytes and calls) computes every segment's rows into
        one output (``addmm(out=)``, what ``F.linear`` runs) instead of concatenating per-segment
        outputs: no extra pass over the activations. Other modules: ``False``."""
        x = args[0] if len(args) == 1 and not kwargs else None
        if type(module) is not nn.Linear or not isinstance(x, torch.Tensor) or x.dtype != module.weight.dtype \
                or not is_split(x, self._rows):
            return False
        per = x.numel() // x.shape[-1] // self._rows  # 2-D rows per row of the call
        x2 = x.reshape(-1, x.shape[-1])
        res.out = torch.empty((*x.shape[:-1], module.out_features), dtype=x.dtype, device=x.device)
        o2 = res.out.view(-1, module.out_features)
        cur = None
        for p, a, n in sorted(res.segs, key=lambda s: s[0]):
            if p != cur:
                self._perturb(res, self._probes[p])
                cur = p
            lo, hi = a * per, (a + n) * per
            if module.bias is None:
                torch.mm(x2[lo:hi], module.weight.t(), out=o2[lo:hi])
            else:
                torch.addmm(module.bias, x2[lo:hi], module.weight.t(), out=o2[lo:hi])
        return True

    def _finish_segments(self, module: nn.Module, output: Any) -> Any:
        res = self._live.pop(id(module), None)
        if res is None:
            return None
        with torch.no_grad():
            self._restore(res)
        combined = res.out
        if res.outputs:
            outs = [output, *(res.outputs[i] for i in range(1, len(res.segs)))]
            combined = combine_outputs(outs, [n for _, _, n in res.segs], res.was_split, self._names[id(module)])
        # live at this point: the call's inputs, every segment's output and their concatenation
        self.meter.observe(res.in_bytes + tensor_bytes(output) + tensor_bytes(list(res.outputs.values()))
                           + tensor_bytes(combined))
        return combined

    def _streamed_of(self, module: nn.Module) -> Any:
        """The streamed unit a leaf's weights arrive with: its group, or its whole block."""
        s = self.offload.group(module)
        if s is None:
            units = self.offload.units(self._leaf_unit[id(module)])
            s = units[0] if units else None
        return s

    def _leaf_pre(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._paused:
            return None
        h = None
        if self.offload is not None:
            s = self._streamed_of(module)
            if s is not None:  # a group is acquired at its first leaf's call
                h = self._held.get(s.index) or self._acquire(s)
        params = self._site_params[id(module)]
        self._live_in = tensor_bytes(args) + tensor_bytes(kwargs)
        if not self._probing or not params:
            self._apply_pending_held(params, h)
            self.meter.observe(self._live_in)
            return None
        return self._run_segments(module, params, args, kwargs, None, h)

    def _leaf_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        if self._paused:
            return None
        combined = self._finish_segments(module, output)
        if self.offload is not None:
            s = self.offload.group(module)
            if s is not None and s.leaves[-1] is module and s.index in self._held:
                self._release_unit(self._held[s.index])  # ... and released after its last leaf
        return combined

    @property
    def _probing(self) -> bool:
        """Whether the running forward perturbs: a step is on and no unit before the fan-out runs."""
        return bool(self._probes) and self._fan_out is None

    def _unit_pre(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._paused:
            return None
        fan_out = self._fan_out == id(module)
        if fan_out:  # feature reuse: the units so far ran once on R rows; each probe takes them whole
            self._fan_out = None
            args, kwargs = (repeat_rows(x, self._rows // len(self._probes), len(self._probes)) for x in (args, kwargs))
        out = self._unit_pre_rows(module, args, kwargs)
        return (args, kwargs) if fan_out and out is None else out

    def _unit_pre_rows(self, module: nn.Module, args: tuple, kwargs: dict):
        h = None
        if self.offload is not None:
            for s in self.offload.units(module):
                if not s.leaves:  # a whole block (groups come with their leaves' calls)
                    h = self._held.get(s.index) or self._acquire(s)
        self._live_in = tensor_bytes(args) + tensor_bytes(kwargs)
        chunk = self.micro_batch if self.micro_batch and id(module) in self._blocks and self._probing else None
        if id(module) in self._leaves:  # its leaves do the perturbing
            self.meter.observe(self._live_in)
            if chunk and any(n > chunk for _, _, n in self._segs):
                return self._run_chunks(module, args, kwargs, chunk)
            return None
        params = self._site_params[id(module)]
        if not self._probing or not params:
            self._apply_pending_held(params, h)
            self.meter.observe(self._live_in)
            return None
        return self._run_segments(module, params, args, kwargs, chunk, h)

    def _run_chunks(self, module: nn.Module, args: tuple, kwargs: dict, chunk: int):
        """Micro-batches of a block perturbed leaf by leaf: the block runs one probe's chunk of
        ``chunk`` examples at a time (its leaves then see one probe), so its activations are a
        chunk's, as on the unit path; each leaf builds its perturbed copy once per chunk."""
        top = (self._segs, self._rows)
        segs = [(p, a + lo, min(chunk, n - lo)) for p, a, n in self._segs for lo in range(0, n, chunk)]
        outs: dict[int, Any] = {}
        was_split = False
        for i in range(1, len(segs)):
            p, a, n = segs[i]
            x, split_x = split_args(args, a, n, top[1])
            kw, split_kw = split_args(kwargs, a, n, top[1])
            self._segs, self._rows = [(p, 0, n)], n
            try:
                outs[i] = module.forward(*x, **kw)
            finally:
                self._segs, self._rows = top
            was_split = split_x or split_kw
        p, a, n = segs[0]
        self._chunked[id(module)] = (segs, outs, was_split, top)
        x, kw = split_args(args, a, n, top[1])[0], split_args(kwargs, a, n, top[1])[0]
        self._segs, self._rows = [(p, 0, n)], n
        return x, kw

    def _unit_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        if self._paused:
            return None
        if id(module) in self._leaves:
            combined = None
            chunked = self._chunked.pop(id(module), None)
            if chunked is not None:
                segs, outs, was_split, (self._segs, self._rows) = chunked
                combined = combine_outputs([output, *(outs[i] for i in range(1, len(segs)))],
                                           [n for _, _, n in segs], was_split, self._names[id(module)])
            self.meter.observe(tensor_bytes(args) + tensor_bytes(kwargs) + tensor_bytes(output)
                               + tensor_bytes(combined))
        else:
            combined = self._finish_segments(module, output)
        if self.offload is not None:
            for s in self.offload.units(module):  # a whole block; a group whose last leaf never ran
                h = self._held.get(s.index)
                if h is not None:
                    self._release_unit(h)
        return combined

    # -- public step API ------------------------------------------------------------------
    def evaluate(self, probes: Sequence[Probe], batch: Any, objective: Objective,
                 fan_out_at: str | None = None) -> torch.Tensor:
        """Losses of P probes on one batch, in one pass over the units; shape (P,), fp64 on CPU.

        ``batch`` needs ``repeat(P)`` and ``inputs`` (see ``zoft.tasks.Batch``). The pending
        update is fully applied when this returns, and every weight is back at its unperturbed
        value even if the forward raised.

        ``fan_out_at`` (feature reuse): the name of a unit that no probe's perturbation precedes,
        i.e. every unit that runs before it is unperturbed for all P probes (the caller's promise).
        The model then gets the batch's R rows once: the units before it run once, unperturbed,
        and that unit's R-row inputs are repeated P times (``repeat_rows``: each probe takes them
        whole, on either granularity); from there
        on rows are P*R as usual, and the objective's ``loss`` sees the repeated batch. Tensors
        computed before the fan-out must reach later code only through it (a chain there, as in
        ``nn.Sequential``); a residual around it meets P*R rows with R and fails with a shape error.
        """
        probes = list(probes)
        if not probes:
            raise ValueError("a step needs at least one probe")
        was_training = self.model.training
        self.model.eval()
        rep = batch.repeat(len(probes))
        first = next(v for v in rep.inputs.values() if isinstance(v, torch.Tensor))
        self._rows = first.shape[0]  # N = P * R rows, probe-major
        R = self._rows // len(probes)
        self._segs = [(i, i * R, R) for i in range(len(probes))]
        self._probes = probes
        if fan_out_at is not None:
            unit = next((u for u in self.layout.units if u.name == fan_out_at), None)
            if unit is None:
                raise ValueError(f"fan_out_at: no unit named {fan_out_at!r}")
            self._fan_out = id(unit.module)
        self._release_stale()
        self._count_noise()
        self.meter.reset_peak()
        try:
            with torch.no_grad():
                out = objective.forward(self.model, rep if fan_out_at is None else batch)
                if self._fan_out is not None:
                    raise ValueError(f"fan_out_at: unit {fan_out_at!r} did not run in the forward")
                losses = objective.loss(out, rep, len(probes))
        finally:
            self._fan_out = None
            for res in self._live.values():  # a module whose forward raised
                with torch.no_grad():
                    self._restore(res)
            self._live.clear()
            self._chunked.clear()
            self._release_stale()
            self._probes = None
            self._apply_all_pending()
            self.model.train(was_training)
        losses = losses.detach().to("cpu", torch.float64)
        if losses.shape != (len(probes),):
            raise ValueError(f"objective returned shape {tuple(losses.shape)}, expected ({len(probes)},)")
        return losses

    def _count_noise(self) -> None:
        """The noise backend's bytes on the compute device (a noise table), for the meter."""
        want = getattr(self.noise, "device_bytes", lambda device: 0)(self.compute_device)
        if want != self.meter.by_kind.get("noise", 0):
            self.meter.alloc(want - self.meter.by_kind.get("noise", 0), "noise")

    @contextlib.contextmanager
    def paused(self):
        """Hand the model out (first-order steps, external edits): the pending update is flushed,
        the hooks do nothing inside the block (autograd sees the plain model; streamed blocks'
        parameters are their host masters, so this is for resident models or the CPU twin), and
        prefetched copies of streamed blocks are dropped after it (the masters may have changed)."""
        self.flush()
        self._paused = True
        try:
            yield self.model
        finally:
            self._paused = False
            if self.offload is not None:
                self.offload.abandon()

    def _release_stale(self) -> None:
        """Release streamed units whose forward raised between the pre- and the post-hook
        (their pending update, if applied, is written back: nothing is lost)."""
        stale = list(self._held.values())
        for h in stale:
            self._release_unit(h)
        if stale:
            self.offload.abandon()

    @property
    def device_peak_bytes(self) -> int:
        """Peak bytes on the device since the last ``evaluate`` began: what the engine and the
        scheduler own (resident weights, slots, perturbation scratch) plus the activations seen at
        unit and leaf boundaries and the temporaries of building a perturbed copy (z's piece, its
        cast) and of applying an update. Activations inside a leaf are not counted (on CUDA, read
        ``torch.cuda.max_memory_allocated``)."""
        return self.meter.peak

    def close(self) -> None:
        """Flush and remove the hooks: the model is the plain Hugging Face model again. Under
        streaming it is whole on the host (streamed blocks keep their CPU masters as their
        parameters' storage; resident units and buffers come back from the device), so whatever
        reads it next sees one device; ``model.to(device)`` puts it back where it fits."""
        self.flush()
        for arena in self._arena.values():  # before the scheduler's close, which clears the shared meter
            self.meter.free(arena.numel() * arena.element_size(), "scratch")
        self._arena = {}
        if self.offload is not None:
            self.offload.close()
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "ZOEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
