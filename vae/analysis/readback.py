"""Decoded cells read back by the model's own image encoder: is a drawing of its class?

A reconstruction can score a fair SSIM and still draw the wrong kind of cell (a monocyte's
profile drawn as a two-lobed neutrophil). Each drawing is given to the image expert as a
crop is (the decoded cell mask as its mask, the paired crops' background outside it, the
crop's 8 symmetries averaged as the reported latent is), and its code is labelled by the
kNN vote of the labelled training crops' image codes, as the image-only kNN accuracy labels
the crops themselves. The share of drawings read as the row's own label, next to the same
share for the input crops, says how much of the class a drawing keeps (``stage=evaluate``,
``metrics.json`` ``readback``; docs/analysis.md).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from vae.analysis import metrics as M


def training_voters(latent, has_image: np.ndarray, labels: np.ndarray):
    """The kNN reference of :func:`read_back`: ``(z_ref, labels_ref)``, the image codes
    (``obsm["X_vae_image"]``, (m, n_shared) float64) and labels of the training crops with
    a known label (:func:`vae.analysis.run.image_reference_rows`); m may be 0.

    ``has_image`` (N,) bool: which rows hold a crop, where ``latent.obs`` does not say;
    ``labels`` (N,) str: every latent row's label."""
    from vae.analysis.run import image_reference_rows
    from vae.inputs.schema import known_labels

    labels = np.asarray(labels)
    z = np.asarray(latent.obsm["X_vae_image"], dtype=np.float64)
    rows = image_reference_rows(latent, has_image)
    rows = rows[known_labels(labels[rows]) & np.isfinite(z[rows]).all(1)]
    return z[rows], labels[rows]


def drawing(images: np.ndarray, masks: np.ndarray, background: float):
    """A decode as :func:`read_back` takes it: ``(cells, cell_masks)``, the decoded RGB
    (n, S, S, 3) drawn through its cell mask on ``background`` (the paired crops' own,
    0-1) and that mask (n, S, S) bool (:func:`vae.analysis.traverse.draw_cells`,
    :func:`~vae.analysis.traverse.cell_masks`)."""
    from vae.analysis.traverse import cell_masks, draw_cells

    return draw_cells(images, masks, background), cell_masks(masks)


def read_back(
    model,
    data,
    rows: np.ndarray,
    drawings: dict[str, tuple[np.ndarray, np.ndarray]],
    z_ref: np.ndarray,
    labels_ref: np.ndarray,
    k: int,
    device="cpu",
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """The label the image encoder gives each drawing of ``rows``.

    Parameters
    ----------
    model : vae.model.TwoBranchVAE
        In eval mode (left as it is).
    data : vae.data.PairedTensors
        The rows' data set: everything but the crop and its mask (library, diameter, batch)
        is read from it, as the row's own crop would be.
    rows : (n,) int
        Rows of ``data`` the drawings are of, in order.
    drawings : dict
        name -> ``(cells, masks)``: ``cells`` (n, S, S, 3) float in [0, 1], each drawn on
        the paired crops' background (``vae.analysis.traverse.draw_cells(...,
        background)``), ``masks`` (n, S, S) bool its cell mask.
    z_ref, labels_ref : (m, n_shared) float, (m,) str
        The labelled training crops' image codes (``obsm["X_vae_image"]``) and labels.
    k : int
        Neighbours that vote (``analysis.knn_k``).
    device, batch_size
        Where and how many rows at once the encoder runs.

    Returns
    -------
    dict
        name -> (n,) str: the label voted for each drawing.
    """
    from vae.data import raw_batch, to_batch
    from vae.infer import encode_batch

    rows = np.asarray(rows, dtype=int)
    ns = int(model.args.n_shared)
    views = int(getattr(model.args, "encode_views", 1) or 1)
    out: dict[str, np.ndarray] = {}
    for name, (cells, masks) in drawings.items():
        if len(cells) != rows.size or len(masks) != rows.size:
            raise ValueError(
                f"read_back: {name}: {len(cells)} drawings and {len(masks)} masks for "
                f"{rows.size} rows"
            )
        codes = []
        for s in range(0, rows.size, batch_size):
            sl = slice(s, s + batch_size)
            b = to_batch(raw_batch(data, torch.as_tensor(rows[sl])), torch.device(device))
            img = torch.as_tensor(np.ascontiguousarray(cells[sl]), dtype=torch.float32)
            msk = torch.as_tensor(np.asarray(masks[sl], dtype=np.float32))
            # the drawing as the row's crop, and nothing else: no profile
            b = dataclasses.replace(
                b,
                image=img.permute(0, 3, 1, 2).to(device),
                mask=msk[:, None].to(device),
                has_image=torch.ones_like(b.has_image),
                has_expression=torch.zeros_like(b.has_expression),
            )
            with torch.no_grad():
                post = encode_batch(model, b, views=views)
            codes.append(post.image[0][:, :ns].float().cpu().numpy())
        z = np.concatenate(codes) if codes else np.zeros((0, ns), np.float32)
        unused = np.full(len(z), "", dtype=object)  # the rows' own labels: not voted by
        out[name] = M.knn_predict(z, unused, k, z_ref, labels_ref)
    return out
