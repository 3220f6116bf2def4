"""Trainable parameters as views of one buffer: one optimizer tensor, one gradient norm.

A small model (the expression VAE: ~20 tensors of 10^2-10^4 values) spends more of
a CPU step in per-tensor bookkeeping than in arithmetic: ``clip_grad_norm_`` takes a
norm per tensor, fused AdamW groups and launches per tensor, ``zero_grad`` walks
them. With every parameter a view of one flat tensor (and every gradient a view of
a second), clipping is one norm and one multiply, AdamW one fused update, zeroing
one ``zero_()``; the arithmetic is the same elementwise arithmetic (the gradient
norm is summed in another order: equal to float rounding).

One difference from per-tensor AdamW: a parameter that receives no gradient in a
step is skipped there by ``torch.optim`` (its gradient is None) but moved by its
momentum here (its gradient is a zero slice). :func:`vae.train.train` therefore
uses this only where every trainable tensor is used by every step (an
expression-only training on one process: the image branch is frozen out).

The optimizer's ``state_dict`` is written and read in the per-tensor layout of
``torch.optim.AdamW`` over the same parameter list, so a checkpoint does not
depend on which path trained it.
"""

from __future__ import annotations

from typing import Any

import torch


class FlatParameters:
    """Re-home ``params`` into one data buffer and one gradient buffer (in place).

    Parameters
    ----------
    params : trainable tensors, one dtype and device; each becomes a view of
        ``self.flat`` and its ``.grad`` a view of ``self.flat.grad``.

    Examples
    --------
    >>> lin = torch.nn.Linear(3, 2)
    >>> fp = FlatParameters(list(lin.parameters()))
    >>> opt = torch.optim.AdamW([fp.flat], lr=1e-3)
    >>> lin(torch.ones(1, 3)).sum().backward()
    >>> norm = fp.clip_(1.0); opt.step(); fp.zero_grad()
    """

    def __init__(self, params: list[torch.nn.Parameter]):
        if not params:
            raise ValueError("no parameters to flatten")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"parameters of several dtypes/devices: {dtypes}, {devices}")
        n = sum(p.numel() for p in params)
        dtype, device = dtypes.pop(), devices.pop()
        data = torch.empty(n, dtype=dtype, device=device)
        grad = torch.zeros(n, dtype=dtype, device=device)
        self.params = list(params)
        self.offsets: list[tuple[int, int]] = []
        off = 0
        with torch.no_grad():
            for p in self.params:
                k = p.numel()
                data[off : off + k].copy_(p.reshape(-1))
                p.data = data[off : off + k].view_as(p)
                p.grad = grad[off : off + k].view_as(p)
                self.offsets.append((off, k))
                off += k
        self.flat = torch.nn.Parameter(data)  # shares data's storage
        self.flat.grad = grad

    def zero_grad(self) -> None:
        """Zero every gradient in place (the views must stay views: never None)."""
        self.flat.grad.zero_()

    def clip_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over all parameters; returns the norm."""
        g = self.flat.grad
        norm = torch.linalg.vector_norm(g)
        g.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    def per_tensor_state(self, sd: dict[str, Any]) -> dict[str, Any]:
        """A flat optimizer's ``state_dict`` -> AdamW's over ``params`` (slices cloned)."""
        group = dict(sd["param_groups"][0])
        group["params"] = list(range(len(self.params)))
        st = sd["state"].get(0)
        state = {}
        if st:
            for i, (p, (off, k)) in enumerate(zip(self.params, self.offsets)):
                # every state tensor but the shared step count is one value per parameter
                state[i] = {
                    key: v.clone() if key == "step" else v[off : off + k].view_as(p).clone()
                    for key, v in st.items()
                }
        return {"state": state, "param_groups": [group]}

    def flat_state(self, sd: dict[str, Any]) -> dict[str, Any]:
        """AdamW's ``state_dict`` over ``params`` -> the flat optimizer's.

        Raises ValueError when the per-tensor states cannot be one state (another
        parameter list, or tensors that took different numbers of steps).
        """
        groups = sd["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(
                f"optimizer state for {sum(len(g['params']) for g in groups)} tensors in "
                f"{len(groups)} group(s); this model trains {len(self.params)} in one"
            )
        group = dict(groups[0])
        ids = group["params"]
        group["params"] = [0]
        per = [sd["state"].get(i) for i in ids]
        if not any(per):
            return {"state": {}, "param_groups": [group]}
        if not all(per):
            raise ValueError("optimizer state holds some tensors but not all")
        steps = {float(s["step"]) for s in per}
        if len(steps) != 1:
            raise ValueError(f"tensors took different numbers of optimizer steps: {steps}")
        st: dict[str, Any] = {}
        for key, v0 in per[0].items():
            st[key] = v0.clone() if key == "step" else torch.cat([s[key].reshape(-1) for s in per])
        return {"state": {0: st}, "param_groups": [group]}
