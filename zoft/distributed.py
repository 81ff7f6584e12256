"""Data-parallel zeroth-order training over ``torch.distributed``: ranks exchange scalars only.

A ZO step's whole update is a list of (seed, coefficient) pairs, so R workers never exchange
gradients or weights. With R ranks and an n-query optimizer of the ZO-SGD family:

* rank r evaluates its own q queries, global query indices ``r*q .. r*q+q-1`` (seeds
  ``step_seed(seed, step, r*q + i)``), on its own shard of the step's examples: the step's global
  batch is ``batch_indices(n, R*B, step, seed)`` and rank r takes rows ``[r*B, (r+1)*B)``
  (``--batch-size`` B is per rank, like DDP);
* ONE all-gather per step turns every rank's (P,) probe losses into the same (R, P) tensor;
* every rank turns it into the same update with the optimizer of R*q queries: G is the mean
  over ranks of each rank's projected-gradient term, ``G = 1/(R q) sum_r sum_i g_ri u_ri``.

So an R-rank run with ``n_queries = q`` is exactly the single-process n-query estimator with R*q
queries, where query j is evaluated on shard j // q. With R = 1 nothing changes. Stateful
optimizers (momentum, ZO-Adam, R-AdaZO) stay identical on every rank because they see the same
gathered scalars. ZO-RankSGD spreads its m (x n_queries) candidates over the ranks instead, all on
the SAME minibatch (a ranking compares candidates on one batch): ``--batch-size`` is then the
shared batch, every rank loads the same B examples.

Process groups: gloo on CPU, NCCL on CUDA, and under NCCL a gloo side group that carries every
collective zoft runs (scalars and small objects: a timeout or a dead peer then surfaces as gloo's
error, which zoft turns into its one-line message, not as an NCCL watchdog abort); ``torchrun`` (``RANK``/``WORLD_SIZE``/``MASTER_*`` in the
environment) or ``zoft finetune --nproc N`` (``launch_local``: N local worker processes of
``python -m zoft finetune`` with the same environment). Every collective runs under
``TrainConfig.dist_timeout`` seconds; a peer that dies or hangs makes the survivors stop with a
one-line ``ZoftError``. Design and measurements: ``docs/distributed.md``.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from zoft.engine.probes import Probe, Update
from zoft.errors import UsageError, ZoftError

LAUNCHED_ENV = "ZOFT_LAUNCHED"  # set by launch_local in its workers: the parent prints the summary
_TWO_PHASE = "evaluates a second phase that depends on the first phase's all-ranks result"


def env_world_size() -> int:
    """The world size torchrun (or ``launch_local``) put in the environment; 1 when absent."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def is_launched_worker() -> bool:
    """True in a worker process started by ``launch_local`` (whose parent reports the run)."""
    return os.environ.get(LAUNCHED_ENV) == "1"


# -- what runs data-parallel -------------------------------------------------------------------
def check_supported(cfg: Any, world_size: int) -> None:
    """Refuse, with one line, a config that cannot run on ``world_size`` ranks (before any spawn)."""
    if world_size <= 1:
        return
    opts = {"n_queries": cfg.n_queries, **cfg.optimizer_options}
    if cfg.optimizer == "zo-sgd-cons":
        raise UsageError(f"--optimizer zo-sgd-cons {_TWO_PHASE} (w -/+ lr G), but a data-parallel step does one "
                         "all-gather; use another optimizer or --nproc 1")
    if cfg.optimizer == "fzoo":
        raise UsageError("--optimizer fzoo scales its step by the spread of one batch's losses around L(w); a "
                         "data-parallel step would mix the ranks' shards; use another optimizer or --nproc 1")
    if cfg.optimizer == "forward-grad":
        raise UsageError("--optimizer forward-grad runs torch.func.jvp passes, not probe losses the ranks could "
                         "all-gather; use --nproc 1")
    if cfg.optimizer in ("hizoo", "mezo-svrg"):
        from zoft.optim import OPTIMIZERS

        raise UsageError(f"--optimizer {cfg.optimizer} does not run data-parallel "
                         f"({OPTIMIZERS[cfg.optimizer][1].data_parallel.removeprefix('no: ')}); use --nproc 1")
    if cfg.optimizer == "zo-ranksgd":
        from zoft.optim import RankSGDConfig

        if opts.get("line_search", RankSGDConfig.line_search):
            raise UsageError(f"zo-ranksgd with line_search {_TWO_PHASE}, but a data-parallel step does one "
                             "all-gather; set line_search: 0 or use --nproc 1")
        total = int(opts.get("m", RankSGDConfig.m)) * int(opts["n_queries"])
        if world_size > total:
            raise UsageError(f"zo-ranksgd evaluates m * n_queries = {total} candidates per step, fewer than the "
                             f"{world_size} ranks; raise m or use at most {total} ranks")


# -- the process group -------------------------------------------------------------------------
@dataclasses.dataclass
class CommStats:
    """Collective traffic of this rank, counted from the tensors handed to ``torch.distributed``.

    ``bytes_sent``: this rank's payload times the R-1 peers it must reach (what any all-gather
    algorithm sends from this rank, at least); ``bytes_received``: the R-1 peers' payloads.
    """

    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


def _reason(e: BaseException, timeout_s: float) -> str:
    text = " ".join(str(e).split())
    if "Timed out" in text or "timed out" in text or "Timeout" in text:
        return f"no answer from a peer rank within --dist-timeout {timeout_s:g} s (it hangs or died)"
    if "closed by peer" in text or "Connection reset" in text or "Broken pipe" in text:
        return "a peer rank closed its connection (it crashed or was killed)"
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo's "[/path/pair.cc:553]" prefix
    return text[:200] or type(e).__name__


class DistContext:
    """This process's place in the run: ``rank`` of ``world_size``, and the scalar collectives.

    World size 1 (no torchrun, no ``--nproc``) needs no process group and every method is a
    local no-op, so the single-process path does not depend on ``torch.distributed``.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, timeout_s: float = 600.0,
                 device: torch.device | None = None, backend: str | None = None, group: Any = None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.timeout_s = timeout_s
        self.device = device or torch.device("cpu")  # this rank's compute device
        self.backend = backend
        self.group = group  # where the collectives run (a gloo side group under NCCL; None: the default)
        self.stats: dict[str, CommStats] = {}
        self.hint = ""  # appended to failure messages (where the last checkpoint is)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes metrics, checkpoints, loss.png, the trajectory and the progress bar."""
        return self.rank == 0

    def _fail(self, what: str, e: BaseException) -> ZoftError:
        return ZoftError(f"rank {self.rank} of {self.world_size}: {what} failed: {_reason(e, self.timeout_s)}"
                         + (f"; {self.hint}" if self.hint else ""))

    def _count(self, tag: str, payload_bytes: int) -> None:
        s = self.stats.setdefault(tag, CommStats())
        s.calls += 1
        s.bytes_sent += payload_bytes * (self.world_size - 1)
        s.bytes_received += payload_bytes * (self.world_size - 1)

    def all_gather(self, x: torch.Tensor, tag: str = "losses", what: str = "the all-gather") -> torch.Tensor:
        """Every rank's ``x`` (P,) stacked rank-major: (R, P), same dtype, on the CPU. One collective."""
        x = x.detach().reshape(-1)
        if self.world_size == 1:
            return x.reshape(1, -1).cpu()
        import torch.distributed as dist

        local = x.cpu().contiguous()  # gloo (the default group on CPU, the side group under NCCL)
        out = torch.empty(self.world_size * local.numel(), dtype=local.dtype)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        try:
            gather(out, local, group=self.group)
        except RuntimeError as e:  # DistBackendError: a dead peer (immediate) or a hung one (timeout)
            raise self._fail(what, e) from None
        self._count(tag, local.numel() * local.element_size())
        return out.reshape(self.world_size, -1).cpu()

    @contextmanager
    def agree(self, what: str) -> Iterator[None]:
        """Run ``what`` on every rank; if it raised on any rank, raise on every rank (one line each)
        instead of leaving the healthy ranks waiting for the broken one until the timeout."""
        err: BaseException | None = None
        try:
            yield
        except Exception as e:  # noqa: BLE001 - reported to the peers, then re-raised unchanged
            err = e
        if self.world_size > 1:
            import torch.distributed as dist

            msgs: list[Any] = [None] * self.world_size
            mine = None if err is None else (isinstance(err, UsageError), str(err) or type(err).__name__)
            try:
                dist.all_gather_object(msgs, mine, group=self.group)
            except RuntimeError as e:
                if err is None:
                    raise self._fail(what, e) from None
            if err is None:
                bad = next(((r, m) for r, m in enumerate(msgs) if m is not None), None)
                if bad is not None:
                    cls = UsageError if bad[1][0] else ZoftError
                    raise cls(f"rank {bad[0]} stopped while {what}: {bad[1][1]}")
        if err is not None:
            raise err

    def check_identical(self, digest: bytes, what: str, advice: str = "the ranks diverged (a bug: please "
                        "report it with the run's config.yaml)") -> None:
        """All-gather an 8-byte ``digest`` and raise on every rank if any rank's differs from rank 0's."""
        if self.world_size == 1:
            return
        mine = torch.tensor([int.from_bytes(digest[:8], "little", signed=True)], dtype=torch.int64)
        allv = self.all_gather(mine, tag="check", what=f"comparing {what}")[:, 0].tolist()
        bad = [r for r, v in enumerate(allv) if v != allv[0]]
        if bad:
            raise ZoftError(f"{what} differ between rank 0 and rank {bad[0]}: {advice}")

    def close(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def init_distributed(cfg: Any, device: torch.device) -> DistContext:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), or return a world-1 context.

    Backend: NCCL when ``device`` is CUDA (this rank uses GPU ``LOCAL_RANK``), else gloo. The
    rendezvous and every collective wait at most ``cfg.dist_timeout`` seconds.
    """
    world = env_world_size()
    if world <= 1:
        if cfg.nproc > 1:
            raise UsageError("--nproc > 1 needs worker processes: run `zoft finetune --nproc N`, torchrun, "
                             "or zoft.train.finetune (which launches them)")
        return DistContext(timeout_s=cfg.dist_timeout)
    if cfg.nproc not in (1, world):
        raise UsageError(f"--nproc {cfg.nproc} but {world} processes were started (WORLD_SIZE); under torchrun "
                         "leave --nproc at 1")
    check_supported(cfg, world)
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise UsageError("WORLD_SIZE is set but RANK is missing or not an integer; launch with torchrun "
                         "or zoft finetune --nproc N") from None
    import torch.distributed as dist

    backend = "gloo"
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) are "
                             "visible; start at most that many processes per node")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    except (RuntimeError, ValueError) as e:
        raise ZoftError(f"rank {rank} of {world}: could not join the process group at {where} within "
                        f"--dist-timeout {cfg.dist_timeout:g} s: {_reason(e, cfg.dist_timeout)}") from None
    group = None
    if backend == "nccl":  # scalars and objects go over gloo: its errors are zoft's one line
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    return DistContext(rank, world, local_rank, cfg.dist_timeout, device, backend, group)


def weights_digest(model: torch.nn.Module, h: Any = None) -> bytes:
    """blake2b of every trainable parameter's bytes (in ``named_parameters`` order): bit identity."""
    h = h or hashlib.blake2b(digest_size=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and p.device.type != "meta":
                h.update(name.encode())
                h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim too
    return h.digest()


def run_digest(config: dict[str, Any], examples: list[dict], model: torch.nn.Module) -> bytes:
    """What every rank must agree on before step 0: the config (all keys), the training examples
    and the starting weights (a node that read another file or checkpoint is caught here)."""
    import json

    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(json.dumps(examples, sort_keys=True, default=str).encode())
    return weights_digest(model, h)


# -- one data-parallel step --------------------------------------------------------------------
def global_optimizer(opt: Any, world_size: int) -> Any:
    """The optimizer of the whole R-rank step: the same class and options with ``n_queries`` R*q
    (rank r owns queries r*q .. r*q+q-1). ZO-RankSGD is returned as it is (its candidates are split)."""
    if getattr(opt, "ranked", False) or world_size == 1:
        return opt
    cfg = dataclasses.replace(opt.config, n_queries=opt.config.n_queries * world_size)
    return type(opt)(cfg, seed=opt.seed, total_steps=opt.total_steps)


class DataParallel:
    """This rank's share of a step, and the one all-gather that makes every rank's update equal.

    ``local`` is the single-process optimizer built from the config (n_queries = q); ``self.opt``
    is the global one (``global_optimizer``): bind it to the engine, save and load its state.
    """

    def __init__(self, ctx: DistContext, local: Any):
        self.ctx, self.local = ctx, local
        self.ranked = bool(getattr(local, "ranked", False))
        self.opt = global_optimizer(local, ctx.world_size)
        self.shape: tuple[int, int] = (ctx.world_size, 0)  # (R, P) of the last gathered losses
        self._sent = 0  # bytes counted by comm_bytes so far

    def global_batch(self, batch_size: int) -> int:
        """Examples drawn for the whole step from the per-rank ``--batch-size`` B: R*B (ZO-RankSGD: B)."""
        return batch_size if self.ranked else batch_size * self.ctx.world_size

    def shard(self, idx: list[int]) -> list[int]:
        """This rank's part of the step's global batch ``idx`` (``zoft.train.batch_indices`` of
        ``global_batch(B)`` examples): rows [r*B, (r+1)*B); ZO-RankSGD: all of it, on every rank.

        So a rank's data is a pure function of (seed, step, rank, world size), and the R shards
        consume the same per-epoch permutations as one process with batch R*B.
        """
        if self.ranked:
            return idx
        b = len(idx) // self.ctx.world_size
        return idx[self.ctx.rank * b:(self.ctx.rank + 1) * b]

    def examples(self, local: int) -> int:
        """Distinct examples in the step (all ranks) from this rank's count."""
        return local if self.ranked else local * self.ctx.world_size

    def num_probes(self) -> int:
        """How many probes ``probes(step)`` gives this rank (needs no engine: for planning)."""
        if self.ranked:
            return math.ceil(self.opt.num_probes() / self.ctx.world_size)
        return self.local.num_probes()

    def probes(self, step: int) -> list[Probe]:
        """This rank's probes: its q queries (two-sided: 2q; one-sided: L(w) on its shard and q),
        or, for ZO-RankSGD, its contiguous chunk of the ceil(M / R) candidates."""
        allp = self.opt.probes(step)  # also resets the optimizer's per-step direction norms
        R, r = self.ctx.world_size, self.ctx.rank
        if self.ranked:
            chunk = math.ceil(len(allp) / R)
            return allp[r * chunk:(r + 1) * chunk]
        q = self.local.config.n_queries
        if self.local.config.one_sided:
            return [allp[0]] + allp[1 + r * q:1 + (r + 1) * q]
        return allp[2 * r * q:2 * (r + 1) * q]

    def evaluate(self, engine: Any, step: int, batch: Any, objective: Any) -> torch.Tensor:
        """Evaluate this rank's probes on ``batch`` and all-gather: every rank's losses, rank-major,
        flattened to (R*P,) fp64 (ZO-RankSGD: the M candidates' losses, padding dropped)."""
        probes = self.probes(step)
        if self.ranked:
            chunk = math.ceil(len(self.opt.seeds(step)) / self.ctx.world_size)
            local = torch.full((chunk,), float("nan"), dtype=torch.float64)  # last rank may hold fewer
            if probes:
                local[:len(probes)] = engine.evaluate(probes, batch, objective)
        else:
            local = engine.evaluate(probes, batch, objective)  # (P,) fp64
        gathered = self.ctx.all_gather(local, what=f"step {step}'s all-gather of losses")  # (R, P)
        self.shape = tuple(gathered.shape)
        flat = gathered.reshape(-1)
        return flat[:len(self.opt.seeds(step))] if self.ranked else flat

    def update(self, step: int, losses: torch.Tensor) -> tuple[Update, dict[str, float]]:
        """The step's update from the gathered losses (R*P,): identical on every rank."""
        if self.ranked:
            return self.opt.update(step, losses)
        rows = losses.reshape(self.ctx.world_size, -1)  # (R, P)
        grads, plus = zip(*(self.local.projected(row) for row in rows))  # R x (q,)
        grads, plus = torch.cat(grads), torch.cat(plus)  # (R*q,): query j = r*q + i
        lr = self.opt.lr(step)
        upd = self.opt.make_update(step, grads, lr, 1.0 - lr * self.opt.config.weight_decay)
        return upd, {"loss": plus.mean().item(), "projected_grad": grads.mean().item(), "lr": lr}

    def record(self, losses: torch.Tensor) -> dict[str, Any]:
        """Extra trajectory keys (ignored by replay): the world size and every rank's scalars."""
        vals = [v if math.isfinite(v) else None for v in losses.tolist()]
        if not self.ranked:
            P = self.shape[1]
            vals = [vals[r * P:(r + 1) * P] for r in range(self.ctx.world_size)]
        return {"world_size": self.ctx.world_size, "losses": vals}

    def comm_bytes(self) -> int:
        """Bytes this rank sent in the loss all-gathers since the previous call (one step's worth)."""
        s = self.ctx.stats.get("losses")
        total = s.bytes_sent if s else 0
        out, self._sent = total - self._sent, total
        return out


# -- the local launcher ------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(cfg: Any) -> int:
    """Run ``cfg`` on ``cfg.nproc`` local worker processes and wait for them; returns the exit code.

    Each worker is ``python -m zoft finetune --config <resolved config>`` with torchrun's
    environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free
    ``MASTER_PORT``) and, unless set, ``OMP_NUM_THREADS = cpus // nproc``. Workers print their own
    one-line errors; a worker killed by a signal is reported here. Once one worker fails, the
    others get ``dist_timeout`` + 30 s to stop by themselves before they are terminated.
    """
    import yaml

    check_supported(cfg, cfg.nproc)
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda and torch.cuda.device_count() < cfg.nproc:
        raise UsageError(f"--nproc {cfg.nproc} on CUDA needs {cfg.nproc} visible GPUs, found "
                         f"{torch.cuda.device_count()}; lower --nproc or use --device cpu")
    fd, path = tempfile.mkstemp(prefix="zoft-launch-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    port = free_port()
    threads = str(max(1, (os.cpu_count() or 1) // cfg.nproc))
    procs: list[subprocess.Popen] = []
    try:
        for r in range(cfg.nproc):
            env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(cfg.nproc),
                       LOCAL_WORLD_SIZE=str(cfg.nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       **{LAUNCHED_ENV: "1"})
            env.setdefault("OMP_NUM_THREADS", threads)
            procs.append(subprocess.Popen([sys.executable, "-m", "zoft", "finetune", "--config", path], env=env))
        return _wait(procs, cfg.dist_timeout + 30.0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        os.unlink(path)


def _wait(procs: list[subprocess.Popen], grace_s: float) -> int:
    first: tuple[int, int] | None = None  # (rank, code) of the first failure
    deadline = math.inf
    interrupted = False
    while True:
        try:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            for r, c in enumerate(codes):
                if c not in (None, 0) and first is None:
                    first, deadline = (r, c), time.monotonic() + grace_s
                    if c < 0:
                        name = signal.Signals(-c).name if -c in signal.valid_signals() else str(-c)
                        print(f"zoft: error: rank {r} (pid {procs[r].pid}) was killed by {name}",
                              file=sys.stderr, flush=True)
            if time.monotonic() > deadline:
                for r, p in enumerate(procs):
                    if p.poll() is None:
                        print(f"zoft: error: rank {r} did not stop {grace_s:g} s after rank {first[0]} failed; "
                              "killing it", file=sys.stderr, flush=True)
                        p.kill()  # SIGKILL: also ends a stopped (SIGSTOP) process
                deadline = math.inf
            time.sleep(0.1)
        except KeyboardInterrupt:  # the workers got the same SIGINT: they save and exit
            interrupted = True
    codes = [p.returncode for p in procs]
    if first is None:
        first = next(((r, c) for r, c in enumerate(codes) if c != 0), (0, 0))
    code = first[1]
    if interrupted and code == 0:
        return 1
    return code if code > 0 else 1 if code < 0 else 0


__all__ = ["CommStats", "DataParallel", "DistContext", "check_supported", "env_world_size", "free_port",
           "global_optimizer", "init_distributed", "is_launched_worker", "launch_local", "run_digest",
           "weights_digest"]
