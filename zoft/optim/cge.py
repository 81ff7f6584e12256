"""DeepZero's coordinate-wise gradient estimate (CGE) over a coordinate set, with feature reuse.

DeepZero (Chen et al., "DeepZero: Scaling up Zeroth-Order Optimization for Deep Model Training",
ICLR 2024; official code ``OPTML-Group/DeepZero``, ``algorithm/zoo/gradient_estimate.py: cge`` and
``models/distributed_model.py``) estimates the gradient one coordinate at a time:

    g_i = (L(w + mu e_i) - L(w)) / mu          (one-sided, DeepZero's; one base query per step)
    g_i = (L(w + mu e_i) - L(w - mu e_i)) / (2 mu)   (central, ``one_sided=False``)

for every coordinate i of the coordinate set S (all trainable coordinates, or a sparsity mask:
``zoft.optim.zo_grasp``). Here a probe may perturb a *block* B of ``block`` coordinates of one
parameter at once (``e_B = sum_{i in B} e_i``; DeepZero: 1), and every coordinate of B takes the
block's estimate g_B: ``G = sum_B g_B e_B``. The step is then SGD on G over S only:

    b_S <- momentum b_S + G_S   (b starts at G, as torch SGD; entries outside S are left alone)
    w_S <- decay w_S - lr b_S   (decay = 1 - lr weight_decay on parameters that take decay, on S)

(DeepZero hands G to ``torch.optim.SGD`` as ``param.grad``: momentum 0.9, weight decay 5e-4,
lr 0.1 cosine, mu 5e-3. Differences: weight decay here is decoupled (applied to w, not added to G)
and only coordinates in S move, so a sparse run never changes the others.)

**Probes through the engine.** A block is a direction ``e_B``: the optimizer's
``direction_shaper`` (``zoft.optim.directions``) maps the probe's seed, the block's index in the
step's plan, to ``e_B`` for its parameter and to zeros for every other one, so the engine's
ordinary probe batching evaluates CGE (P probes of one step in one forward of P*R rows).

**Feature reuse.** A perturbation of unit k changes only what runs from k on. A step's blocks
are grouped by the engine's units (``bind_engine``) and each unit's blocks form one phase
(``more_probes``); the phase's ``fan_out_at`` is that unit, so the engine runs the units before it
once on the R rows and fans the result out to the phase's probes (``ZOEngine.evaluate``). The
base query rides in the first phase. Each phase recomputes its prefix once (R rows), against
P_k * R rows of the suffix: DeepZero reuses stored features instead; the difference is one
forward of the prefix per unit and step. With a block stack (a Hugging Face model: the attention
mask, built before the first block, reaches every block at R rows) only the last block and the
units after it fan out; an earlier unit's phase runs through the whole model (``_plan``).

**Updates are not seed form.** G is a value per coordinate, not a function of a few seeds, so
the update (``CoordinateUpdate``) carries its coordinates and their applied change explicitly:
``record()`` writes them into the trajectory line (~25 bytes of JSON text per coordinate and
step, where a seed-form line is a few bytes per query) and ``update_from_record`` rebuilds the same update, so replay
re-applies exactly the stored values (bitwise, tested).

**In the registry** (``zoft finetune --optimizer cge``): over every trained coordinate (no mask
from the command line), refused in one line when a step would exceed ``max_queries`` forward
queries (``check_size``, also under ``--dry-run``; an LLM has billions of coordinates: train
fewer with ``--trainable`` / ``--peft``, or raise ``block``), under ``--gpu-mem`` (not tested
streamed) and data-parallel. Masks (ZO-GraSP) go through the Python API (``docs/deepzero.md``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from zoft.engine.probes import Probe, Update
from zoft.errors import UsageError
from zoft.optim.schedule import Schedule, lr_at

Mask = dict[str, torch.Tensor]  # key -> bool tensor of the parameter's shape (True: in the set)


@dataclass
class CGEConfig:
    """CGE options (defaults: DeepZero's ``tools/misc.py``: mu 5e-3, lr 0.1, momentum 0.9,
    weight decay 5e-4, one-sided, one coordinate per probe; DeepZero's schedule is cosine with
    warm-up over its epochs, here ``constant`` unless set).

    block:         coordinates perturbed together by one probe (within one parameter).
    feature_reuse: one phase per unit, fanned out where the unit's perturbation starts
                   (needs the engine's ``layout`` when the optimizer is built; in a block stack
                   only from the last block on).
    max_queries:   the most forward queries a step may take (blocks + base); a larger
                   coordinate set is refused at ``bind`` (a phase's probes share one forward of
                   P x batch rows, so this also bounds a step's activation memory).
    n_queries:     must be 1 (every block is queried once per step); accepted because
                   ``zoft finetune`` passes it to every optimizer.
    """

    lr: float = 0.1
    eps: float = 5e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    one_sided: bool = True
    block: int = 1
    feature_reuse: bool = True
    schedule: Schedule = "constant"
    warmup_steps: int = 0
    max_queries: int = 10_000
    n_queries: int = 1

    def __post_init__(self):
        if self.eps <= 0:
            raise ValueError("eps must be > 0")
        if self.n_queries != 1:
            raise ValueError("n_queries does not apply to cge (every block of the coordinate set is queried once "
                             "per step); leave it 1")
        if self.max_queries < 2:
            raise ValueError("max_queries must be >= 2")
        if self.block < 1:
            raise ValueError("block must be >= 1")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError("momentum must be in [0, 1)")


class CoordinateUpdate(Update):
    """An explicit update: ``w.flat[idx] <- decay * w.flat[idx] + delta`` per key (decay only on
    parameters that take it); coordinates outside ``idx`` are not touched.

    values: key -> (idx (n,) int64, delta (n,) in the parameter's dtype, or fp32 for narrower).
    """

    def __init__(self, values: dict[str, tuple[torch.Tensor, torch.Tensor]], decay: float = 1.0, lr: float = 0.0):
        super().__init__(terms=[], decay=decay)
        self.values = values
        self.lr = lr

    def is_noop(self) -> bool:
        return not self.values

    def apply(self, key: str, w: torch.Tensor, noise: Any, decays: bool) -> None:
        entry = self.values.get(key)
        if entry is None:
            return
        idx, delta = entry
        flat = w.view(-1)  # a parameter is contiguous; a view so the write lands in w
        idx = idx.to(w.device)
        delta = delta.to(device=w.device, dtype=w.dtype)
        if decays and self.decay != 1.0:
            flat[idx] = flat[idx] * self.decay + delta
        else:
            flat.index_add_(0, idx, delta)

    def record(self) -> dict:
        """The trajectory line: every coordinate and its change, explicitly."""
        return {"terms": [], "decay": self.decay, "lr": self.lr,
                "coords": {k: [i.tolist(), d.tolist(), str(d.dtype).removeprefix("torch.")]
                           for k, (i, d) in self.values.items()}}


class CGE:
    """Coordinate-wise gradient estimation (DeepZero) over ``mask`` (None: every trainable
    coordinate; a dict key -> bool tensor, keys absent from it dense; or a callable
    ``step -> dict``, e.g. ``zoft.optim.zo_grasp.LayerwiseRandomMask``). The engine's layout
    (``bind_engine``, called by ``zoft.optim.bind``) groups the blocks by unit for feature reuse.
    """

    name = "cge"
    paper = "Chen et al., DeepZero: Scaling up Zeroth-Order Optimization for Deep Model Training (ICLR 2024)"
    memory_copies = 1  # the momentum buffer (0 with momentum 0)
    streams = False  # refused under --gpu-mem: no streamed == resident test
    replays = True  # the trajectory stores every coordinate's change (tests/test_deepzero.py)
    data_parallel = "no: a step's phases (one per unit) would each need an all-gather"

    @property
    def stateful(self) -> bool:
        """True: explicit updates (``CoordinateUpdate.apply``), not seed-form (``ZOSGD.stateful``)."""
        return True

    @classmethod
    def state_kind(cls) -> str:
        return ("stored: the momentum buffer, 1 fp32 buffer per trained parameter, on the host; updates are "
                "explicit (every coordinate's change in the trajectory, ~25 B of JSON per coordinate and step)")

    def __init__(self, config: CGEConfig, seed: int = 0, total_steps: int = 1,
                 mask: Mask | Callable[[int], Mask] | None = None):
        self.config = config
        self.seed = seed
        self.total_steps = total_steps
        self.layout: Any = None
        self.mask = mask
        self._params: dict[str, torch.Tensor] | None = None
        self._zeros: dict[tuple, torch.Tensor] = {}  # read-only zero directions by (shape, dtype, device)
        self.momentum_buf: dict[str, torch.Tensor] = {}
        self._blocks: list[tuple[str, torch.Tensor]] = []  # the step's plan: block -> (key, flat idx)
        self._phases: list[tuple[str | None, list[int]]] = []  # (fan-out unit, block ids)

    # -- binding and directions ------------------------------------------------------------
    def bind(self, params: dict[str, torch.Tensor], noise: Any) -> None:
        self._params = params

    def bind_engine(self, engine: Any) -> None:
        if engine.offload is not None:
            raise UsageError("cge has no streamed == resident test (its explicit coordinate updates are not "
                             "checked under block streaming); drop --gpu-mem")
        first = self.layout is None
        self.layout = engine.layout
        if first and not callable(self.mask):  # refused before step 0 (a per-step mask: when each step is planned)
            self.check_size({k: idx.numel() for k, idx in self.coordinates(0).items()})

    def check_size(self, sizes: dict[str, int]) -> None:
        """Refuse in one line (``UsageError``) a coordinate set of ``sizes`` (key -> coordinates of
        that parameter in the set) whose step would take more than ``max_queries`` forward queries.
        Called on the set when bound and planned, and by ``zoft.resolve.resolve_run`` on the trained
        parameters read from the model's config, so ``zoft finetune`` and its ``--dry-run`` refuse
        before loading anything."""
        n = sum(-(-k // self.config.block) for k in sizes.values())
        queries = n + 1 if self.config.one_sided else 2 * n
        if queries > self.config.max_queries:
            raise UsageError(f"cge queries each block of trained coordinates separately: {queries} forward queries "
                             f"per step here, above max_queries {self.config.max_queries}; train fewer parameters "
                             "(--trainable, --peft), raise block, or raise optimizer_options max_queries")

    def num_probes(self) -> int:
        """Probes of the largest phase of the last planned step (one forward of that many times the
        batch's rows); 2 before any step is planned."""
        return max((len(self._phase_probes(i)) for i in range(len(self._phases))), default=2)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def direction_shaper(self):
        return self.direction

    def direction(self, noise: Any, seed: int, key: str, like: torch.Tensor) -> torch.Tensor:
        """``e_B`` of block ``seed`` on its parameter, zeros on every other (fp32; fp64 for fp64)."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        bkey, idx = self._blocks[seed]
        if bkey != key:
            z = self._zeros.get((like.shape, dtype, like.device))
            if z is None:
                z = self._zeros[(like.shape, dtype, like.device)] = torch.zeros(like.shape, dtype=dtype, device=like.device)
            return z
        e = torch.zeros(like.numel(), dtype=dtype, device=like.device)
        e[idx.to(like.device)] = 1.0
        return e.view(like.shape)

    def lr(self, step: int) -> float:
        c = self.config
        return lr_at(step, c.lr, c.schedule, self.total_steps, c.warmup_steps)

    # -- the plan of a step ------------------------------------------------------------------
    def coordinates(self, step: int) -> dict[str, torch.Tensor]:
        """The coordinate set at ``step``: key -> sorted flat indices (int64), trainable keys only."""
        if self._params is None:
            raise RuntimeError("cge: call zoft.optim.bind(optimizer, engine) first (zoft.optim.step does it)")
        mask = self.mask(step) if callable(self.mask) else self.mask
        for k, m in (mask or {}).items():
            if k not in self._params or tuple(m.shape) != tuple(self._params[k].shape):
                raise UsageError(f"cge: the mask of {k!r} matches no trainable parameter of that shape "
                                 "(keys are engine.params' names)")
        out = {}
        for k, p in self._params.items():
            m = None if mask is None else mask.get(k)
            out[k] = (torch.arange(p.numel()) if m is None
                      else torch.nonzero(m.reshape(-1).cpu(), as_tuple=False).reshape(-1))
        return out

    def _plan(self, step: int) -> None:
        coords = self.coordinates(step)
        self.check_size({k: idx.numel() for k, idx in coords.items()})
        b = self.config.block
        if self.config.feature_reuse and self.layout is not None:
            groups: list[tuple[str | None, list[str]]] = []
            units = self.layout.units
            units_of: dict[str, int] = {}
            for u in units:
                for k in {k for k, _ in u.params}:
                    units_of[k] = units_of.get(k, 0) + 1
            # a block stack (a Hugging Face model) is no chain: the model builds the attention mask
            # (and positions, ALiBi) from the batch's R rows before its first block and hands it to
            # every block, so a fan-out at a block leaves the later blocks' at R rows against P*R
            # hidden rows (a shape error on either granularity; eager attention: unpadded too). The
            # last block (whose own inputs the fan-out repeats) and the units after it (final norm,
            # head: the hidden state alone) fan out; an earlier unit's phase runs the whole model.
            last = max((i for i, u in enumerate(units) if u.kind == "block"), default=0)
            seen: set[str] = set()
            for i, u in enumerate(units):
                # a key once, also one a unit holds twice (BERT's head: ``bias`` is ``decoder.bias``)
                keys = list(dict.fromkeys(k for k, _ in u.params if k in coords and k not in seen))
                seen.update(keys)
                if keys:  # a key in two units (tied) may run first in either: no fan-out for it
                    fans = i >= last and all(units_of[k] == 1 for k in keys)
                    groups.append((u.name if fans else None, keys))
        else:
            groups = [(None, list(coords))]
        self._blocks, self._phases = [], []
        for unit, keys in groups:
            ids = []
            for k in keys:
                idx = coords[k]
                for lo in range(0, idx.numel(), b):
                    ids.append(len(self._blocks))
                    self._blocks.append((k, idx[lo:lo + b]))
            if ids:
                self._phases.append((unit, ids))

    def _phase_probes(self, i: int) -> list[Probe]:
        eps = self.config.eps
        ids = self._phases[i][1]
        if self.config.one_sided:
            return ([Probe(None, 0.0)] if i == 0 else []) + [Probe(b, eps) for b in ids]
        return [p for b in ids for p in (Probe(b, eps), Probe(b, -eps))]

    def probes(self, step: int) -> list[Probe]:
        self._plan(step)
        return self._phase_probes(0) if self._phases else [Probe(None, 0.0)]

    def more_probes(self, step: int, losses: torch.Tensor, comparisons=None) -> list[Probe]:
        done, n = 0, len(losses)
        for i in range(len(self._phases)):
            done += len(self._phase_probes(i))
            if done == n:
                return self._phase_probes(i + 1) if i + 1 < len(self._phases) else []
        return []

    def fan_out_at(self, step: int, phase: int) -> str | None:
        return self._phases[phase][0] if phase < len(self._phases) else None

    def num_queries(self) -> int:
        """Forward queries of the planned step (all phases)."""
        return sum(len(self._phase_probes(i)) for i in range(len(self._phases)))

    # -- the estimate and the update ---------------------------------------------------------
    def block_grads(self, losses: torch.Tensor) -> torch.Tensor:
        """g_B per block, (n_blocks,) fp64, from the losses of all phases in order."""
        if len(losses) != self.num_queries():
            raise RuntimeError(f"cge: {len(losses)} losses for a step of {self.num_queries()} queries: "
                               "run it through zoft.optim.step / zoft.optim.evaluate_step (all phases)")
        eps = self.config.eps
        if self.config.one_sided:
            return (losses[1:] - losses[0]) / eps  # phase order = block order
        return (losses[0::2] - losses[1::2]) / (2 * eps)

    def gradient(self, losses: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """G on the coordinate set: key -> (flat idx, G there (fp64))."""
        g = self.block_grads(losses)
        parts: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for (k, idx), gb in zip(self._blocks, g):
            ii, vv = parts.setdefault(k, ([], []))
            ii.append(idx)
            vv.append(gb.expand(idx.numel()))
        return {k: (torch.cat(ii), torch.cat(vv)) for k, (ii, vv) in parts.items()}

    def update(self, step: int, losses: torch.Tensor) -> tuple[CoordinateUpdate, dict[str, float]]:
        c = self.config
        lr = self.lr(step)
        if not self._blocks:  # an empty coordinate set: nothing to estimate
            return CoordinateUpdate({}), {"loss": losses[0].item(), "lr": lr, "queries": 1.0}
        values = {}
        for k, (idx, g) in self.gradient(losses).items():
            p = self._params[k]
            vdtype = torch.promote_types(p.dtype, torch.float32)
            g = g.to(vdtype)
            if c.momentum:
                buf = self.momentum_buf.get(k)
                if buf is None:
                    buf = self.momentum_buf[k] = torch.zeros(p.numel(), dtype=vdtype)
                buf[idx] = buf[idx] * c.momentum + g  # 0 * m + g = g at a coordinate's first step
                g = buf[idx]
            values[k] = (idx, -lr * g)
        loss = losses[0].item() if c.one_sided else losses.mean().item()
        return (CoordinateUpdate(values, 1.0 - lr * c.weight_decay, lr),
                {"loss": loss, "lr": lr, "queries": float(len(losses))})

    def update_from_record(self, record: dict) -> Update:
        """The stored update of a trajectory line (replay: no estimate is recomputed)."""
        coords = record.get("coords")
        if not coords:
            return Update(terms=[], decay=float(record["decay"]))
        values = {k: (torch.tensor(idx, dtype=torch.int64), torch.tensor(delta, dtype=getattr(torch, dtype)))
                  for k, (idx, delta, dtype) in coords.items()}  # JSON floats hold fp32/fp64 values exactly
        return CoordinateUpdate(values, float(record["decay"]), float(record.get("lr", 0.0)))

    # -- state -------------------------------------------------------------------------------
    def tensor_state(self) -> dict[str, torch.Tensor]:
        return {f"momentum/{k}": v for k, v in self.momentum_buf.items()}

    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.momentum_buf = {name.split("/", 1)[1]: v for name, v in tensors.items()}
