"""Devices, precision and DDP for every training and inference stage.

Multi-device runs use ``torch.distributed`` (DDP), launched either

* by ``torchrun --nproc-per-node=N -m pipeline stage=...``: detected from the
  ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables torchrun sets, or
* by the pipeline itself, which spawns one process per listed device
  (``hardware.devices=[0,1]``), or ``hardware.num_processes`` CPU processes
  with the gloo backend.

Only rank 0 writes artifacts and TensorBoard events (``DistInfo.is_main``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

log = logging.getLogger(__name__)

KINDS = ("cpu", "gpu", "multi_gpu")
PRECISIONS = ("fp32", "bf16")


class HardwareError(RuntimeError):
    pass


@dataclass
class DistInfo:
    """Where this process runs and how it relates to the others."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    precision: str = "fp32"
    backend: str | None = None  # None: not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on GPU when ``precision=bf16``; a no-op otherwise."""
        if self.precision == "bf16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.distributed:
            torch_dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (in place); identity on a single process."""
        if self.distributed:
            torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
        return t

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        self.all_reduce_sum(t)
        if self.distributed:
            t /= self.world_size
        return t

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's share of ``items`` (round robin; stable order)."""
        return list(items[self.rank :: self.world_size])

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move ``model`` to the device and wrap it in DDP when distributed."""
        model = model.to(self.device)
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)


def _validate(hw: Any) -> None:
    if hw.kind not in KINDS:
        raise HardwareError(f"hardware.kind={hw.kind!r}; valid: {', '.join(KINDS)}")
    if hw.precision not in PRECISIONS:
        raise HardwareError(f"hardware.precision={hw.precision!r}; valid: {', '.join(PRECISIONS)}")
    if hw.num_processes < 1:
        raise HardwareError(f"hardware.num_processes={hw.num_processes} must be >= 1")


def plan(hw: Any) -> tuple[str, list[int], int]:
    """Decide device type, device ids and world size from the hardware config.

    Returns
    -------
    (device_type, device_ids, world_size)
        ``device_type`` is ``"cuda"`` or ``"cpu"``.

    Raises
    ------
    HardwareError
        A GPU was requested and none is usable (unless ``fallback_to_cpu``).
    """
    _validate(hw)
    if hw.kind == "cpu":
        return "cpu", [], int(hw.num_processes)
    n_avail = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = list(hw.devices) or ([0] if hw.kind == "gpu" else list(range(n_avail)))
    missing = [d for d in devices if d >= n_avail or d < 0]
    if n_avail == 0 or missing or not devices:
        msg = (
            f"hardware.kind={hw.kind} hardware.devices={list(hw.devices)} asks for GPU(s) "
            f"{missing or devices}, but this machine has {n_avail} usable CUDA device(s)"
        )
        if hw.fallback_to_cpu:
            log.warning("%s; falling back to CPU (hardware.fallback_to_cpu=true)", msg)
            return "cpu", [], 1
        raise HardwareError(msg + ". Use hardware=cpu, or hardware.fallback_to_cpu=true.")
    return "cuda", devices, len(devices)


# (hardware.torch_threads, world size) -> (threads, why): decided once per process
_THREADS: dict[tuple[int | None, int], tuple[int, str]] = {}


def pick_threads(
    setting: int | None,
    world_size: int = 1,
    cores: int | None = None,
    load: float | None = None,
    env: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Intra-op torch threads for this process, and why.

    Order: ``hardware.torch_threads`` when set; 1 per process under DDP (the
    processes share the cores); ``OMP_NUM_THREADS`` when exported; else the cores
    this process may run on (``os.sched_getaffinity``) minus the busy ones (the
    1-min load average, capped by the tasks running now: :func:`_busy_cores`),
    at least 1. On a shared machine this keeps
    OpenMP from oversubscribing busy cores, which made training several times
    slower (README, "Busy CPUs").

    Parameters
    ----------
    setting
        ``hardware.torch_threads`` (None: decide).
    world_size
        Processes of this run.
    cores, load, env
        For tests; default to this machine's affinity, load and ``os.environ``.

    Returns
    -------
    (threads, reason)

    >>> pick_threads(None, cores=2, load=0.1, env={})
    (2, '2 cores, load 0.10')
    >>> pick_threads(None, cores=2, load=5.0, env={})[0]
    1
    """
    env = os.environ if env is None else env
    if setting:
        return int(setting), "hardware.torch_threads"
    if world_size > 1:
        return 1, f"1 per process ({world_size} DDP processes)"
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if load is None:
        load = _busy_cores()
    free = int(round(cores - load))
    return max(1, min(int(cores), free)), f"{cores} cores, load {load:.2f}"


def _busy_cores() -> float:
    """Cores other jobs keep busy: the 1-min load average, but no more than the
    threads of other processes running right now (state R in ``/proc``). The
    average alone still counts a job that ended a minute ago (a test run, the
    previous stage) and halved the threads of a demo started on an idle machine."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    me = str(os.getpid())
    running = 0
    try:
        for stat in Path("/proc").glob("[0-9]*/task/*/stat"):
            if stat.parts[2] == me:
                continue
            try:
                # state is the field after the parenthesised command name
                if stat.read_text().rsplit(")", 1)[1].split()[0] == "R":
                    running += 1
            except (OSError, IndexError):
                continue  # the task ended while we looked
    except OSError:
        return load
    return min(load, float(running))


def set_threads(hw: Any, world_size: int = 1) -> int:
    """Apply :func:`pick_threads`, decided (and logged) once per process and layout.

    Deciding once keeps a ``stage=all`` run from reading its own earlier stages'
    load as other jobs' load.
    """
    key = (int(hw.torch_threads) if hw.torch_threads else None, int(world_size))
    if key not in _THREADS:
        _THREADS[key] = pick_threads(key[0], key[1])
        n, why = _THREADS[key]
        hint = "" if key[0] else "; hardware.torch_threads=N sets it"
        log.info("torch threads: %d (%s%s)", n, why, hint)
    torch.set_num_threads(_THREADS[key][0])
    return _THREADS[key][0]


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def single_process(hw: Any) -> DistInfo:
    """DistInfo for a stage that runs in one process (first planned device)."""
    dtype, ids, _ = plan(hw)
    device = torch.device("cuda", ids[0]) if dtype == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    set_threads(hw, 1)
    return DistInfo(0, 1, 0, device, hw.precision, None)


def init_process(rank: int, world_size: int, hw: Any, local_rank: int | None = None) -> DistInfo:
    """Join the process group as ``rank`` and return this process's DistInfo."""
    dtype, ids, _ = plan(hw)
    local_rank = rank if local_rank is None else local_rank
    if dtype == "cuda":
        device = torch.device("cuda", ids[local_rank % len(ids)])
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = hw.backend or ("nccl" if dtype == "cuda" else "gloo")
    if world_size > 1 and not torch_dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", str(hw.master_addr))
        os.environ.setdefault("MASTER_PORT", str(hw.master_port))
        torch_dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    set_threads(hw, world_size)
    return DistInfo(
        rank, world_size, local_rank, device, hw.precision, backend if world_size > 1 else None
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, fn: Callable, ctx: Any, hw: Any, world_size: int, done: Any = None) -> None:
    ctx.dist = init_process(rank, world_size, hw)
    if not ctx.dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        fn(ctx)
        # tear gloo down together: a rank destroying its group while the other still
        # talks aborted rank 0 at exit now and then ("terminate called without an
        # active exception"). Not on the error path, where the other rank may never come
        if torch_dist.is_initialized():
            torch_dist.barrier()
        if done is not None:
            done[rank] = 1  # the work is complete: an abort after this is gloo's teardown
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def launch(fn: Callable[[Any], None], ctx: Any, hw: Any) -> None:
    """Run ``fn(ctx)`` on every planned device, setting ``ctx.dist`` in each process.

    Under torchrun this process is one rank already; otherwise one process per
    device is spawned with ``torch.multiprocessing`` and this call waits for all.
    """
    if launched_by_torchrun():
        ctx.dist = init_process(
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            hw,
            int(os.environ["LOCAL_RANK"]),
        )
        # every rank starts a stage together (rank 0 may still be writing the last one)
        ctx.dist.barrier()
        fn(ctx)
        return
    _, _, world = plan(hw)
    if world == 1:
        ctx.dist = single_process(hw)
        fn(ctx)
        return
    import torch.multiprocessing as mp

    os.environ["MASTER_ADDR"] = str(hw.master_addr)
    os.environ["MASTER_PORT"] = str(free_port() if hw.master_port == 0 else hw.master_port)
    log.info("spawning %d processes (%s)", world, "gloo/cpu" if hw.kind == "cpu" else "nccl/gpu")
    done = mp.get_context("spawn").Array("b", world)  # per rank: fn and the barrier passed
    try:
        mp.spawn(_spawned, args=(fn, ctx, hw, world, done), nprocs=world, join=True)
    except mp.ProcessExitedException as e:
        # gloo's teardown (destroy_process_group) still aborts a rank now and then
        # ("terminate called without an active exception", SIGABRT) after every rank
        # finished its work and met the closing barrier: the results are complete
        if e.signal_name != "SIGABRT" or not all(done[:]):
            raise
        log.warning(
            "rank %d aborted while closing the process group, after every rank had "
            "finished (a known gloo teardown race); the stage's results are complete",
            e.error_index,
        )


@contextlib.contextmanager
def main_first(dist: DistInfo) -> Iterator[None]:
    """Rank 0 runs the body first (e.g. to build a cache), the others after."""
    if not dist.is_main:
        dist.barrier()
    yield
    if dist.is_main:
        dist.barrier()
