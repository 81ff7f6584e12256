"""Block streaming under a device budget: master weights in CPU memory, static device slots.

The scheduler owns *where* a unit's weights are; ``zoft.engine.core.ZOEngine`` owns what is done
to them while they are there (pending update, probes, exact restore). The engine's pre-hook calls
``acquire(unit)`` before touching a unit and its post-hook ``release(unit, dirty)`` after; that is
the whole interface, so a streamed step runs the same code as a resident one.

Placement (from ``zoft.engine.plan``): embeddings, final norm, head and blocks ``0..r-1`` are
*resident* (moved to the device once); blocks ``r..L-1`` are *streamed*. A streamed unit's
floating-point parameters live in one flat CPU buffer per unit (the *master*, pinned with
``cudaHostRegister`` on CUDA: no power-of-two rounding of the caching host allocator), and its
parameters' ``.data`` are views into it while it is away. The device holds ``k = d + 1`` static
slots, each one unit's worth; uploads run ``d`` units ahead on their own stream, write-backs on
another; CUDA events are the only dependencies inside a step (no host synchronisation), and the
first ``d`` uploads of the next pass are issued as soon as the last streamed unit of this one is
acquired (they do not depend on the update, which is applied on the device after upload).

Deferred write-back (``writeback_every = k``): a streamed unit's master holds its weights as of
version ``master_version`` (the number of seed-form updates it has absorbed); the engine brings
the uploaded copy to the unit's current ``version`` by re-applying the updates in between (they
are in its log, kilobytes each) before the pending update, and ``release`` writes the unit back
only once it is ``k`` updates ahead of its master (or when the engine says now: flush, an update
that is not seed-form, a partially applied update). ``k = 1`` is write-back every step. A unit
released without a write-back loses nothing: its slot is a copy of ``master + log``.

Transfer codecs (``transfer``): ``same`` moves the master's bytes; ``bf16``/``fp16`` (fp32 masters)
and ``int8`` (per-block absmax, ``zoft.kernels.codec8``) encode on the host, move fewer bytes and
decode on the device. A lossy upload is never written back as weights: the write-back carries the
*change* made on the device (``slot_after - decode(upload)``) and the host adds it to the master,
so codec error never accumulates in the master. Deferred write-back composes: the change written
back after ``k`` updates is ``slot_after - decode(upload of the master at s)``, the sum of the
updates' changes as applied on the device, and every residency between write-backs decodes the
same master bytes (one codec rounding, never a compounded one).

Groups (``Streaming.group_bytes``): a streamed block may be split into groups of its leaves
(consecutive in call order, ``zoft.models.layout.pack_groups``); each group is then a streamed
unit of its own here (master, slot, versions, write-back), and slots are the largest group's size.

CPU twin: on a CPU "device" the same scheduler runs with synchronous copies (the slots are
separate CPU buffers) and a ``Meter`` accounts the bytes that would sit on the device: resident
weights, slots, the engine's perturbation scratch, the activations crossing unit boundaries and
the transients of making a perturbed copy (z's piece and its cast) and of applying an update.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from zoft.errors import UsageError
from zoft.models.layout import Layout, Unit

Codec = Literal["same", "bf16", "fp16", "int8"]
CODECS = ("same", "bf16", "fp16", "int8")
INT8_BLOCK = 256  # elements per fp32 scale of the int8 codec (= zoft.engine.plan.INT8_GROUP)


@dataclass(frozen=True)
class Streaming:
    """Where to stream: what ``ZOEngine(offload=...)`` takes. ``from_plan`` reads a planner's
    ``zoft.engine.plan.Plan``; on a ``cpu`` device the scheduler is the CPU twin."""

    device: str = "cpu"
    resident_blocks: int = 0
    prefetch: int = 2
    transfer: Codec = "same"
    micro_batch: int | None = None  # rows per probe a block runs at once (None: all)
    writeback_every: int = 1  # k: a trainable streamed unit is written back once per k updates
    # bytes of parameters per streaming group: each streamed block's leaves, in call order, packed
    # into groups of at most this (a larger leaf is a group alone); None: whole blocks
    group_bytes: int | None = None

    @classmethod
    def from_plan(cls, plan: Any, device: str | torch.device) -> "Streaming":
        mb = plan.micro_batch if plan.micro_batch < plan.rows else None
        return cls(str(device), plan.resident_blocks, max(plan.prefetch, 1), plan.transfer, mb,
                   plan.writeback_every, getattr(plan, "group_bytes", None))


class Meter:
    """Bytes that sit on the (possibly pretend) device: ``now``, and the ``peak`` of
    ``now + transient`` where ``transient`` are activations observed at unit boundaries, and the
    temporaries of a perturbed copy or an update beside the activations live then."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.by_kind: dict[str, int] = {}

    def alloc(self, nbytes: int, kind: str) -> None:
        self.now += nbytes
        self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes
        self.peak = max(self.peak, self.now)

    def free(self, nbytes: int, kind: str) -> None:
        self.now -= nbytes
        self.by_kind[kind] -= nbytes

    def observe(self, transient: int) -> None:
        self.peak = max(self.peak, self.now + transient)

    def reset_peak(self) -> None:
        self.peak = self.now

    def clear(self) -> None:
        """Nothing is on the device any more (the scheduler closed)."""
        self.now = 0
        self.by_kind = dict.fromkeys(self.by_kind, 0)


def tensor_bytes(x: Any) -> int:
    """Bytes of every tensor in a nested structure (args, kwargs, model outputs)."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(tensor_bytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(tensor_bytes(v) for v in x)
    if hasattr(x, "to_tuple"):  # transformers ModelOutput
        return tensor_bytes(x.to_tuple())
    return 0


@dataclass
class _Streamed:
    """One streamed unit (a block, or a group of a block's leaves): its flat master and the views
    of its parameters."""

    unit: Unit  # the block
    index: int  # position among streamed units (execution order)
    params: list[tuple[str, nn.Parameter]]  # each parameter once
    offsets: list[tuple[int, int]]  # (start, numel) in the flat buffer
    master: torch.Tensor  # (numel,) on the host, the model dtype
    host_views: list[torch.Tensor]
    trainable: bool
    numel: int
    n_write: int = 0  # elements written back: the trainable prefix of the flat buffer
    # quantized (bitsandbytes) weights and their 4-bit absmax, as bytes: (owner, attribute, start,
    # nbytes, dtype, shape) in ``packed_master`` (uint8); moved as they are, never written back
    packed: list[tuple[Any, str, int, int, torch.dtype, torch.Size]] = field(default_factory=list)
    packed_master: torch.Tensor | None = None
    version: int = 0  # updates the unit's weights hold (set by the engine as it applies them)
    master_version: int = 0  # updates ``master`` holds; the engine re-applies the rest on upload
    writeback_event: Any = None  # the last write-back into ``master`` (CUDA event)
    pending_delta: Any = None  # (host delta buffer, event): a lossy codec's change to add to ``master``
    leaves: tuple[nn.Module, ...] = ()  # a group: its leaves in call order (empty: the whole block)


@dataclass
class _Slot:
    flat: torch.Tensor | None  # (max numel,) on the device, the model dtype (codec "same")
    enc: torch.Tensor | None = None  # encoded upload (bf16/fp16/int8 bytes) on the device
    scales: torch.Tensor | None = None  # int8 codec: fp32 scales on the device
    packed: torch.Tensor | None = None  # quantized bases: the packed bytes, moved as they are
    unit: _Streamed | None = None
    in_use: bool = False  # acquired and not yet released
    ready: Any = None  # upload finished (CUDA event)
    free_after: Any = None  # previous occupant written back (CUDA event)


@dataclass
class OffloadStats:
    uploads: int = 0
    upload_bytes: int = 0
    writebacks: int = 0
    writeback_bytes: int = 0
    stalls: int = 0  # acquires that found their unit not prefetched (uploaded synchronously)


class Offloader:
    """Streams ``streamed`` units of ``layout`` through ``slots`` device slots.

    model:     the model (its non-streamed parameters and all buffers are moved to ``device``).
    layout:    its unit layout (``ZOEngine.layout``).
    device:    ``torch.device("cuda", i)`` for real streams, ``cpu`` for the twin.
    resident_blocks: blocks ``0..r-1`` stay resident; the rest stream.
    prefetch:  ``d >= 1`` uploads in flight ahead of the computing unit; ``k = d + 1`` slots.
    transfer:  codec over the link (``same``, ``bf16``, ``fp16``, ``int8``).
    meter:     byte accounting (created if not given).
    writeback_every: ``k >= 1``: write a trainable unit back once it is ``k`` updates ahead of
               its master (the engine re-applies the missing ones after each upload).
    groups:    per block module (``id``), its leaves packed into groups in call order
               (``zoft.models.layout.pack_groups``): each group is a streamed unit of its own;
               blocks not in it stream whole.
    """

    def __init__(self, model: nn.Module, layout: Layout, device: torch.device | str, *,
                 resident_blocks: int, prefetch: int = 2, transfer: Codec = "same",
                 meter: Meter | None = None, writeback_every: int = 1,
                 groups: dict[int, list[list[nn.Module]]] | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if transfer not in CODECS:
            raise UsageError(f"unknown transfer codec '{transfer}'; use one of {', '.join(CODECS)}")
        if prefetch < 1:
            raise UsageError("prefetch must be >= 1")
        if writeback_every < 1:
            raise UsageError("--writeback-every must be >= 1")
        self.writeback_every = writeback_every
        blocks = layout.blocks
        if not 0 <= resident_blocks <= len(blocks):
            raise UsageError(f"resident_blocks must be in 0..{len(blocks)}, not {resident_blocks}")
        self.model, self.layout, self.transfer = model, layout, transfer
        self.meter = meter or Meter()
        self.stats = OffloadStats()
        self.pins = HostPins()
        try:
            self._setup(model, layout, resident_blocks, prefetch, groups or {})
        except BaseException:
            self.pins.release()  # what was page-locked before the failure
            raise

    def _setup(self, model: nn.Module, layout: Layout, resident_blocks: int, prefetch: int,
               groups: dict[int, list[list[nn.Module]]]) -> None:
        blocks = layout.blocks
        transfer = self.transfer
        streamed_units = list(blocks[resident_blocks:])
        owners: dict[str, int] = {}
        for u in layout.units:
            for k in {k for k, _ in u.params}:
                owners[k] = owners.get(k, 0) + 1
        self.streamed: list[_Streamed] = []
        self._by_module: dict[int, list[_Streamed]] = {}  # block -> its streamed units
        self._by_leaf: dict[int, _Streamed] = {}  # leaf of a grouped block -> its group
        self._streamed_aux: set[int] = set()  # quantization constants that stream with their block
        dtype = None
        for u in streamed_units:
            parts = groups.get(id(u.module)) or [()]
            for leaves in parts:
                s = self._make_master(u, len(self.streamed), owners, tuple(leaves))
                if s.numel and dtype is not None and s.master.dtype != dtype:
                    raise UsageError("streamed blocks must share one dtype")
                dtype = s.master.dtype if s.numel else dtype
                self.streamed.append(s)
                self._by_module.setdefault(id(u.module), []).append(s)
                self._by_leaf.update((id(m), s) for m in leaves)
        self.dtype = dtype
        if transfer in ("bf16", "fp16") and dtype not in (None, torch.float32):
            raise UsageError(f"--transfer {transfer} encodes fp32 masters; this model is {dtype} "
                             "(use --transfer same, which already moves 2-byte weights)")
        # resident units (and every buffer: rotary tables, position ids) go to the device once
        streamed_ids = {id(s.unit.module) for s in self.streamed}
        for u in layout.units:
            if id(u.module) in streamed_ids:
                continue
            for _, p in u.params:
                if p.device != self.device:
                    p.data = p.data.to(self.device)
        away = {id(p) for s in self.streamed for _, p in s.params} | {
            id(o) for s in self.streamed for o, a, *_ in s.packed if a == "data"}
        self.meter.alloc(sum(p.numel() * p.element_size() for _, p in model.named_parameters() if id(p) not in away),
                         "resident")
        for _, p in model.named_parameters():  # bitsandbytes' other quantization constants: resident
            if not p.dtype.is_floating_point:
                aux = [t for t in _quant_aux(p) if id(t) not in self._streamed_aux]
                self.meter.alloc(sum(t.numel() * t.element_size() for t in aux), "resident")
                if self.cuda:
                    _aux_to(p, self.device, skip=self._streamed_aux)
        for m in model.modules():
            for n, b in list(m.named_buffers(recurse=False)):
                if b.device != self.device:
                    m._buffers[n] = b.to(self.device)
        self.prefetch = min(prefetch, max(len(self.streamed) - 1, 0)) if self.streamed else 0
        n_slots = self.prefetch + 1 if self.streamed else 0
        max_numel = max((s.numel for s in self.streamed), default=0)
        self.slots = [self._make_slot(max_numel) for _ in range(n_slots)]
        packed = [s.packed_master for s in self.streamed if s.packed_master is not None]
        if packed:
            n_packed = max(t.numel() for t in packed)
            for slot in self.slots:
                slot.packed = torch.empty(n_packed, dtype=packed[0].dtype, device=self.device)
                self.meter.alloc(n_packed * slot.packed.element_size(), "slots")
        # a codec's slots hold encoded units; the computing unit is decoded into one buffer
        self.decoded = None
        if transfer != "same" and self.streamed:
            self.decoded = torch.empty(max_numel, dtype=self.dtype, device=self.device)
            self.meter.alloc(max_numel * self.decoded.element_size(), "slots")
        self._rr = 0  # uploads issued: the next one goes to slot _rr % k
        self._holder: dict[int, _Slot] = {}  # streamed index -> slot holding it
        if self.cuda:
            self.up_stream = torch.cuda.Stream(self.device)
            self.wb_stream = torch.cuda.Stream(self.device)

    # -- setup --------------------------------------------------------------------------
    def _make_master(self, u: Unit, index: int, owners: dict[str, int], leaves: tuple[nn.Module, ...]) -> _Streamed:
        params: list[tuple[str, nn.Parameter]] = []  # trainable first: write-back is a prefix
        packed: list[nn.Parameter] = []
        seen: set[str] = set()
        mine = {id(p) for m in leaves for p in m.parameters(recurse=False)}
        for k, p in u.params:
            if k in seen or (leaves and id(p) not in mine):
                continue
            seen.add(k)
            if owners.get(k, 1) > 1:
                raise UsageError(f"parameter '{k}' is shared with another unit; streamed blocks cannot hold tied weights")
            if not p.dtype.is_floating_point:
                if p.requires_grad:
                    raise UsageError(f"parameter '{k}' is {p.dtype} and trainable; only floating-point weights train")
                packed.append(p)  # bitsandbytes' packed weights: streamed as they are, never written
                continue
            params.append((k, p))
        params.sort(key=lambda kp: not kp[1].requires_grad)
        dtypes = {p.dtype for _, p in params}
        if len(dtypes) > 1 or not (dtypes or leaves):
            raise UsageError(f"unit '{u.name}' mixes parameter dtypes {sorted(map(str, dtypes))}; load the model in one dtype")
        dtype = dtypes.pop() if dtypes else torch.float32  # a group of packed weights only: empty
        numel = sum(p.numel() for _, p in params)
        master = torch.empty(numel, dtype=dtype)
        if self.cuda:
            self.pins.pin(master)
        offsets, views, pos = [], [], 0
        for _, p in params:
            n = p.numel()
            view = master[pos:pos + n].view(p.shape)
            view.copy_(p.data)
            p.data = view  # the original storage is released here: one unit at a time
            offsets.append((pos, n))
            views.append(view)
            pos += n
        s = _Streamed(u, index, params, offsets, master, views, False, numel, leaves=leaves)
        if packed:
            segs = [(p, "data", p.data) for p in packed] + [(o, a, getattr(o, a)) for p in packed
                                                             for o, a in _streamed_aux(p)]
            sizes = [-(-t.numel() * t.element_size() // 16) * 16 for _, _, t in segs]  # 16-byte aligned
            s.packed_master = torch.empty(sum(sizes), dtype=torch.uint8)
            if self.cuda:
                self.pins.pin(s.packed_master)
            pos = 0
            for (owner, attr, t), size in zip(segs, sizes):
                nb = t.numel() * t.element_size()
                view = s.packed_master[pos:pos + nb].view(t.dtype).view(t.shape)
                view.copy_(t)
                setattr(owner, attr, view)
                s.packed.append((owner, attr, pos, nb, t.dtype, t.shape))
                self._streamed_aux.add(id(view))
                pos += size
        _return_freed_memory()  # glibc keeps freed heap pages: give the originals back now
        self._set_trainable(s)
        return s

    @staticmethod
    def _set_trainable(s: _Streamed) -> None:
        """The written-back prefix: up to the last trainable parameter (adapters, selected
        parameters); a frozen unit is never written back (upload only)."""
        ends = [start + n for (_, p), (start, n) in zip(s.params, s.offsets) if p.requires_grad]
        s.trainable = bool(ends)
        s.n_write = max(ends, default=0)

    def _make_slot(self, numel: int) -> _Slot:
        if self.transfer == "same":
            flat = torch.empty(numel, dtype=self.dtype, device=self.device)
            self.meter.alloc(flat.numel() * flat.element_size(), "slots")
            return _Slot(flat)
        slot = _Slot(None)
        if self.transfer in ("bf16", "fp16"):
            slot.enc = torch.empty(numel, dtype=_CODEC_DTYPE[self.transfer], device=self.device)
        elif self.transfer == "int8":
            slot.enc = torch.empty(numel, dtype=torch.int8, device=self.device)
            slot.scales = torch.empty(-(-numel // INT8_BLOCK), dtype=torch.float32, device=self.device)
        for t in (slot.enc, slot.scales):
            if t is not None:
                self.meter.alloc(t.numel() * t.element_size(), "slots")
        return slot

    def refresh_trainable(self) -> None:
        for s in self.streamed:
            self._set_trainable(s)

    # -- streams ------------------------------------------------------------------------
    def _stream(self, which: str):
        if not self.cuda:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.up_stream if which == "up" else self.wb_stream)

    def _record(self, which: str):
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self.up_stream if which == "up" else self.wb_stream if which == "wb"
                  else torch.cuda.current_stream(self.device))
        return ev

    def _wait(self, which: str, ev) -> None:
        if ev is None or not self.cuda:
            return
        stream = {"up": self.up_stream, "wb": self.wb_stream}.get(which) or torch.cuda.current_stream(self.device)
        stream.wait_event(ev)

    # -- the pass -----------------------------------------------------------------------
    def is_streamed(self, module: nn.Module) -> bool:
        return id(module) in self._by_module

    def units(self, module: nn.Module) -> list[_Streamed]:
        """The streamed units of block ``module`` (one, or its groups; none for a resident one)."""
        return self._by_module.get(id(module), [])

    def group(self, leaf: nn.Module) -> _Streamed | None:
        """The group holding ``leaf`` (None outside grouped blocks)."""
        return self._by_leaf.get(id(leaf))

    def _upload(self, s: _Streamed) -> _Slot:
        """Issue the upload of ``s`` into the next slot in round-robin order: the slot of the unit
        acquired ``k - 1 = d`` uploads ago, whose compute is issued (never the one in use)."""
        slot = self.slots[self._rr % len(self.slots)]
        if slot.in_use:
            slot = next(x for x in self.slots if not x.in_use)
        self._rr += 1
        if slot.unit is not None:  # evict a prefetched unit (only after an out-of-order acquire)
            self._holder.pop(slot.unit.index, None)
        self._settle_delta(s)  # a lossy codec's last change must reach the master first
        n = s.numel
        with self._stream("up"):
            self._wait("up", slot.free_after)  # the previous occupant is written back
            self._wait("up", s.writeback_event)  # the master holds this unit's last update
            if self.transfer == "same":
                slot.flat[:n].copy_(s.master, non_blocking=True)
                sent = n * s.master.element_size()
            elif self.transfer in ("bf16", "fp16"):
                host = s.master.to(_CODEC_DTYPE[self.transfer])  # encode on the host
                if self.cuda:
                    host = host.pin_memory()
                slot.enc[:n].copy_(host, non_blocking=True)
                sent = n * 2
            else:
                from zoft.kernels.codec8 import quantize8

                q, scales = quantize8(s.master, INT8_BLOCK)
                if self.cuda:
                    q, scales = q.pin_memory(), scales.pin_memory()
                slot.enc[:n].copy_(q, non_blocking=True)
                slot.scales[:scales.numel()].copy_(scales, non_blocking=True)
                sent = n + 4 * scales.numel()
            if s.packed_master is not None:  # packed bytes as they are
                slot.packed[:s.packed_master.numel()].copy_(s.packed_master, non_blocking=True)
                sent += s.packed_master.numel() * s.packed_master.element_size()
            slot.ready = self._record("up")
        slot.unit = s
        self._holder[s.index] = slot
        self.stats.uploads += 1
        self.stats.upload_bytes += sent
        return slot

    def acquire(self, s: _Streamed) -> None:
        """Make a streamed unit's weights resident and issue the uploads of the next ``d`` streamed
        units, wrapping into the next pass at the tail."""
        slot = self._holder.get(s.index)
        if slot is None:  # not prefetched (first pass, or called out of order): upload now
            if self._rr:
                self.stats.stalls += 1
            slot = self._upload(s)
        slot.in_use = True
        S = len(self.streamed)
        for j in range(1, self.prefetch + 1):  # prefetch <= S - 1: never s itself
            t = self.streamed[(s.index + j) % S]
            if t.index not in self._holder:
                self._upload(t)
        self._wait("compute", slot.ready)
        flat = slot.flat
        if flat is None:  # decode on the compute stream into the one decoded buffer
            flat = self.decoded
            flat[:s.numel].copy_(self._decoded(slot, s.numel))
        for (_, p), (start, n) in zip(s.params, s.offsets):
            p.data = flat[start:start + n].view(p.shape)
        for owner, attr, start, nb, dt, shape in s.packed:
            setattr(owner, attr, slot.packed[start:start + nb].view(dt).view(shape))

    def release(self, s: _Streamed, write: bool | None) -> None:
        """The unit's compute is issued: point it at its master, after writing the slot back if
        ``write`` (``True``: now, and the master is at ``version``; ``False``: never, the slot
        is dropped; ``None``: once the unit is ``writeback_every`` updates ahead of its master)."""
        slot = self._holder.pop(s.index)
        n = s.n_write
        if write is None:
            write = s.version - s.master_version >= self.writeback_every
        if write and s.trainable:
            s.master_version = s.version
            delta = None
            if self.transfer != "same":  # lossy upload: the change made on the device, on the
                # compute stream (the next unit decodes into the same buffer after it)
                delta = self.decoded[:n] - self._decoded(slot, n)
                self.meter.observe(2 * n * delta.element_size())
            done = self._record("compute")
            with self._stream("wb"):
                self._wait("wb", done)
                if delta is None:
                    s.master[:n].copy_(slot.flat[:n], non_blocking=True)
                else:  # the host adds it to the master before the unit's next upload
                    s.pending_delta = torch.empty(n, dtype=delta.dtype, pin_memory=self.cuda)
                    s.pending_delta.copy_(delta, non_blocking=True)
                    if self.cuda:
                        delta.record_stream(self.wb_stream)
                s.writeback_event = self._record("wb")
            slot.free_after = s.writeback_event
            self.stats.writebacks += 1
            self.stats.writeback_bytes += n * s.master.element_size()
            if not self.cuda:
                self._settle_delta(s)
        else:
            slot.free_after = self._record("compute")
        slot.unit = None
        slot.in_use = False
        self._point_home(s)

    @staticmethod
    def _point_home(s: _Streamed) -> None:
        for (_, p), view in zip(s.params, s.host_views):
            p.data = view
        for owner, attr, start, nb, dt, shape in s.packed:
            setattr(owner, attr, s.packed_master[start:start + nb].view(dt).view(shape))

    def _decoded(self, slot: _Slot, n: int) -> torch.Tensor:
        if self.transfer == "int8":
            from zoft.kernels.codec8 import dequantize8

            nb = -(-n // INT8_BLOCK)
            return dequantize8(slot.enc[:n], slot.scales[:nb], INT8_BLOCK, (n,), self.dtype)
        return slot.enc[:n].to(self.dtype)

    def _settle_delta(self, s: _Streamed) -> None:
        if s.pending_delta is None:
            return
        if s.writeback_event is not None:
            s.writeback_event.synchronize()  # long done: it was issued a whole pass ago
        s.master[:s.pending_delta.numel()].add_(s.pending_delta)
        s.pending_delta = None

    def abandon(self) -> None:
        """Forget prefetched slots (after an exception or a partial pass): the next pass restarts
        at the first streamed unit. A slot is its master plus updates the engine can re-apply,
        so nothing is lost."""
        for slot in self.slots:
            if slot.unit is not None and slot.in_use:  # an acquired unit whose release never came
                self._point_home(slot.unit)
            slot.unit = None
            slot.in_use = False
        self._holder.clear()

    def synchronize(self) -> None:
        """Wait for every transfer and fold lossy deltas into the masters (before save/eval/exit)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for s in self.streamed:
            self._settle_delta(s)

    def close(self) -> None:
        """Wait, forget the slots, unpin, and bring the resident units and every buffer back to the
        host: the model is then whole on the host (where streamed blocks' masters are), one
        device for whatever reads it next (evaluation, attacks, ``save_pretrained``)."""
        self.synchronize()
        self.abandon()
        self.pins.release()
        if self.cuda:
            host = torch.device("cpu")
            for _, p in self.model.named_parameters():
                if p.device != host:
                    p.data = p.data.to(host)
                if not p.dtype.is_floating_point:
                    _aux_to(p, host, skip=set())
            for m in self.model.modules():
                for n, b in list(m.named_buffers(recurse=False)):
                    if b.device != host:
                        m._buffers[n] = b.to(host)
        self.meter.clear()  # nothing of this model is on the device now


_CODEC_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _quant_aux(p: torch.Tensor) -> list[torch.Tensor]:
    """The quantization constants bitsandbytes keeps beside a packed weight (4-bit: the
    ``quant_state``'s absmax, code and nested state; 8-bit: ``SCB``): they stay on the device."""
    out: list[torch.Tensor] = []
    qs = getattr(p, "quant_state", None)
    while qs is not None:
        out += [t for t in (getattr(qs, "absmax", None), getattr(qs, "code", None), getattr(qs, "offset", None))
                if isinstance(t, torch.Tensor)]
        qs = getattr(qs, "state2", None)
    scb = getattr(p, "SCB", None)
    if isinstance(scb, torch.Tensor):
        out.append(scb)
    return out


def _streamed_aux(p: torch.Tensor) -> list[tuple[Any, str]]:
    """The 4-bit quantization constants that scale with the weight (absmax, one per 64 weights,
    and a nested state's): they stream with the block. The 16-entry code and 8-bit row scales
    are small and stay resident."""
    out = []
    qs = getattr(p, "quant_state", None)
    while qs is not None:
        out += [(qs, a) for a in ("absmax", "offset") if isinstance(getattr(qs, a, None), torch.Tensor)]
        qs = getattr(qs, "state2", None)
    return out


def _aux_to(p: torch.Tensor, device: torch.device, skip: set[int]) -> None:
    """Move the resident quantization constants of ``p`` to ``device`` (not those in ``skip``)."""
    qs = getattr(p, "quant_state", None)
    while qs is not None:
        for a in ("absmax", "offset", "code"):
            t = getattr(qs, a, None)
            if isinstance(t, torch.Tensor) and id(t) not in skip:
                setattr(qs, a, t.to(device))
        qs = getattr(qs, "state2", None)
    if isinstance(getattr(p, "SCB", None), torch.Tensor):
        p.SCB = p.SCB.to(device)


def _return_freed_memory() -> None:
    """``malloc_trim(0)`` where glibc provides it: freed parameter storage goes back to the OS as
    each unit moves into its master, so host RAM stays at ~1x the model, not 1x + what was freed."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


class HostPins:
    """Host buffers page-locked in place (``cudaHostRegister``: exact size; the caching host
    allocator would round up to a power of two), each unregistered once by ``release``.

    Where page-locking is refused (a container's locked-memory limit, an unsupported mapping), the
    buffer stays pageable: copies from it are synchronous and slower but correct, and zoft says so
    once per process."""

    refused_said = False

    def __init__(self) -> None:
        self.ptrs: list[int] = []

    def pin(self, t: torch.Tensor) -> bool:
        if t.numel() == 0:
            return False
        rt = torch.cuda.cudart()
        rc = int(rt.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0))
        if rc != 0:
            _clear_cuda_error()
            if not HostPins.refused_said:
                HostPins.refused_said = True
                print(f"zoft: page-locking host memory was refused (cudaHostRegister error {rc}); streaming "
                      "from pageable memory: correct, but uploads are synchronous and slower", file=sys.stderr)
            return False
        self.ptrs.append(t.data_ptr())
        return True

    def release(self) -> None:
        """Unregister every buffer this object pinned (each once)."""
        if self.ptrs:
            rt = torch.cuda.cudart()
            for ptr in self.ptrs:
                rt.cudaHostUnregister(ptr)
        self.ptrs = []


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last-error state after a refused ``cudaHostRegister``: PyTorch checks
    ``cudaGetLastError`` after its next kernel launch and would report this refusal there. Best
    effort: through the runtime library the process has loaded (``torch.cuda.cudart`` does not
    expose the call)."""
    import ctypes

    for name in ("libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0", "libcudart.so"):
        try:
            ctypes.CDLL(name, mode=getattr(ctypes, "RTLD_NOLOAD", 4) | ctypes.RTLD_GLOBAL).cudaGetLastError()
            return
        except (OSError, AttributeError):
            continue
