"""The offload planner: from a device budget, a model config and a batch shape, decide what stays
resident, how many static slots stream the rest, the prefetch depth and the micro-batch; predict
peak device bytes, CPU RAM and a step-time lower bound. Nothing here loads weights: the model is
built on the meta device (shapes only), so OPT-175B plans in seconds with no memory.

Units: bytes everywhere; "GB" means 10^9 bytes, "GiB" 2^30 (``zoft.config.parse_size``).
The formulas are in ``docs/plan.md``; every term below names its formula in a comment.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Literal

import torch

from zoft.engine.precision import perturb_bytes, update_bytes
from zoft.errors import UsageError
from zoft.noise import TABLE_SIZE
from zoft.tasks.head import head_chunk_bytes

Dtype = Literal["fp16", "bf16", "fp32"]
Transfer = Literal["same", "bf16", "fp16", "int8"]
Attention = Literal["sdpa", "eager"]
Scratch = Literal["leaf", "unit"]
Noise = Literal["torch", "table", "triton"]
_DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
INT8_GROUP = 256  # int8 codec: one fp32 scale per 256 consecutive elements of a unit's flat buffer
MIN_PREFETCH = 2  # uploads run d >= 2 units ahead; k = d + 1 slots (d in flight + 1 computing)
MAX_WRITEBACK_EVERY = 64  # the planner's largest write-back interval (updates re-applied per upload < 64)
HEAD_CHUNK_MIN = 64  # the fewest positions per head call the planner picks (each call re-perturbs the head)
GB = 10**9


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a model, read from its meta-device layout."""

    name: str
    n_params: int  # every parameter once (tied ones once)
    nonblock_numel: int  # embeddings, final norm, head (tied once): always resident
    block_numel: int  # the largest block (blocks are one class; sizes are equal in practice)
    n_blocks: int
    max_unit_numel: int  # the largest unit (a tied weight counts in each unit holding it)
    tied_numel: int  # parameters shared by two units (input embedding = LM head)
    hidden: int
    ffn: int
    heads: int
    vocab: int
    block_linear_numel: int = 0  # weights of the nn.Linear layers of a block (what bitsandbytes packs)
    block_linear_rows: int = 0  # their output features, summed (8-bit: one fp32 scale per row)
    block_linears: int = 0  # how many nn.Linear layers a block holds
    max_param_numel: int = 0  # the largest parameter (what one update draws z for at once)
    max_leaf_numel: int = 0  # the most parameters one perturbed module holds (a leaf; a unit on the unit path)
    block_leaves: tuple[int, ...] = ()  # the largest block's leaves' parameters, in call order (groups)


@dataclass(frozen=True)
class Plan:
    """One placement. All ``*_bytes`` fields are bytes; times are seconds."""

    model: str
    gpu_mem_bytes: int
    batch_size: int
    max_length: int
    num_probes: int
    dtype: str
    transfer: str
    attention: str
    scratch: str
    write_back: bool
    n_params: int
    n_blocks: int
    resident_blocks: int  # blocks 0 .. resident_blocks-1 stay on the device
    streamed_blocks: int
    slots: int  # k static device slots for streamed blocks (0 when nothing streams)
    prefetch: int  # d: uploads in flight ahead of the computing unit (0 when nothing streams)
    micro_batch: int  # rows per micro-batch (per probe); every unit runs ceil(rows/mb) of them
    n_micro: int
    resident_weights_bytes: int
    slot_bytes: int
    scratch_bytes: int
    boundary_act_bytes: int
    working_act_bytes: int
    logits_bytes: int
    update_bytes: int  # transients of applying an update to the largest parameter
    peak_device_bytes: int
    min_budget_bytes: int  # peak of the smallest plan (0 resident blocks, k = 3, mb = 1)
    cpu_bytes: int
    upload_bytes_per_step: int
    writeback_bytes_per_step: int
    t_compute_s: float
    t_transfer_s: float
    step_time_lb_s: float
    h2d_gbps: float
    tflops: float
    quant: str = "none"  # bitsandbytes-packed blocks ("4bit", "8bit"): moved as they are
    rows: int = 0  # rows per probe the model runs for batch_size examples (B; B x candidates, ...)
    writeback_every: int = 1  # a streamed block is written back once per this many updates
    t_regen_s: float = 0.0  # re-applying the updates its master lacks after each upload, per step
    regen_gbps: float = 800.0  # weight bytes per second one re-applied update sweeps on the device
    group_bytes: int | None = None  # streaming groups of a block's leaves of at most this (None: whole blocks)
    head_chunk: int | None = None  # positions per head call (None: all logits at once)
    noise: str = "torch"  # the noise backend (a device-resident table counts in the resident bytes)
    noise_bytes: int = 0  # the noise table on the device

    @property
    def activation_bytes(self) -> int:
        """Boundary activations plus the largest of what never coexists: a block's working set,
        the head's logits (a chunk's with ``head_chunk``), and an update's transients (applied
        before the module runs)."""
        return self.boundary_act_bytes + max(self.working_act_bytes, self.logits_bytes, self.update_bytes)

    @property
    def bound(self) -> str:
        return "transfer" if self.t_transfer_s > self.t_compute_s + self.t_regen_s else "compute"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["activation_bytes"] = self.activation_bytes
        d["bound"] = self.bound
        return d


# -- model shape ------------------------------------------------------------------------------
def _cfg_int(config: Any, *names: str, default: int | None = None) -> int:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and v > 0:
            return v
    if default is None:
        raise UsageError(f"cannot plan {type(config).__name__}: none of {names} is set in the config")
    return default


def shape_from_config(config: Any, name: str = "model") -> ModelShape:
    """Build the model on the meta device and read its unit layout (no memory, no weights)."""
    from zoft.models.layout import call_order, discover_layout, leaves, unit_path
    from zoft.models.loading import _auto_class, model_kind

    with torch.device("meta"):
        model = _auto_class(model_kind(config)).from_config(config)
    layout = discover_layout(model)
    seen: set[str] = set()
    counts: dict[str, int] = {}
    for u in layout.units:
        for k in {k for k, _ in u.params}:
            counts[k] = counts.get(k, 0) + 1
    numel = {k: p.numel() for u in layout.units for k, p in u.params}
    nonblock = 0
    for u in layout.units:
        if u.kind != "block":
            for k, _ in u.params:
                if k not in seen:
                    seen.add(k)
                    nonblock += numel[k]
    unit_numel = [sum(numel[k] for k in {k for k, _ in u.params}) for u in layout.units]
    hidden = _cfg_int(config, "hidden_size", "d_model", "n_embd")
    linears = [m for m in max(layout.blocks, key=lambda u: u.numel).module.modules() if isinstance(m, torch.nn.Linear)]

    def own(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters(recurse=False))

    # what one perturbed module holds (``zoft.engine.core``: a leaf, or a whole unit on the unit path)
    perturbed = [unit_numel[i] if unit_path(model, u) else max((own(m) for _, m in leaves(u.module)), default=0)
                 for i, u in enumerate(layout.units)]
    biggest = max(layout.blocks, key=lambda u: u.numel)
    block_leaves = tuple(own(m) for m in call_order(model, biggest.module)) if leaves(biggest.module) else ()
    return ModelShape(
        name=name,
        n_params=sum(numel.values()),
        nonblock_numel=nonblock,
        block_numel=max(u.numel for u in layout.blocks),
        n_blocks=len(layout.blocks),
        max_unit_numel=max(unit_numel),
        tied_numel=sum(numel[k] for k, c in counts.items() if c > 1),
        hidden=hidden,
        ffn=_cfg_int(config, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden),
        heads=_cfg_int(config, "num_attention_heads", "n_head"),
        vocab=_cfg_int(config, "vocab_size"),
        block_linear_numel=sum(m.weight.numel() for m in linears),
        block_linear_rows=sum(m.out_features for m in linears),
        block_linears=len(linears),
        max_param_numel=max(numel.values()),
        max_leaf_numel=max(perturbed),
        block_leaves=block_leaves,
    )


@lru_cache(maxsize=8)
def _shape_of_name(name: str) -> ModelShape:
    from zoft.models.loading import resolve

    _, config = resolve(name)
    return shape_from_config(config, name)


# -- accounting -------------------------------------------------------------------------------
def _encoded_bytes(numel: int, transfer: str, dtype_bytes: int) -> int:
    """Bytes of one unit's flat buffer as it crosses the link."""
    if transfer == "int8":
        return numel + 4 * math.ceil(numel / INT8_GROUP)
    if transfer in ("bf16", "fp16"):
        return 2 * numel
    return dtype_bytes * numel


def _block_bytes(s: ModelShape, b: int, quant: str) -> int:
    """Bytes of one block's weights as stored and moved: bitsandbytes packs the nn.Linear weights
    (4-bit: two per byte, plus one fp32 absmax per 64 weights, which streams with them; 8-bit: one
    per byte); the rest (norms, biases) stays in the dtype."""
    if quant == "none":
        return b * s.block_numel
    lin = s.block_linear_numel
    packed = -(-lin // 2) + 4 * -(-lin // 64) if quant == "4bit" else lin
    return b * (s.block_numel - lin) + packed


def _block_aux(s: ModelShape, quant: str) -> int:
    """Quantization constants of one block that stay on the device (4-bit: a 16-value fp32 code
    per layer; 8-bit: one fp32 scale per output row)."""
    if quant == "4bit":
        return 64 * s.block_linears
    return 4 * s.block_linear_rows if quant == "8bit" else 0


def _z_mode(noise: str, device: str) -> str:
    """How ``noise`` makes z on ``device`` (``zoft.noise``'s ``z_mode``): the torch generator's
    CUDA stream cannot be cut (drawn whole), Philox is fused on CUDA, the rest go in pieces."""
    if noise == "triton" and device == "cuda":
        return "fused"
    return "whole" if noise == "torch" and device == "cuda" else "pieces"


def _device_bytes(s: ModelShape, r: int, mb: int, *, B: int, T: int, P: int, b: int,
                  transfer: str, attention: str, scratch: str, write_back: bool = True,
                  quant: str = "none", adapters: bool = False, group: int | None = None,
                  head_chunk: int | None = None, noise: str = "torch", device: str = "cuda",
                  stateful: bool = False, whole_z: str = "none") -> dict[str, int]:
    """Peak device bytes of the plan with ``r`` resident blocks, micro-batch ``mb`` (rows per
    probe a block runs at once; ``mb >= B``: all probes' rows together), streaming groups of at
    most ``group`` bytes (None: whole blocks) and ``head_chunk`` positions per head call."""
    streamed = s.n_blocks - r
    k = MIN_PREFETCH + 1 if streamed else 0
    blk = _block_bytes(s, b, quant)
    mode = _z_mode(noise, device)
    table = 4 * TABLE_SIZE if noise == "table" else 0  # fp32, built on the device at first use
    resident = b * s.nonblock_numel + r * blk + s.n_blocks * _block_aux(s, quant) + table
    # a streamed unit: a whole block, or the largest group of a block's leaves
    unit = s.block_numel if group is None else _largest_group(s.block_leaves, group // b)
    if not streamed:
        slots = 0
    elif transfer == "same":
        slots = k * (blk if group is None else b * unit)  # k slots as the units are stored
    else:  # k slots hold encoded units; one more buffer holds the decoded unit being computed
        slots = k * _encoded_bytes(unit, transfer, b) + b * unit
    # perturbation scratch (``zoft/engine/core.py``): one perturbed module's copy at a time (a
    # leaf; a whole unit on the unit path or with ``scratch="unit"``), its z made in pieces
    # (``perturb_into``: a piece of z and its cast, or nothing with the fused Philox kernel)
    held = s.max_leaf_numel if scratch == "leaf" and s.max_leaf_numel else s.max_unit_numel
    # (a shaped or composite direction is one whole tensor: ``zoft.optim.directions.whole_z``)
    scratch_b = b * held + perturb_bytes(held, b, "whole" if whole_z != "none" else mode)
    if adapters:
        # only adapter parameters are perturbed: their scratch is adapter-sized (not counted)
        scratch_b = 0
    if streamed and transfer != "same" and write_back:
        # a lossy codec writes back the change made on the device: decoded - decode(upload),
        # two unit-sized temporaries at the unit's release (zoft/engine/offload.py)
        scratch_b += 2 * b * unit
    H, F, nh, V = s.hidden, s.ffn, s.heads, s.vocab
    # Unit boundary, the whole step's P*B rows: input + per-probe outputs + their concatenation.
    boundary = 3 * P * B * T * H * b
    # Inside a block: a micro-batch of one probe (mb < B), else all P*B rows at once (the leaves
    # split them per probe; parameter-free work runs on all): q, k, v, attention output (4H) and
    # the MLP's up-projection as per-probe outputs and their concatenation (2F); eager attention
    # adds scores + probabilities.
    rows = mb if mb < B else P * B
    working = rows * T * (4 * H + 2 * F) * b
    if attention == "eager":
        working += 2 * rows * nh * T * T * b
    if head_chunk is None:
        # the whole step's P*B rows of logits in the compute dtype, plus two fp32 copies for the
        # loss (``logits.float()`` and cross-entropy's log-softmax)
        logits = P * B * T * V * (b + 8)
    else:  # one chunk's logits and loss temporaries (``zoft.tasks.head.head_chunk_bytes``)
        logits = head_chunk_bytes(P * B, head_chunk, V, b, hidden=H, length=T)
    # Applying the pending update to the largest parameter, before its module runs (never beside
    # its working set or the logits): z in pieces, in registers or whole, and for a 2-byte
    # weight an fp32 piece and one chunk of stochastic rounding (``update_bytes``; a stateful
    # optimizer's update takes a whole fp32 copy). Frozen bases (adapters) update only
    # adapter-sized parameters (not counted, like their scratch).
    update = 0 if adapters else update_bytes(s.max_param_numel or s.max_unit_numel, b,
                                             "whole" if stateful or whole_z == "all" else mode)
    peak = resident + slots + scratch_b + boundary + max(working, logits, update)
    return {"resident": resident, "slots": slots, "k": k, "scratch": scratch_b, "boundary": boundary,
            "working": working, "logits": logits, "update": update, "peak": peak, "table": table,
            "unit": unit}


def _largest_group(leaves: tuple[int, ...], limit: int) -> int:
    """Parameters of the largest group when ``leaves`` (in call order) are packed greedily into
    consecutive groups of at most ``limit`` (a larger leaf alone), as
    ``zoft.models.layout.pack_groups`` packs them."""
    best = size = 0
    for n in leaves:
        size = size + n if size and size + n <= limit else n
        best = max(best, size)
    return best


def _groups(s: ModelShape, b: int, quant: str) -> list[int | None]:
    """Streaming units worth planning, largest first: whole blocks (None), then groups of at most
    half, a quarter, ... of a block's bytes, down to the largest leaf (a quantized base streams
    whole packed blocks). Each is the bytes of the largest group it packs, so that the slots the
    engine allocates for it are the plan's to the byte."""
    out: list[int | None] = [None]
    if quant != "none" or not s.block_leaves:
        return out
    g, floor = b * s.block_numel // 2, b * max(s.block_leaves)
    while g > floor:
        size = b * _largest_group(s.block_leaves, g // b)
        if size != out[-1] and size < b * s.block_numel:
            out.append(size)
        g //= 2
    return out + [floor] if out[-1] != floor else out


def _head_chunks(T: int) -> list[int | None]:
    """Head chunks worth planning, largest first: all positions (None), then T/2, T/4, ... down
    to ``HEAD_CHUNK_MIN`` positions."""
    out: list[int | None] = [None]
    c = T // 2
    while c >= HEAD_CHUNK_MIN:
        out.append(c)
        c //= 2
    return out


def _fit(s: ModelShape, r: int, group: int | None, budget: int, rows: int, kw: dict,
         chunks: list[int | None]) -> tuple | None:
    """The fastest (micro-batch, head chunk) for ``r`` resident blocks and streaming ``group``
    that fits ``budget``, or None. All of a probe's rows at once first (streaming groups allow
    nothing else: a micro-batched block would need its groups once per chunk), else the largest
    micro-batch that fits; then the largest head chunk of ``chunks`` (``_head_chunks``)."""

    def peak(mb: int, c: int | None) -> int:
        return _device_bytes(s, r, mb, group=group, head_chunk=c, **kw)["peak"]

    mbs = [rows] if group is not None or rows == 1 else None
    if mbs is None:
        if peak(rows, chunks[-1]) <= budget:
            mbs = [rows]
        else:  # below B the peak grows with mb: binary search the largest that fits
            lo, hi = 1, rows - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if peak(mid, chunks[-1]) <= budget else (lo, mid - 1)
            mbs = [lo]
    mb = mbs[0]
    c = next((c for c in chunks if peak(mb, c) <= budget), False)
    return None if c is False else (mb, c)


def _smallest(s: ModelShape, rows: int, kw: dict, chunks: list[int | None]) -> tuple[int, int | None]:
    """The smallest peak of any plan (nothing resident, k slots, the last of ``chunks``) and its
    streaming group."""
    c = chunks[-1]
    best = None
    for g in _groups(s, kw["b"], kw["quant"]):
        for mb in ([rows] if g is not None or rows == 1 else [1, rows]):
            p = _device_bytes(s, 0, mb, group=g, head_chunk=c, **kw)["peak"]
            if best is None or p < best[0]:
                best = (p, g)
    return best


def make_plan(config_or_name: Any, gpu_mem_bytes: int | str, *, batch_size: int, max_length: int,
              num_probes: int = 2, dtype: Dtype = "fp16", transfer: Transfer = "same",
              h2d_gbps: float = 25.0, tflops: float = 312.0, attention: Attention = "sdpa",
              scratch: Scratch = "leaf", write_back: bool = True, quant: str = "none",
              adapters: bool = False, rows: int | None = None, writeback_every: int | None = None,
              regen_gbps: float = 800.0, noise: Noise = "torch", device: str = "cuda",
              stateful: bool = False, head_chunks: bool = True, whole_z: str = "none") -> Plan:
    """Plan a streamed ZO step under ``gpu_mem_bytes`` (int bytes, or "18GB" / "16GiB").

    ``rows``: the rows per probe the model runs for ``batch_size`` examples (default: one each; a
    classification task on a causal LM runs one per candidate, ``zoft.tasks.rows_per_probe``). The
    activations, logits, micro-batch and compute time count rows.

    Order of priority: embeddings, final norm and head stay resident; then as many blocks as fit;
    then the largest streaming unit (whole blocks, else groups of a block's leaves down to its
    largest leaf); then the largest micro-batch <= ``batch_size``; then the largest head chunk
    (all positions, else halves down to ``HEAD_CHUNK_MIN``). ``h2d_gbps`` is the pinned
    host-to-device bandwidth in GB/s (10^9 bytes/s), ``tflops`` the device's dense throughput in
    the compute dtype (312: A100 bf16). ``write_back``: full-parameter training writes every
    streamed unit back to the CPU each step (counted on the same link); frozen or adapter-only
    base weights are never written back. ``scratch``: "leaf" (the engine's default
    parameter-granular perturbation: one leaf's perturbed copy at a time) or "unit" (a whole
    unit's, ``ZOEngine(granularity="unit")``). ``noise`` (on ``device``, "cuda" or "cpu"): how z
    is made (``zoft.noise``): the torch generator draws a CUDA z whole, Philox is fused on CUDA,
    and a noise table (268 MB in fp32) is resident on the device. ``stateful``: the optimizer's
    update is not seed-form (``optimizer.stateful``: momentum, Adam moments, re-derived masks):
    its z is drawn whole and a 2-byte weight takes a whole fp32 copy, and the engine writes a
    streamed block back in the residency that applied it (``writeback_every`` None means 1).
    ``whole_z``: where the optimizer's directions are whole tensors rather than the backend's
    pieces (``zoft.optim.directions.whole_z``): "all" (shaped directions: masks, low-rank,
    module-wise, gradient sparsity; every probe and update), "probes" (composite probes: several
    z summed into one tensor) or "none".
    ``writeback_every``: write a streamed block back once per that many updates (None: the ``k``
    in 1..64 with the lowest step-time bound, the smallest on ties; see ``_writeback_every``);
    ``regen_gbps`` is the rate at which the device re-applies one update to a block's weights
    (GB of weights per second: one fused read-and-write pass, z generated in registers).
    ``head_chunks``: the loss can run the LM head in chunks of positions (``zoft.tasks.head``:
    zoft's tasks and unlearning objectives, a causal LM's own loss under ``ZOTrainer``); False
    plans all logits at once (``head_chunk`` None) for a loss that needs them.

    Raises ``UsageError`` naming the smallest budget that fits when none does.
    """
    from zoft.config import AT_LEAST_1, POSITIVE, check_numbers, parse_size

    check_numbers({"batch_size": batch_size, "max_length": max_length, "num_probes": num_probes,
                   "h2d_gbps": h2d_gbps, "tflops": tflops, "writeback_every": writeback_every,
                   "regen_gbps": regen_gbps},
                  {"batch_size": AT_LEAST_1, "max_length": AT_LEAST_1, "num_probes": AT_LEAST_1,
                   "h2d_gbps": POSITIVE, "tflops": POSITIVE, "writeback_every": AT_LEAST_1, "regen_gbps": POSITIVE})
    budget = parse_size(gpu_mem_bytes)
    if dtype not in _DTYPE_BYTES:
        raise UsageError(f"unknown dtype '{dtype}'; use one of {', '.join(_DTYPE_BYTES)}")
    if transfer not in ("same", "bf16", "fp16", "int8"):
        raise UsageError(f"unknown transfer codec '{transfer}'; use same, bf16, fp16 or int8")
    if attention not in ("sdpa", "eager"):
        raise UsageError(f"unknown attention '{attention}'; use sdpa or eager")
    if scratch not in ("leaf", "unit"):
        raise UsageError(f"unknown scratch '{scratch}'; use leaf or unit")
    if noise not in ("torch", "table", "triton"):
        raise UsageError(f"unknown noise backend '{noise}'; use torch, table or triton")
    if quant not in ("none", "4bit", "8bit"):
        raise UsageError(f"unknown quant '{quant}'; use none, 4bit or 8bit")
    if whole_z not in ("none", "probes", "all"):
        raise UsageError(f"unknown whole_z '{whole_z}'; use none, probes or all")
    if quant != "none":
        if transfer not in ("same", dtype):
            raise UsageError("a quantized base moves its packed bytes as they are: use --transfer same")
        adapters = True
    if adapters:
        write_back = False  # the base is frozen; adapters are written back (their bytes are not counted)
    rows = batch_size if rows is None else rows
    check_numbers({"rows": rows}, {"rows": AT_LEAST_1})
    if isinstance(config_or_name, ModelShape):
        s = config_or_name
    elif isinstance(config_or_name, str):
        s = _shape_of_name(config_or_name)
    else:
        s = shape_from_config(config_or_name, getattr(config_or_name, "name_or_path", "") or "model")
    b = _DTYPE_BYTES[dtype]
    if transfer == dtype:
        transfer = "same"  # bf16 over the link for a bf16 model: no codec
    kw = {"B": rows, "T": max_length, "P": num_probes, "b": b, "transfer": transfer,
          "attention": attention, "scratch": scratch, "write_back": write_back, "quant": quant,
          "adapters": adapters, "noise": noise, "device": device, "stateful": stateful, "whole_z": whole_z}

    chunks = _head_chunks(max_length) if head_chunks else [None]
    smallest = _smallest(s, rows, kw, chunks)[0]
    if budget < smallest:
        raise UsageError(
            f"--gpu-mem {_fmt_budget(budget)} cannot fit {s.name}: the smallest plan needs "
            f"{human_bytes(smallest, up=True)} (batch {_batch(batch_size, max_length, rows)}); "
            "raise --gpu-mem or lower --batch-size/--max-length")
    r, g, (mb, chunk) = next((r, g, fit) for r in range(s.n_blocks, -1, -1) for g in _groups(s, b, quant)
                             if (fit := _fit(s, r, g, budget, rows, kw, chunks)) is not None)
    if r == s.n_blocks:
        g = None  # nothing streams
    acc = _device_bytes(s, r, mb, group=g, head_chunk=chunk, **kw)
    streamed = s.n_blocks - r
    upload = streamed * (_encoded_bytes(s.block_numel, transfer, b) if quant == "none" else _block_bytes(s, b, quant))
    full_writeback = streamed * b * s.block_numel if write_back else 0
    t_compute = num_probes * 2 * s.n_params * rows * max_length / (tflops * 1e12)
    every = writeback_every or (1 if stateful else _writeback_every(t_compute, upload, full_writeback, h2d_gbps,
                                                                    regen_gbps))
    if not full_writeback:
        every = 1  # nothing is written back: nothing to defer
    writeback = full_writeback // every  # per step, averaged over a write-back interval
    t_regen = _regen_s(full_writeback, every, regen_gbps)
    t_transfer = (upload + writeback) / (h2d_gbps * 1e9)
    return Plan(
        model=s.name, gpu_mem_bytes=budget, batch_size=batch_size, max_length=max_length,
        num_probes=num_probes, dtype=dtype, transfer=transfer, attention=attention,
        scratch=scratch, write_back=write_back, n_params=s.n_params, n_blocks=s.n_blocks, resident_blocks=r,
        streamed_blocks=streamed, slots=acc["k"], prefetch=MIN_PREFETCH if streamed else 0,
        micro_batch=mb, n_micro=math.ceil(rows / mb), resident_weights_bytes=acc["resident"],
        slot_bytes=acc["slots"], scratch_bytes=acc["scratch"], boundary_act_bytes=acc["boundary"],
        working_act_bytes=acc["working"], logits_bytes=acc["logits"], update_bytes=acc["update"],
        peak_device_bytes=acc["peak"],
        min_budget_bytes=smallest, cpu_bytes=_cpu_bytes(s, b, transfer, acc["k"], quant, acc["unit"]),
        upload_bytes_per_step=upload, writeback_bytes_per_step=writeback, t_compute_s=t_compute,
        t_transfer_s=t_transfer, step_time_lb_s=max(t_compute + t_regen, t_transfer), h2d_gbps=h2d_gbps,
        tflops=tflops, quant=quant, rows=rows, writeback_every=every, t_regen_s=t_regen, regen_gbps=regen_gbps,
        group_bytes=g, head_chunk=chunk, noise=noise, noise_bytes=acc["table"])


def _regen_s(full_writeback: int, every: int, regen_gbps: float) -> float:
    """Device time per step to re-apply the updates the masters lack: a block ``j`` updates past
    its write-back re-applies ``j`` of them after upload, ``j`` cycling through 0..k-1, so
    ``(k - 1) / 2`` per block per step on average, each one pass over the block's weights."""
    return full_writeback * (every - 1) / 2 / (regen_gbps * 1e9)


def _writeback_every(t_compute: float, upload: int, full_writeback: int, h2d_gbps: float,
                     regen_gbps: float) -> int:
    """The write-back interval with the lowest step-time bound
    ``max(t_compute + t_regen(k), (upload + full_writeback / k) / link)``, ``k`` in 1..64."""
    def bound(k: int) -> float:
        return max(t_compute + _regen_s(full_writeback, k, regen_gbps),
                   (upload + full_writeback / k) / (h2d_gbps * 1e9))

    return min(range(1, MAX_WRITEBACK_EVERY + 1), key=lambda k: (bound(k), k)) if full_writeback else 1


def _cpu_bytes(s: ModelShape, b: int, transfer: str, k: int, quant: str = "none", unit: int = 0) -> int:
    """Master weights in the compute dtype (blocks packed for a quantized base), in pinned flat
    per-unit buffers (1x), plus k pinned staging buffers of encoded units (``unit`` elements: a
    block or a group) when a codec is used."""
    staging = k * _encoded_bytes(unit or s.block_numel, transfer, b) if transfer != "same" else 0
    return b * s.nonblock_numel + s.n_blocks * _block_bytes(s, b, quant) + staging


def _batch(batch_size: int, max_length: int, rows: int) -> str:
    """"16 x 128 tokens", with the rows per probe when a task runs more than one per example."""
    return f"{batch_size} x {max_length} tokens" + (f", {rows} rows per probe" if rows != batch_size else "")


_SI = ((10**12, "T"), (10**9, "G"), (10**6, "M"), (10**3, "k"))
_COUNT = ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "k"))  # parameter counts: 1.3B, 125M


def _human(n: float, unit: str, up: bool = False, prefixes=_SI) -> tuple[str, float]:
    """``n`` in the largest prefix it reaches, 2 decimals (rounded up with ``up``): the text and
    the value it stands for."""
    scale, prefix = next(((s, p) for s, p in prefixes if abs(n) >= s), (1, ""))
    if scale == 1:
        return f"{n:.0f} {unit}".strip(), n
    v = math.ceil(n / scale * 100) / 100 if up else round(n / scale, 2)
    return f"{v:.2f} {prefix}{unit}".strip(), v * scale


def human_bytes(n: float, up: bool = False) -> str:
    """Bytes in kB / MB / GB / TB (powers of 10^3), 2 decimals; ``up``: rounded up, so that a
    budget written as the text (``parse_size`` reads it without the space) always fits ``n``."""
    return _human(n, "B", up)[0]


def min_budget_from_message(n: int) -> int:
    """The budget (bytes) that a refusal message names for a smallest plan of ``n`` bytes."""
    return round(_human(n, "B", up=True)[1])


def _fmt_budget(n: int) -> str:
    if n % GB == 0:
        return f"{n // GB}GB"
    if n % 2**30 == 0:
        return f"{n // 2**30}GiB"
    return human_bytes(n).replace(" ", "")


# -- output -----------------------------------------------------------------------------------
_NOISE = {"torch": "torch (a CUDA z is drawn whole)", "table": "table (windows of a resident table)",
          "triton": "triton (z in registers on CUDA)"}


def _secs(t: float) -> str:
    return "0 s" if t == 0 else f"{t:.3f} s" if t >= 1e-3 else f"{t:.2g} s"  # ms and up: 3 decimals


def format_plan(p: Plan) -> str:
    """A short human table (kB, MB, GB: powers of 10^3 bytes)."""
    def gb(n: int) -> str:
        return f"{human_bytes(n):>11}"

    res = f"blocks 0-{p.resident_blocks - 1}" if p.resident_blocks else "none"
    wb = f" + write-back {human_bytes(p.writeback_bytes_per_step)}" if p.write_back else ""
    every = f"every {p.writeback_every} step" + ("s" if p.writeback_every > 1 else "")
    if not p.write_back:
        every += " (nothing written back: frozen base)"
    elif p.writeback_every > 1:
        every += f" (updates re-applied after upload: {_secs(p.t_regen_s)} at {p.regen_gbps:g} GB/s)"
    rows = [
        (f"plan: {p.model} ({_human(p.n_params, '', prefixes=_COUNT)[0].replace(' ', '')} params, "
         f"{p.n_blocks} blocks), --gpu-mem "
         f"{human_bytes(p.gpu_mem_bytes)}, batch {_batch(p.batch_size, p.max_length, p.rows)}, "
         f"{p.num_probes} probes, {p.dtype}" + (f" ({p.quant} base)" if p.quant != "none" else "")
         + f", transfer {p.transfer}, {p.attention} attention"),
        f"  resident         embeddings, final norm, head + {res} ({p.resident_blocks} blocks)",
        (f"  streamed         {p.streamed_blocks} blocks through k={p.slots} slots, prefetch d={p.prefetch}"
         + (f", in groups of leaves <= {human_bytes(p.group_bytes)}" if p.group_bytes and p.streamed_blocks else "")),
        (f"  micro-batch      {p.micro_batch}" + (" rows" if p.rows != p.batch_size else "")
         + f" ({p.n_micro} per step, each unit loaded once per step)"),
        "  device peak (predicted):",
        f"    resident weights   {gb(p.resident_weights_bytes)}",
        f"    stream slots       {gb(p.slot_bytes)}",
        f"    perturb scratch    {gb(p.scratch_bytes)}  (one {p.scratch}'s perturbed copy at a time)",
        (f"    activations        {gb(p.activation_bytes)}  (boundary {human_bytes(p.boundary_act_bytes)}"
         f" + max(block {human_bytes(p.working_act_bytes)}, logits {human_bytes(p.logits_bytes)}"
         + (f" in chunks of {p.head_chunk} positions" if p.head_chunk else "")
         + f", update {human_bytes(p.update_bytes)}))"),
        f"    noise              {_NOISE[p.noise]}" + (f" ({human_bytes(p.noise_bytes)}, in resident weights)"
                                                      if p.noise_bytes else ""),
        (f"    total              {gb(p.peak_device_bytes)}  of {human_bytes(p.gpu_mem_bytes)}"
         f" (smallest plan: {human_bytes(p.min_budget_bytes, up=True)})"),
        f"  CPU RAM          {gb(p.cpu_bytes)}  (pinned master weights, {p.dtype})",
        f"  per step         upload {human_bytes(p.upload_bytes_per_step)}{wb} at {p.h2d_gbps:g} GB/s",
        f"  write-back       {every}",
        (f"  step time >=     {_secs(p.step_time_lb_s)}  ({p.bound}-bound: compute {_secs(p.t_compute_s)}"
         f" at {p.tflops:g} TFLOP/s" + (f" + re-apply {_secs(p.t_regen_s)}" if p.t_regen_s else "")
         + f", transfer {_secs(p.t_transfer_s)})"),
    ]
    return "\n".join(rows)


def plan_json(p: Plan) -> str:
    return json.dumps(p.to_dict(), indent=1)
