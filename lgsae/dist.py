"""More than one process: `torchrun --nproc_per_node N -m lgsae.train ...` (torch.distributed).

`init()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and joins the
process group: NCCL when the run's device is CUDA (each rank on cuda:LOCAL_RANK), gloo on CPUs.
Without torchrun it returns a one-process `Dist` whose collectives are no-ops, so the pipeline
has one code path. Objects (errors, groups, metrics) and barriers always go over gloo, which needs
no device; tensors go over the device's backend.

Who does what (lgsae.pipeline): rank 0 prepares the run folder, harvests, groups and writes the
shared outputs; the others wait, then open the finished cache. The SAEs of a run are spread over
the ranks by cost (`balance`), or, in data-parallel mode, replicated with gradients all-reduced.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

T = TypeVar("T")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def timeout() -> timedelta:
    """How long a rank waits in a collective: rank 0 harvests while the others wait, and when
    the SAEs are spread, a rank that finishes first waits for the last one. Default 48 h
    ($LGSAE_DIST_TIMEOUT_MIN); a rank that crashes still ends the job at once (torchrun stops
    the others)."""
    return timedelta(minutes=float(os.environ.get("LGSAE_DIST_TIMEOUT_MIN", 48 * 60)))


class LaunchError(RuntimeError):
    """The processes were not launched as one consistent torchrun job."""


@dataclass
class Dist:
    """This process's place in the job. world == 1: no process group, collectives are no-ops."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cpu_group: Any = None  # gloo group for objects and barriers (the default group on CPUs)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # ------------------------------------------------------------------ collectives
    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over all ranks (op: sum or max); returns t. CPU tensors go over gloo, device
        tensors over the job's backend (NCCL on GPUs)."""
        if self.active:
            tdist.all_reduce(t, op={"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX}[op],
                             group=self.cpu_group if t.device.type == "cpu" else None)
        return t

    def all_reduce_many_(self, tensors: Sequence[torch.Tensor], op: str = "sum") -> None:
        """One collective for several same-dtype tensors (flattened, reduced, copied back)."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self.all_reduce_(flat, op)
        off = 0
        for t in tensors:
            t.copy_(flat[off:off + t.numel()].view_as(t))
            off += t.numel()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        tdist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list = [None] * self.world
        tdist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run fn on rank 0 only and hand its result to every rank. If it raises, every rank
        raises the same error (so no rank waits forever for a result that will not come)."""
        if not self.active:
            return fn()
        result, err = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # re-raised below, on every rank
                err = e
        result, kind, msg = self.broadcast(
            (result, type(err).__name__ if err else None, str(err) if err else None))
        if err is not None:
            raise err
        if kind is not None:
            raise _rebuild(kind, msg)
        return result

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run fn on rank 0, then (if it succeeded) on the other ranks: for work whose result
        lands on disk and is then reused (the default model's conversion, the harvest)."""
        if not self.active:
            return fn()
        first: list = []
        self.on_main(lambda: first.append(fn()))  # the result stays on rank 0; None is sent
        return first[0] if self.is_main else fn()

    def close(self) -> None:
        """Leave the job after a successful run: wait until every rank is done with the last
        collective (tearing gloo down under a peer still receiving aborts that peer), then
        destroy the process group. After an error, just exit: torchrun stops the other ranks."""
        if self.active and tdist.is_initialized():
            tdist.barrier(group=self.cpu_group)
            tdist.destroy_process_group()


def _rebuild(kind: str, msg: str) -> Exception:
    cls = LaunchError if kind == "LaunchError" else getattr(builtins, kind, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        return cls(f"(rank 0) {msg}")
    return RuntimeError(f"(rank 0) {kind}: {msg}")


def init(device: str | torch.device) -> Dist:
    """Join the torchrun job this process belongs to, or return a one-process Dist."""
    env = {k: os.environ.get(k) for k in _ENV}
    device = torch.device(device)
    if env["RANK"] is None and env["WORLD_SIZE"] is None:
        return Dist(device=device)
    missing = [k for k, v in env.items() if v is None]
    if missing:
        given = [k for k in _ENV if k not in missing]
        raise LaunchError(f"inconsistent launch: {', '.join(given)} "
                          f"{'is' if len(given) == 1 else 'are'} set but not "
                          f"{', '.join(missing)}; start the job with "
                          "`torchrun --nproc_per_node N -m lgsae.train ...`")
    try:
        rank, world, local = (int(env[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise LaunchError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got {env}") from None
    if not (world >= 1 and 0 <= rank < world and 0 <= local < world):
        raise LaunchError(f"inconsistent launch: RANK={rank}, LOCAL_RANK={local}, "
                          f"WORLD_SIZE={world}; need 0 <= RANK, LOCAL_RANK < WORLD_SIZE")
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise LaunchError(f"LOCAL_RANK={local} but this node has "
                              f"{torch.cuda.device_count()} CUDA devices: start at most that many "
                              "processes per node (--nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world == 1:
        return Dist(device=device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    tdist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout(),
                             **({"device_id": device} if backend == "nccl" else {}))
    cpu_group = tdist.new_group(backend="gloo", timeout=timeout()) if backend == "nccl" else None
    d = Dist(rank, world, local, device, cpu_group)
    ranks = d.gather(rank)
    if sorted(ranks) != list(range(world)):
        d.close()
        raise LaunchError(f"inconsistent launch: ranks {sorted(ranks)} for WORLD_SIZE={world}")
    return d


def check_same(d: Dist, what: str, value) -> None:
    """Every rank must have been started with the same `value` (e.g. the flags)."""
    values = d.gather(value)
    bad = [r for r, v in enumerate(values) if v != values[0]]
    if bad:
        raise LaunchError(f"inconsistent launch: ranks {bad} were started with other {what} than "
                          f"rank 0 ({values[bad[0]]!r} vs {values[0]!r}); start every rank with "
                          "the same command")


def balance(costs: Sequence[float], world: int) -> list[list[int]]:
    """Indices of `costs` split over `world` ranks so the most loaded rank carries as little as
    possible (longest-processing-time first, ties to the lower rank; deterministic)."""
    load = [0.0] * world
    owned: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owned[r].append(i)
        load[r] += costs[i]
    return [sorted(o) for o in owned]
