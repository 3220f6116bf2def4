"""What both training loops share (Mask R-CNN here, the VAE in ``vae/train.py``).

One definition of the non-finite-loss stop and of the RNG state a checkpoint
carries so that ``resume=true`` continues bit-exactly. It lives in the
segmentation library because that is the upstream one of the two: ``vae``
imports it, ``segmentation`` never imports ``vae``, and no library imports
``pipeline``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; training stopped before the weights were updated.

    The message names the epoch, the iteration and the loss terms.
    """


def beyond_reference(value: float, reference: float, factor: float, floor: float) -> bool:
    """The divergence rule of both trainings (detector, VAE): ``|value|`` is more than
    ``factor`` times the reference loss's magnitude, taken as at least ``floor`` (a
    reference near 0 would make any loss look diverged). Each training owns its
    constants (``segmentation.engine`` / ``vae.train`` ``DIVERGE_FACTOR``, ``_FLOOR``)."""
    return abs(value) > factor * max(abs(reference), floor)


def rng_state(gen: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG a training loop draws from (torch, CUDA, numpy, python, ``gen``)."""
    st = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),  # noqa: NPY002 - global state other code may use
        "python": random.getstate(),
    }
    if gen is not None:
        st["augment"] = gen.get_state()
    return st


def set_rng_state(st: dict[str, Any], gen: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_state` saved (CUDA only when saved and available)."""
    torch.set_rng_state(st["torch"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    np.random.set_state(st["numpy"])  # noqa: NPY002
    random.setstate(st["python"])
    if gen is not None and "augment" in st:
        gen.set_state(st["augment"])


def restore_rank_rng(ck: dict[str, Any], rank: int, world_size: int, gen=None) -> str:
    """Restore this rank's RNG state from a training checkpoint; returns a warning ("" if
    none).

    ``ck["rng_ranks"]`` holds every rank's state (written by a multi-process run); a
    rank restores its own. Each rank draws its own noise and augmentation streams (seeded
    ``seed + rank``): restoring rank 0's state on every rank, as before, gave a resumed
    2-process run the same streams on both ranks (final weights 3.3e-3 from an
    uninterrupted run's; DDP audit). A checkpoint of another number of processes, or one
    without ``rng_ranks``, restores ``ck["rng"]`` (rank 0's) and says the streams differ.
    """
    ranks = ck.get("rng_ranks")
    if ranks is not None and len(ranks) == world_size:
        set_rng_state(ranks[rank], gen)
        return ""
    set_rng_state(ck["rng"], gen)
    saved = len(ranks) if ranks is not None else 1
    if saved == world_size:
        return ""
    return (
        f"resumed with {world_size} process(es) a run written by {saved}: every rank "
        "continues rank 0's random streams, so the result is not that of an uninterrupted run"
    )


def seed_everything(seed: int) -> None:
    """Seed torch, numpy's global RNG and python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002
    random.seed(seed)
