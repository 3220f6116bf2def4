"""KL schedules: linear β warm-up and Burgess capacity annealing.

The trainer owns the step counter and asks the schedule for (β, C) at each
step; the loss takes them as plain arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# final KL weight β after warm-up: the one default (VAEConfig.beta and TrainArgs.beta use it).
# 1 (the ELBO) since the image terms are balanced per value (docs/vae.md, "Image branch");
# the earlier 8 with a 0.01 image weight left the image branch with nothing to say
DEFAULT_BETA = 1.0


@dataclass
class KLSchedule:
    """β and capacity C as functions of the optimisation step.

    Attributes
    ----------
    beta : float
        Final β.
    warmup_steps : int
        β rises linearly from 0 to ``beta`` over these steps (0: constant β).
    capacity_max : float
        Burgess et al. (2018) target KL C in nats at the end of annealing
        (0: no capacity term).
    capacity_steps : int
        Steps for C to rise linearly from 0 to ``capacity_max``.
    """

    beta: float
    warmup_steps: int = 0
    capacity_max: float = 0.0
    capacity_steps: int = 0

    def beta_at(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return float(self.beta)
        return float(self.beta) * min(1.0, step / self.warmup_steps)

    def capacity_at(self, step: int) -> float:
        if self.capacity_max <= 0:
            return 0.0
        if self.capacity_steps <= 0:
            return float(self.capacity_max)
        return float(self.capacity_max) * min(1.0, step / self.capacity_steps)

    def done_at(self, step: int) -> bool:
        """True once both β and C have reached their final values."""
        return step >= self.warmup_steps and (self.capacity_max <= 0 or step >= self.capacity_steps)


def lr_lambda(warmup_steps: int, total_steps: int, kind: str):
    """Multiplier of the base learning rate at a step: linear warm-up, then cosine or constant.

    Returns a picklable-free closure for ``torch.optim.lr_scheduler.LambdaLR``
    (its state dict keeps only the step, so a resumed run rebuilds it from the
    same arguments).
    """
    if kind not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule={kind!r}; valid: cosine, constant")

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        prog = min(1.0, (step - warmup_steps) / span)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * prog))

    return f
