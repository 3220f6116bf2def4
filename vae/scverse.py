"""The latent table in scverse terms: cell IDs as ``obs_names``, and ``X_vae`` back into your AnnData.

``latent.h5ad`` (stage=train) has one row per row of ``paired.h5ad``. Its
``obs_names`` are the cells' own IDs where they exist (:func:`cell_obs_names`):
the expression cell (``obs["expression_ref"]``, the ``obs_names`` of the user's
expression file), else the crop (``obs["image_ref"]``), made unique with
``-1``, ``-2`` ... when one cell fills several rows (``pair.draws_per_crop``,
``by_label`` pairing). The pairing row ID (``r000000`` ...) stays in
``obs["row"]``: it joins ``latent.h5ad`` to ``paired.h5ad`` and ``split.csv``.

:func:`add_latent` writes ``X_vae`` into the user's own AnnData keyed by cell ID.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROW_KEY = "row"  # obs column of latent.h5ad holding the paired.h5ad row ID


def latent_obsm(lat: Any, n_shared: int, n_private: int) -> dict[str, np.ndarray]:
    """The ``obsm`` of ``latent.h5ad`` (stage=train) and ``query.h5ad`` (stage=embed).

    One owner of the layout, so an embedded cell sits where a trained one does.

    Parameters
    ----------
    lat : vae.infer.Latents
        Posterior means ``joint``, ``image``, ``expression`` (n, d) and ``joint_logvar``.
    n_shared, n_private : int
        The model's latent layout: d = n_shared + 2 * n_private.

    Returns
    -------
    ``X_vae`` (shared dims of the fused code), ``X_vae_image``, ``X_vae_expression``
    (shared dims of each expert), ``X_vae_full`` and ``X_vae_logvar`` (all d dims),
    and with private dims ``X_vae_private_image`` / ``X_vae_private_expression``;
    float32.
    """
    ns, npv = n_shared, n_private
    out = {
        "X_vae": lat.joint[:, :ns],
        "X_vae_image": lat.image[:, :ns],
        "X_vae_expression": lat.expression[:, :ns],
        "X_vae_full": lat.joint,
        "X_vae_logvar": lat.joint_logvar,
    }
    if npv:
        out["X_vae_private_image"] = lat.image[:, ns : ns + npv]
        out["X_vae_private_expression"] = lat.expression[:, ns + npv :]
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def cell_obs_names(obs: pd.DataFrame) -> pd.Index:
    """Unique per-row names: ``expression_ref``, else ``image_ref``, else the row ID.

    Parameters
    ----------
    obs : DataFrame, (n_rows, ...)
        ``paired.h5ad``'s ``obs`` (index: row IDs; columns ``expression_ref`` and
        ``image_ref`` may be missing or hold ``""`` for an absent modality).

    Returns
    -------
    Index, (n_rows,)
        Repeated IDs get ``-1``, ``-2`` ... (the first keeps its name), as
        ``AnnData.obs_names_make_unique`` does.

    >>> obs = pd.DataFrame({"expression_ref": ["c1", "c1", ""], "image_ref": ["a", "b", "img7"]},
    ...                    index=["r0", "r1", "r2"])
    >>> list(cell_obs_names(obs))
    ['c1', 'c1-1', 'img7']
    >>> list(cell_obs_names(pd.DataFrame({"expression_ref": ["c", "c", "c-1"]})))
    ['c', 'c-2', 'c-1']
    """
    names = pd.Series(obs.index.astype(str), index=obs.index)
    for col in ("image_ref", "expression_ref"):  # expression wins: applied last
        if col in obs:
            ref = obs[col].astype(str).fillna("")
            ok = (ref != "") & (ref != "nan")
            names[ok.to_numpy()] = ref[ok]
    taken = set(names)  # every row's own name: a suffixed duplicate never takes one
    out: list[str] = []
    used: set[str] = set()
    last: dict[str, int] = {}
    for n in names:
        if n in used:
            k = last.get(n, 0) + 1
            while f"{n}-{k}" in taken or f"{n}-{k}" in used:
                k += 1
            last[n] = k
            n = f"{n}-{k}"
        used.add(n)
        out.append(n)
    return pd.Index(out)


def add_latent(
    adata: Any,
    latent: Any,
    key: str = "X_vae",
    by: str = "expression_ref",
    obsm_key: str | None = None,
) -> int:
    """Write ``latent.obsm[key]`` into ``adata.obsm`` (in place), matched by cell ID.

    Parameters
    ----------
    adata : AnnData, (n_cells, n_genes)
        Your own expression AnnData (the one stage=expression read); its
        ``obs_names`` are the cell IDs.
    latent : AnnData or path
        ``latent.h5ad`` of stage=train (or evaluate's copy, which adds ``X_umap``).
    key : str
        ``obsm`` entry to copy: ``X_vae`` (shared latent, (n, d)), ``X_vae_expression``,
        ``X_umap`` (evaluate's copy) ...
    by : str
        ``latent.obs`` column holding your cell IDs (``expression_ref``; ``image_ref``
        for crop IDs). Falls back to ``latent.obs_names`` when the column is absent.
    obsm_key : str, optional
        Name in ``adata.obsm`` (default: ``key``).

    Returns
    -------
    int
        Cells of ``adata`` that got a value. The others get NaN rows (filtered by
        QC, or never paired). A cell on several latent rows (several crops drawn for
        one profile) gets the mean of those rows.

    Examples
    --------
    >>> import scanpy as sc  # doctest: +SKIP
    >>> from vae.scverse import add_latent  # doctest: +SKIP
    >>> adata = sc.read_h5ad("my_cells.h5ad")  # doctest: +SKIP
    >>> add_latent(adata, "outputs/demo/train/latent.h5ad")  # doctest: +SKIP
    812
    >>> adata = adata[np.isfinite(adata.obsm["X_vae"]).all(1)].copy()  # doctest: +SKIP
    >>> sc.pp.neighbors(adata, use_rep="X_vae"); sc.tl.umap(adata)  # doctest: +SKIP
    """
    import anndata as ad

    if isinstance(latent, str | Path):
        from segmentation.io import blank_as_read

        latent = blank_as_read(ad.read_h5ad(latent))
    if key not in latent.obsm:
        raise KeyError(f"latent has no obsm[{key!r}]; it has {sorted(latent.obsm)}")
    z = np.asarray(latent.obsm[key], dtype=np.float64)
    ids = (
        latent.obs[by].astype(str).to_numpy()
        if by in latent.obs
        else np.asarray(latent.obs_names, dtype=str)
    )
    keep = (ids != "") & np.isfinite(z).all(1)
    df = pd.DataFrame(z[keep], index=ids[keep]).groupby(level=0).mean()
    out = df.reindex(adata.obs_names.astype(str)).to_numpy(dtype=np.float32)
    adata.obsm[obsm_key or key] = out
    return int(np.isfinite(out).all(1).sum())
