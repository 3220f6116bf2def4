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
import errno
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

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` on a single process.
        A collective: every rank must call it at the same point."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

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


BACKENDS = ("gloo", "nccl", "mpi")

# messages already logged by this process: plan() runs several times per run (the
# start checks, every stage, every rank), and one fallback warning is enough
_SAID: set[str] = set()


def _warn_once(msg: str, *args: Any) -> None:
    text = msg % args
    if text not in _SAID:
        _SAID.add(text)
        log.warning("%s", text)


def warnings_said() -> list[str]:
    """The warnings :func:`_warn_once` has logged in this process, sorted: each stage's
    log gets them too (the first came from the start checks, before any stage log was
    open, and later stages of ``stage=all`` would otherwise not say they ran on CPU)."""
    return sorted(_SAID)


def forget_warnings() -> None:
    """Start a run's warnings afresh (several runs in one process, e.g. a notebook)."""
    _SAID.clear()


def _validate(hw: Any) -> None:
    if hw.kind not in KINDS:
        raise HardwareError(f"hardware.kind={hw.kind!r}; valid: {', '.join(KINDS)}")
    if hw.precision not in PRECISIONS:
        raise HardwareError(f"hardware.precision={hw.precision!r}; valid: {', '.join(PRECISIONS)}")
    if hw.num_processes < 1:
        raise HardwareError(f"hardware.num_processes={hw.num_processes} must be >= 1")
    if hw.kind == "cpu" and list(hw.devices):
        # plan() never reads the list on CPU: the user would get one CPU process and
        # think the run used the GPUs they named
        raise HardwareError(
            f"hardware.devices={list(hw.devices)} lists CUDA devices, but "
            f"hardware.kind=cpu runs on the CPU and uses none of them. Use hardware=gpu "
            f"(one device) or hardware=multi_gpu (one process per device), or drop "
            f"hardware.devices (hardware.num_processes=N runs N CPU processes)"
        )
    backend = hw.backend or None
    if backend is not None and backend not in BACKENDS:
        raise HardwareError(
            f"hardware.backend={backend!r}; valid: {', '.join(BACKENDS)}, or null "
            f"(nccl on GPU, gloo on CPU)"
        )
    if backend == "mpi" and not torch_dist.is_mpi_available():
        # found only once the ranks are spawned otherwise
        raise HardwareError(
            "hardware.backend='mpi': this PyTorch build has no MPI support; use gloo or "
            "nccl, or null (nccl on GPU, gloo on CPU)"
        )


def _check_backend(hw: Any, device_type: str) -> None:
    """NCCL needs CUDA devices: refused here rather than after the ranks are spawned."""
    if (hw.backend or None) == "nccl" and device_type != "cuda":
        raise HardwareError(
            f"hardware.backend=nccl needs CUDA devices, but this run is on the CPU "
            f"(hardware.kind={hw.kind}); use hardware.backend=gloo, or null (picks gloo "
            f"on CPU)"
        )


def _asked_for(hw: Any, devices: list[int]) -> str:
    """What the user asked for, in words (an empty list means every visible GPU)."""
    if devices:
        return f"GPU(s) {devices}"
    if hw.kind == "multi_gpu":
        return "every visible GPU (hardware.devices=[] on hardware.kind=multi_gpu)"
    return "a GPU"


def plan(hw: Any) -> tuple[str, list[int], int]:
    """Decide device type, device ids and world size from the hardware config.

    Returns
    -------
    (device_type, device_ids, world_size)
        ``device_type`` is ``"cuda"`` or ``"cpu"``.

    Raises
    ------
    HardwareError
        A setting is invalid (named), devices are listed on ``hardware.kind=cpu``, a
        GPU was requested and none is usable (unless ``fallback_to_cpu``), or the
        backend does not fit the device.
    """
    _validate(hw)
    if hw.kind == "cpu":
        _check_backend(hw, "cpu")
        return "cpu", [], int(hw.num_processes)
    n_avail = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = list(hw.devices) or ([0] if hw.kind == "gpu" else list(range(n_avail)))
    missing = [d for d in devices if d >= n_avail or d < 0]
    if n_avail == 0 or missing or not devices:
        asked = _asked_for(hw, missing or devices)
        msg = (
            f"hardware.kind={hw.kind} hardware.devices={list(hw.devices)} asks for "
            f"{asked}, but this machine has {n_avail} usable CUDA device(s)"
        )
        if hw.fallback_to_cpu:
            _warn_once("%s; falling back to CPU (hardware.fallback_to_cpu=true)", msg)
            _check_backend(hw, "cpu")
            return "cpu", [], 1
        raise HardwareError(msg + ". Use hardware=cpu, or hardware.fallback_to_cpu=true.")
    _check_backend(hw, "cuda")
    return "cuda", devices, len(devices)


def _cpus() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def fit_fallback(hw: Any) -> None:
    """On a GPU run that fell back to the CPU (``hardware.fallback_to_cpu=true``), lower
    ``hw.num_workers`` (in place) to the CPUs this process may use, and say so once:
    the GPU configs' 4 DataLoader workers on a 2-core machine made torch warn, and
    competed with the training threads for the cores."""
    dtype, _, _ = plan(hw)
    if dtype != "cpu" or hw.kind == "cpu":
        return
    cpus = _cpus()
    workers = int(hw.get("num_workers", 0) or 0)
    if workers > cpus:
        _warn_once(
            "hardware.num_workers=%d lowered to %d, the CPUs this process may use: the run "
            "fell back to the CPU",
            workers,
            cpus,
        )
        hw.num_workers = cpus


def used(hw: Any) -> dict[str, Any]:
    """What a stage ran on, for its manifest (``hardware_used``): the config says what
    was asked for, which after ``hardware.fallback_to_cpu=true`` is not what ran.

    ``precision`` is the one in effect: bf16 autocast is GPU only
    (:meth:`DistInfo.autocast`), so a CPU run computes in fp32 whatever
    ``hardware.precision`` says.
    """
    dtype, ids, world = plan(hw)
    out: dict[str, Any] = {
        "device": dtype,
        "devices": list(ids),
        "processes": int(world),
        "precision": str(hw.precision) if dtype == "cuda" else "fp32",
        "num_workers": int(hw.get("num_workers", 0) or 0),
    }
    if dtype == "cpu" and hw.kind != "cpu":
        out["fallback_to_cpu"] = True
    return out


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


def _port_in_use(e: BaseException) -> bool:
    text = str(e)
    return "EADDRINUSE" in text or "ddress already in use" in text


def port_in_use_error(port: Any, setting: Any = None) -> HardwareError:
    """The error for a taken rendezvous ``port``; ``setting``: ``hardware.master_port``
    when it differs from ``port`` (0: the launcher picked ``port``)."""
    if setting is not None and str(setting) == "0":
        return HardwareError(
            f"hardware.master_port=0: the free port {port} the launcher picked was taken "
            f"by another program before the ranks started; run again, or set "
            f"hardware.master_port to a free port"
        )
    return HardwareError(
        f"hardware.master_port={port}: the port is already in use (another DDP run on "
        f"this machine, or another program holds it). Use hardware.master_port=0 (the "
        f"default: the launcher picks a free port) or another free port."
    )


def init_process(rank: int, world_size: int, hw: Any, local_rank: int | None = None) -> DistInfo:
    """Join the process group as ``rank`` and return this process's DistInfo.

    Raises
    ------
    HardwareError
        The rendezvous port (``hardware.master_port``) is taken.
    """
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
        if "MASTER_PORT" not in os.environ:
            # 0 asks for a free port; only a launcher can pick one that every rank knows
            port = int(hw.master_port)
            if port == 0:
                raise HardwareError(
                    "hardware.master_port=0 (pick a free port) needs the pipeline's own "
                    "launcher or torchrun to set MASTER_PORT for every rank; set "
                    "hardware.master_port=PORT or export MASTER_PORT"
                )
            os.environ["MASTER_PORT"] = str(port)
        try:
            torch_dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        except RuntimeError as e:  # DistNetworkError: the store's port is taken
            if _port_in_use(e):
                raise port_in_use_error(os.environ["MASTER_PORT"], hw.master_port) from e
            raise
    set_threads(hw, world_size)
    return DistInfo(
        rank, world_size, local_rank, device, hw.precision, backend if world_size > 1 else None
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_port(addr: str, port: int) -> None:
    """Refuse a fixed ``hardware.master_port`` that another process listens on now,
    before any rank starts (rank 0 would fail with a bare EADDRINUSE, and the other
    ranks might knock on the other run's door)."""
    with socket.socket() as s:
        # as the rendezvous store binds: a port left in TIME_WAIT by an earlier run is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise port_in_use_error(port) from None
            # another reason (an address not on this machine...): init_process_group says


# ----------------------------------------------------------------------------
# logging of spawned ranks
# ----------------------------------------------------------------------------
#
# A rank started by mp.spawn is a fresh interpreter: Hydra's job logging and the
# stage's <stage>.log handler (pipeline.stagedir.add_log_file) exist in the parent
# only, so the ranks' records went to Python's last-resort handler (WARNING and up,
# message only, stderr) and never to the log file. The parent describes its root
# handlers (console streams and files, levels, formats) and every rank rebuilds them.


@dataclass
class _HandlerSpec:
    kind: str  # "stdout" | "stderr" | "file"
    level: int
    fmt: str | None
    datefmt: str | None
    path: str | None = None


@dataclass
class LogSetup:
    """The parent's root logging, picklable for :func:`_spawned`."""

    root_level: int
    handlers: list[_HandlerSpec]
    levels: dict[str, int]  # loggers with their own level (``anndata``: WARNING)


def _stream_kind(h: logging.Handler) -> str | None:
    import sys

    stream = getattr(h, "stream", None)
    if stream is None:
        return None
    if stream in (sys.stdout, sys.__stdout__):
        return "stdout"
    if stream in (sys.stderr, sys.__stderr__):
        return "stderr"
    return None


def log_setup() -> LogSetup:
    """Describe this process's root handlers (files and console streams)."""
    specs = []
    for h in logging.getLogger().handlers:
        fmt = h.formatter
        f, d = (fmt._fmt, fmt.datefmt) if fmt is not None else (None, None)
        if isinstance(h, logging.FileHandler):
            specs.append(_HandlerSpec("file", h.level, f, d, h.baseFilename))
            continue
        kind = _stream_kind(h)  # a console handler (also tqdm's, while bars show)
        if kind is not None:
            specs.append(_HandlerSpec(kind, h.level, f, d))
    levels = {
        name: lg.level
        for name, lg in logging.Logger.manager.loggerDict.items()
        if isinstance(lg, logging.Logger) and lg.level != logging.NOTSET
    }
    return LogSetup(logging.getLogger().level, specs, levels)


class _RankFormatter(logging.Formatter):
    """The parent's format with ``[rank N]`` before the message (ranks other than 0)."""

    def __init__(self, fmt: str | None, datefmt: str | None, rank: int):
        super().__init__(fmt, datefmt)
        self.rank = rank

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        plain = record.message
        record.message = f"[rank {self.rank}] {plain}"
        try:
            return super().formatMessage(record)
        finally:
            record.message = plain


def apply_log_setup(setup: LogSetup, rank: int) -> list[logging.Handler]:
    """Rebuild the parent's logging in spawned rank ``rank``; returns the new handlers.

    Rank 0 logs as the parent does (console and ``<stage>.log``); the other ranks only
    their warnings and errors, prefixed ``[rank N]``, to the same places (their INFO
    lines repeat rank 0's).
    """
    import sys

    root = logging.getLogger()
    for h in list(root.handlers):  # none in a fresh spawn; a forked one has copies
        root.removeHandler(h)
    made: list[logging.Handler] = []
    for spec in setup.handlers:
        if spec.kind == "file":
            h: logging.Handler = logging.FileHandler(
                spec.path, mode="a", encoding="utf-8", errors="backslashreplace"
            )  # type: ignore[arg-type]
        else:
            h = logging.StreamHandler(sys.stdout if spec.kind == "stdout" else sys.stderr)
        h.setLevel(spec.level if rank == 0 else max(spec.level, logging.WARNING))
        if rank == 0:
            h.setFormatter(logging.Formatter(spec.fmt, spec.datefmt))
        else:
            h.setFormatter(_RankFormatter(spec.fmt, spec.datefmt, rank))
        root.addHandler(h)
        made.append(h)
    root.setLevel(setup.root_level if rank == 0 else max(setup.root_level, logging.WARNING))
    for name, level in setup.levels.items():
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(True)  # warnings.warn in a rank: through the same handlers
    return made


def _spawned(
    rank: int,
    fn: Callable,
    ctx: Any,
    hw: Any,
    world_size: int,
    done: Any = None,
    logs: LogSetup | None = None,
) -> None:
    if logs is not None:
        apply_log_setup(logs, rank)
    elif rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    ctx.dist = init_process(rank, world_size, hw)
    try:
        from segmentation.progress import redirect_logging
        from vae.analysis.figures import plain_text

        # rank 0's log lines above its progress bars, as in the parent; a spawned rank
        # starts with matplotlib's defaults: names with '$' drawn as written, as there
        with redirect_logging() if ctx.dist.is_main else contextlib.nullcontext(), plain_text():
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
        for h in logging.getLogger().handlers:
            h.flush()


def _child_error(e: BaseException) -> HardwareError | None:
    """The HardwareError a spawned rank raised (it reaches the parent as text)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    tag = "HardwareError: "
    if tag in last:
        return HardwareError(last.split(tag, 1)[1])
    return None


def launch(fn: Callable[[Any], None], ctx: Any, hw: Any) -> None:
    """Run ``fn(ctx)`` on every planned device, setting ``ctx.dist`` in each process.

    Under torchrun this process is one rank already; otherwise one process per
    device is spawned with ``torch.multiprocessing`` and this call waits for all.
    The spawned ranks log as this process does (:func:`apply_log_setup`).

    Raises
    ------
    HardwareError
        ``hardware.master_port`` is taken, or a rank raised one.
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
    dtype, _, world = plan(hw)
    if world == 1:
        ctx.dist = single_process(hw)
        fn(ctx)
        return
    import torch.multiprocessing as mp

    # 0 (the default): a free port, so that two runs on one machine do not collide
    port = free_port() if int(hw.master_port) == 0 else int(hw.master_port)
    if int(hw.master_port) != 0:
        _check_port(str(hw.master_addr), port)
    os.environ["MASTER_ADDR"] = str(hw.master_addr)
    os.environ["MASTER_PORT"] = str(port)
    log.info(
        "spawning %d processes (%s/%s, port %d)",
        world,
        hw.backend or ("nccl" if dtype == "cuda" else "gloo"),
        "gpu" if dtype == "cuda" else "cpu",
        port,
    )
    done = mp.get_context("spawn").Array("b", world)  # per rank: fn and the barrier passed
    for h in logging.getLogger().handlers:
        h.flush()  # the ranks append to the same files
    try:
        mp.spawn(_spawned, args=(fn, ctx, hw, world, done, log_setup()), nprocs=world, join=True)
    except mp.ProcessRaisedException as e:
        why = _child_error(e)
        if why is not None:
            raise why from None  # a user's setting: one line, no rank traceback
        raise
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
