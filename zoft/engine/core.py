"""The zeroth-order engine: probe batching through the model's own ``forward``.

Every unit of the layout (``zoft.models.discover_layout``) gets a forward pre-hook and a forward
hook (PyTorch's public hook API; the model's modules, names and ``forward`` stay untouched).
While a step is active the pre-hook of a unit:

1. applies the pending update of the previous step to the unit's parameters (lazily: each
   parameter once, tied ones included),
2. leaves the weights ``w0`` where they are and, for probes 1..P-1, writes ``w0 + scale_p * z_p``
   into a scratch buffer, points ``p.data`` at it and calls ``module.forward`` on probe p's
   slice of the inputs,
3. does the same for probe 0 and lets the regular call run on probe 0's slice;

the forward hook then points ``p.data`` back at ``w0`` (never written during the probes, so the
restore is exact and costs no pass over the weights) and concatenates the P outputs. Each unit is
thus touched once per step for any number of probes, and the same code path is what the offload
scheduler streams.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from zoft.engine.offload import Meter, Offloader, tensor_bytes
from zoft.engine.precision import stochastic_round_, update_bytes
from zoft.engine.probes import Probe, Update, combine_outputs, split_args
from zoft.models.layout import Layout, Unit, discover_layout
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
    """Per-call state of one unit while it runs its probes."""

    params: list[tuple[str, nn.Parameter]]
    w0: dict[str, torch.Tensor] = field(default_factory=dict)  # the unperturbed storage of each p
    bufs: dict[str, torch.Tensor] = field(default_factory=dict)  # scratch holding w0 + scale * z
    z_seed: int | None = None
    z: dict[str, torch.Tensor] = field(default_factory=dict)
    z_pooled: set[str] = field(default_factory=set)  # keys whose z lives in a pooled buffer
    outputs: list[Any] = field(default_factory=list)
    was_split: bool = True
    in_bytes: int = 0  # the whole call's inputs (for the device-bytes meter)
    first: list[Any] = field(default_factory=list)  # probe 0's micro-batches after its first


class ZOEngine:
    """Runs P perturbed evaluations of a model in one forward pass and applies seed-form updates.

    model:    an unmodified Hugging Face model (kept in eval mode; ``use_cache`` must be off).
    noise:    the keyed noise backend (default: per-tensor ``torch.Generator``, Gaussian).
    no_decay: substrings of parameter names that take no weight decay.

    offload:  a ``zoft.engine.offload.Streaming`` placement (device, resident blocks, prefetch,
              codec): streamed blocks live in CPU memory and pass through device slots; the
              results are those of the resident engine (``tests/test_offload.py``).

    Trainable parameters are those with ``requires_grad`` (floating point); the rest are never
    perturbed nor written. ``close()`` removes the hooks; the model is then exactly the plain model.
    """

    def __init__(self, model: nn.Module, noise: NoiseBackend | None = None,
                 no_decay: Sequence[str] = NO_DECAY, layout: Layout | None = None,
                 offload: Any = None, micro_batch: int | None = None):
        self.model = model
        keep_canonical_layout(model)  # bitsandbytes 4-bit layers: one layout on every CPU, before any view
        self.layout = layout or discover_layout(model)
        self.noise = noise or make_noise()
        self.meter = Meter()  # bytes on the device that the engine and the scheduler own
        self.offload: Offloader | None = None
        if offload is not None:
            self.offload = Offloader(model, self.layout, offload.device, resident_blocks=offload.resident_blocks,
                                     prefetch=offload.prefetch, transfer=offload.transfer, meter=self.meter,
                                     writeback_every=offload.writeback_every)
        # streamed units between pre and post hook: [module, write] (``Offloader.release``'s ``write``)
        self._acquired: dict[int, list[Any]] = {}
        # deferred write-back: the updates set so far are versions 1..V; a streamed unit's master is
        # at some version s and the updates s+1.. (update, rounding key) are re-applied after upload
        self._version = 0
        self._log: dict[int, tuple[Update, int]] = {}
        self._flushing = False
        self._partial: set[int] = set()  # units written back holding part of the pending update
        self._paused = False
        self._streamed_keys = {k for s in self.offload.streamed for k, _ in s.params} if self.offload else set()
        # examples per probe that a block runs at once (None: the probe's whole slice); the
        # planner's choice under a budget. Each block is still loaded once per step.
        self.micro_batch = micro_batch or (offload.micro_batch if offload is not None else None)
        self._blocks = {id(u.module) for u in self.layout.blocks}
        self.no_decay = tuple(no_decay)
        self._probes: list[Probe] | None = None
        self._rows = 0
        self._fan_out: int | None = None  # feature reuse: id of the unit not yet reached (``evaluate``)
        self._pending: Update | None = None
        self._applied: set[str] = set()
        self._live: dict[int, _Residency] = {}
        self._units: dict[int, Unit] = {id(u.module): u for u in self.layout.units}
        counts: dict[str, int] = {}
        for u in self.layout.units:
            for k in {k for k, _ in u.params}:
                counts[k] = counts.get(k, 0) + 1
        self._tied = {k for k, c in counts.items() if c > 1}
        self._tied_z: dict[tuple[int, str], torch.Tensor] = {}  # z of tied keys, kept for one step
        # Free scratch buffers by (shape, dtype, device): one unit's worth, reused across units/steps.
        self._pool: dict[tuple, list[torch.Tensor]] = {}
        self._executor: ThreadPoolExecutor | None = None  # draws z while the main thread updates
        self._scalars: dict[tuple, torch.Tensor] = {}  # (dtype, device) -> a 0-dim tensor (``z_like``)
        self._live_in = 0  # bytes of the running unit's inputs (the meter's view during an update)
        self.refresh_trainable()
        self._handles = []
        for u in self.layout.units:
            self._handles.append(u.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._handles.append(u.module.register_forward_hook(self._post_hook, with_kwargs=True))

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
        # each unit's trainable (key, parameter) pairs, a key once: read by every hook call
        self._unit_params: dict[int, list[tuple[str, nn.Parameter]]] = {}
        for u in self.layout.units:
            seen: dict[str, nn.Parameter] = {}
            for k, p in u.params:
                if k in self.params:
                    seen.setdefault(k, p)
            self._unit_params[id(u.module)] = list(seen.items())
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
        fused = self.noise.name == "triton" and p.is_cuda and self.noise.distribution != "sphere"
        self.meter.observe(self._live_in + update_bytes(p.numel(), p.element_size(), fused))
        with torch.no_grad():
            if p.dtype in (torch.bfloat16, torch.float16):
                # a low-precision weight is updated in fp32 and stochastically rounded back:
                # round-to-nearest would drop ZO-sized updates (|lr*g*z| << half an ulp of w)
                w32 = p.data.float()
                update.apply(key, w32, self.noise, self.decays[key])
                stochastic_round_(p.data, w32, mix(sround_seed, key + "/sround"))
                del w32
            else:
                update.apply(key, p.data, self.noise, self.decays[key])

    def _update_unit(self, module: nn.Module, params: list[tuple[str, nn.Parameter]]) -> None:
        """Bring a unit's trainable parameters up to date: a streamed unit first re-applies the
        updates its master has not absorbed (deferred write-back), then every unit takes the
        pending update. Each re-applied update is the same ``apply`` with the same rounding key
        as when it was first applied, so the weights equal the resident engine's bit for bit."""
        held = self._acquired.get(id(module))
        s = self.offload.unit(module) if held is not None else None
        if s is None or not params:
            for k, p in params:
                self._apply_pending(k, p)
            return
        behind = range(s.master_version + 1, s.version + 1)
        for v in behind:  # an exception here leaves ``write`` False: the half-updated slot is dropped
            update, sround_seed = self._log[v]
            for k, p in params:
                self._apply_update(update, sround_seed, k, p)
        todo = self._pending is not None and any(k not in self._applied for k, _ in params)
        if todo or behind:
            held[1] = True  # a partially applied pending update reaches the master with its keys
        for k, p in params:
            self._apply_pending(k, p)
        # a master holding part of the pending update (an earlier residency raised) cannot be
        # caught up by re-applying it: the residency that completes it writes back too
        partial = id(module) in self._partial
        if todo:
            s.version = self._version
            self._partial.discard(id(module))
        if held[1] and not (self._flushing or partial) and all(
                type(self._log[v][0]).apply is Update.apply for v in range(s.master_version + 1, s.version + 1)):
            held[1] = None  # seed-form updates only: the write-back may wait (``writeback_every``)

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

    def _apply_all_pending(self) -> None:
        self._live_in = 0
        if self._pending is not None:
            if self.offload is not None:  # stream the units the last pass did not reach
                for s in self.offload.streamed:
                    keys = [k for k, _ in self._unit_params[id(s.unit.module)]]
                    if any(k not in self._applied for k in keys):
                        self._pre_hook(s.unit.module, (), {})
                        self._post_hook(s.unit.module, (), {}, None)
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
                    self._pre_hook(s.unit.module, (), {})
                    self._post_hook(s.unit.module, (), {}, None)
        finally:
            self._flushing = False
        self.offload.synchronize()

    # -- probes ---------------------------------------------------------------------------
    def _set_weights(self, res: _Residency, probe: Probe) -> None:
        if probe.seed is None or probe.scale == 0.0:
            for k, p in res.params:
                p.data = res.w0[k]
            return
        if res.z_seed != probe.seed:  # consecutive probes along one direction reuse z
            self._draw_z(res, probe.seed)
        for k, p in res.params:
            buf = res.bufs.get(k)
            if buf is None:
                buf = res.bufs[k] = self._take(res.w0[k])
            torch.add(res.w0[k], res.z[k], alpha=probe.scale, out=buf)  # one pass: read w0, z
            p.data = buf

    def _draw_z(self, res: _Residency, seed: int) -> None:
        self._release_z(res)
        with torch.no_grad():
            res.z = {k: self._sample(seed, k, p, res) for k, p in res.params}
        res.z_seed = seed

    def _worker(self) -> ThreadPoolExecutor:
        if self._executor is None:
            # the worker launches on the compute device (a thread starts on CUDA device 0)
            dev = self.compute_device
            init = (torch.cuda.set_device, (dev,)) if dev.type == "cuda" else (None, ())
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zoft-z", initializer=init[0],
                                                initargs=init[1])
        return self._executor

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

    def _sample(self, seed: int, key: str, p: torch.Tensor, res: _Residency) -> torch.Tensor:
        if key in self._tied:
            z = self._tied_z.get((seed, key))
            if z is None:  # a tied weight (embedding = LM head) is drawn once per step, not per unit
                z = self._tied_z[(seed, key)] = self.noise.sample(seed, key, p).to(p.dtype)
                self.meter.alloc(z.numel() * z.element_size(), "scratch")
            return z
        if p.dtype not in (torch.float32, torch.float64):  # z is fp32: convert
            return self.noise.sample(seed, key, p).to(p.dtype)
        buf = self._take(p)  # the backend may draw z into a pooled buffer (no fresh allocation)
        z = self.noise.sample(seed, key, p, out=buf)
        if z is buf:
            res.z_pooled.add(key)
        else:  # e.g. a noise-table view
            self._give(buf)
        return z

    def _take(self, like: torch.Tensor) -> torch.Tensor:
        free = self._pool.get((like.shape, like.dtype, like.device))
        if free:
            return free.pop()
        self.meter.alloc(like.numel() * like.element_size(), "scratch")
        return torch.empty_like(like, memory_format=torch.contiguous_format)

    def _trim_pool(self, params: list[tuple[str, nn.Parameter]]) -> None:
        """Free pooled buffers no parameter of this unit can use: scratch stays one unit's worth
        (blocks share shapes, so the pool survives from block to block)."""
        keep = {(p.shape, p.dtype, p.device) for _, p in params}
        for key in [k for k in self._pool if k not in keep]:
            for buf in self._pool.pop(key):
                self.meter.free(buf.numel() * buf.element_size(), "scratch")

    def _give(self, buf: torch.Tensor) -> None:
        self._pool.setdefault((buf.shape, buf.dtype, buf.device), []).append(buf)

    def _release_z(self, res: _Residency) -> None:
        for k in res.z_pooled:
            self._give(res.z[k])
        res.z_pooled = set()
        res.z = {}

    def _restore(self, res: _Residency) -> None:
        for k, p in res.params:
            p.data = res.w0[k]  # w0 was never written while perturbed: exact
        for buf in res.bufs.values():
            self._give(buf)
        res.bufs = {}
        self._release_z(res)

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._paused:
            return None
        params = self._unit_params[id(module)]
        probes = self._probes
        if self.offload is not None and self.offload.is_streamed(module):
            self.offload.acquire(module)  # weights now in a device slot (its master's version)
            self._acquired[id(module)] = [module, False]  # nothing changed yet: nothing to write
        self._live_in = tensor_bytes(args) + tensor_bytes(kwargs)
        if self._fan_out == id(module):
            self._fan_out = None  # this unit fans the R rows out: each probe takes them whole
        if not probes or not params or self._fan_out is not None:  # (before the fan-out: once, unperturbed)
            self._update_unit(module, params)
            self.meter.observe(self._live_in)
            return None
        self._trim_pool(params)
        res = _Residency(params, w0={k: p.data for k, p in params})  # the update is in place
        res.in_bytes = self._live_in
        self._live[id(module)] = res
        P = len(probes)
        # The first direction's z depends on (seed, key) and shapes only, not on the weights: draw
        # it on a worker thread while this one applies the pending update (two RNG streams at once).
        first = next((pr for pr in [*probes[1:], probes[0]] if pr.seed is not None and pr.scale != 0.0), None)
        drawn = None
        if first is not None and self._pending is not None:
            drawn = self._worker().submit(self._draw_z, res, first.seed)
        try:
            self._update_unit(module, params)
        finally:
            if drawn is not None:
                drawn.result()
        R = self._rows // P
        mb = self.micro_batch if self.micro_batch and id(module) in self._blocks else R
        chunks = [(lo, min(lo + mb, R)) for lo in range(0, R, mb)] if mb < R else [(0, None)]
        with torch.no_grad():
            if P == 1 and len(chunks) == 1:
                self._set_weights(res, probes[0])
                return None
            for i in [*range(1, P), 0]:  # probe 0 last: the regular call runs its first chunk
                self._set_weights(res, probes[i])
                for lo, hi in (chunks if i else chunks[1:]):
                    a, split_a = split_args(args, i, P, self._rows, lo, hi)
                    kw, split_kw = split_args(kwargs, i, P, self._rows, lo, hi)
                    (res.outputs if i else res.first).append(module.forward(*a, **kw))
                    res.was_split = split_a or split_kw
        lo, hi = chunks[0]
        a, _ = split_args(args, 0, P, self._rows, lo, hi)
        kw, _ = split_args(kwargs, 0, P, self._rows, lo, hi)
        return a, kw

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        if self._paused:
            return None
        res = self._live.pop(id(module), None)
        combined = None
        if res is not None:
            with torch.no_grad():
                self._restore(res)
            if res.outputs or res.first:
                rows = self._rows // len(self._probes)
                combined = combine_outputs([output, *res.first, *res.outputs], rows, res.was_split,
                                           self._units[id(module)].name)
            # live at this point: the call's inputs, every probe's output and their concatenation
            self.meter.observe(res.in_bytes + tensor_bytes(output) + tensor_bytes(res.outputs)
                               + tensor_bytes(combined))
        self._release(module)
        return combined

    def _release(self, module: nn.Module) -> None:
        held = self._acquired.pop(id(module), None)
        if held is not None:
            if held[1] is True and self._pending is not None and any(
                    k not in self._applied for k, _ in self._unit_params[id(module)]):
                self._partial.add(id(module))
            self.offload.release(module, held[1])

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
        and at that unit each probe takes the R-row input whole (``combine_outputs``); from there
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
        self._rows = first.shape[0]
        self._probes = probes
        if fan_out_at is not None:
            unit = next((u for u in self.layout.units if u.name == fan_out_at), None)
            if unit is None:
                raise ValueError(f"fan_out_at: no unit named {fan_out_at!r}")
            self._fan_out = id(unit.module)
        self._release_stale()
        self.meter.reset_peak()
        try:
            with torch.no_grad():
                out = objective.forward(self.model, rep if fan_out_at is None else batch)
                if self._fan_out is not None:
                    raise ValueError(f"fan_out_at: unit {fan_out_at!r} did not run in the forward")
                losses = objective.loss(out, rep, len(probes))
        finally:
            self._fan_out = None
            for res in self._live.values():  # a unit whose forward raised
                with torch.no_grad():
                    self._restore(res)
            self._live.clear()
            self._release_stale()
            for z in self._tied_z.values():
                self.meter.free(z.numel() * z.element_size(), "scratch")
            self._tied_z.clear()
            self._probes = None
            self._apply_all_pending()
            self.model.train(was_training)
        losses = losses.detach().to("cpu", torch.float64)
        if losses.shape != (len(probes),):
            raise ValueError(f"objective returned shape {tuple(losses.shape)}, expected ({len(probes)},)")
        return losses

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
        stale = list(self._acquired.values())
        for module, _ in stale:
            self._release(module)
        if stale:
            self.offload.abandon()

    @property
    def device_peak_bytes(self) -> int:
        """Peak bytes on the device since the last ``evaluate`` began: what the engine and the
        scheduler own (resident weights, slots, perturbation scratch) plus the activations seen at
        unit boundaries. Activations inside a unit are not counted (on CUDA, read
        ``torch.cuda.max_memory_allocated``)."""
        return self.meter.peak

    def close(self) -> None:
        """Flush and remove the hooks: the model is the plain Hugging Face model again. Under
        streaming it is whole on the host (streamed blocks keep their CPU masters as their
        parameters' storage; resident units and buffers come back from the device), so whatever
        reads it next sees one device; ``model.to(device)`` puts it back where it fits."""
        self.flush()
        if self.offload is not None:
            self.offload.close()
        for h in self._handles:
            h.remove()
        self._handles = []
        self._pool = {}
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def __enter__(self) -> "ZOEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
