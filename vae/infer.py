"""Encode a whole data set: fused and per-modality latent means, cross-modal predictions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vae.data import PairedTensors, raw_batch, to_batch
from vae.model import TwoBranchVAE


@dataclass
class Latents:
    """Posterior means for every row (float32 numpy).

    joint : (N, d) fused posterior mean (all latent dims)
    image : (N, d) image-only posterior mean, NaN rows where there is no image
    expression : (N, d) expression-only posterior mean, NaN rows without expression
    joint_logvar : (N, d)
    expression_from_image : (N, G) log-normalised expression decoded from the
        image-only mean (NaN rows without image)
    """

    joint: np.ndarray
    image: np.ndarray
    expression: np.ndarray
    joint_logvar: np.ndarray
    expression_from_image: np.ndarray


@torch.no_grad()
def encode_dataset(
    model: TwoBranchVAE,
    data: PairedTensors,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    rows: np.ndarray | None = None,
) -> Latents:
    """Posterior means of ``rows`` (default all) with the model in eval mode."""
    was_training = model.training
    model.eval()
    rows = np.arange(data.n) if rows is None else np.asarray(rows)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("j", "lv", "i", "e", "x")}
    for s in range(0, rows.size, batch_size):
        idx = torch.as_tensor(rows[s : s + batch_size], dtype=torch.long)
        b = to_batch(raw_batch(data, idx), torch.device(device))
        post = model.encode(b.image, b.x, b.has_image, b.has_expression, b.mask, b.log_library)
        nan_i = (~b.has_image).view(-1, 1)
        nan_e = (~b.has_expression).view(-1, 1)
        mi = post.image[0].float()
        me = post.expression[0].float()
        x_img = model.decode(post.image[0]).expression_log.float()
        nan = torch.tensor(float("nan"), device=mi.device)
        out["j"].append(post.joint[0].float().cpu().numpy())
        out["lv"].append(post.joint[1].float().cpu().numpy())
        out["i"].append(torch.where(nan_i, nan, mi).cpu().numpy())
        out["e"].append(torch.where(nan_e, nan, me).cpu().numpy())
        out["x"].append(torch.where(nan_i, nan, x_img).cpu().numpy())
    if was_training:
        model.train()

    def cat(k: str, width: int) -> np.ndarray:
        return np.concatenate(out[k]) if out[k] else np.zeros((0, width), np.float32)

    d, g = model.n_latent, data.n_genes
    return Latents(
        joint=cat("j", d),
        image=cat("i", d),
        expression=cat("e", d),
        joint_logvar=cat("lv", d),
        expression_from_image=cat("x", g),
    )
