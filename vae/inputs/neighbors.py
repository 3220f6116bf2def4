"""The kNN graph of scanpy (``sc.pp.neighbors``) at any number of cells.

One helper for every caller (``stage=expression``'s UMAP / diffusion pseudotime / Leiden
labels, ``vae.analysis.metrics.leiden_agreement``, ``vae.analysis.run.embedding``).

Why: from :data:`EXACT_MAX_CELLS` cells on, scanpy 1.11 builds the graph with
pynndescent's ``PyNNDescentTransformer``, whose result is a scipy ``csr_array``; scanpy
then calls ``getnnz`` on it, which scipy 1.17's sparse *arrays* no longer have, so every
run on 8192 cells or more stopped with ``AttributeError: 'csr_array' object has no
attribute 'getnnz'``. Here that transformer is built with the settings scanpy itself
gives it and returns a ``csr_matrix`` (the same entries); below the threshold scanpy's own
exact (brute-force) path runs unchanged, so small inputs give the graph they always did.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

# scanpy 1.11 (``Neighbors._handle_transformer``): euclidean kNN on fewer cells is exact
# (sklearn brute force), from this many cells on approximate (pynndescent)
EXACT_MAX_CELLS = 8192


def _csr_matrix_transformer_class():
    from pynndescent import PyNNDescentTransformer

    class CSRMatrixNNDescent(PyNNDescentTransformer):
        """``PyNNDescentTransformer`` whose graphs are ``scipy.sparse.csr_matrix``.

        pynndescent (0.7 here) returns a ``csr_array``, which lacks the ``getnnz`` scanpy
        1.11 calls (scipy 1.17's sparse arrays have none; its ``csr_matrix`` has).
        """

        def transform(self, X, y=None):  # noqa: N803 - sklearn's signature
            return sp.csr_matrix(super().transform(X, y))

        def fit_transform(self, X, y=None, **fit_params):  # noqa: N803
            return sp.csr_matrix(super().fit_transform(X, y, **fit_params))

    return CSRMatrixNNDescent


def approximate_transformer(n_obs: int, n_neighbors: int, random_state: int):
    """The kNN transformer scanpy uses from :data:`EXACT_MAX_CELLS` cells on, returning
    ``csr_matrix``.

    Parameters
    ----------
    n_obs
        Number of cells (sets the number of trees and iterations as scanpy does, after
        UMAP's ``nearest_neighbors``).
    n_neighbors
        Neighbours per cell, the cell itself included (scanpy's convention).
    random_state
        Seed of the random projection trees.

    Returns
    -------
    PyNNDescentTransformer
        A subclass instance; ``fit_transform(x)`` of ``x`` (n_obs, d) gives an
        (n_obs, n_obs) ``csr_matrix`` of distances.
    """
    from scanpy import settings

    cls = _csr_matrix_transformer_class()
    return cls(
        n_neighbors=n_neighbors,
        metric="euclidean",
        metric_kwds={},
        random_state=random_state,
        n_jobs=settings.n_jobs,
        n_trees=min(64, 5 + round(n_obs**0.5 / 20.0)),
        n_iters=max(5, round(np.log2(n_obs))),
    )


def knn_graph(adata, *, n_neighbors: int, use_rep: str, random_state: int) -> None:
    """``sc.pp.neighbors`` on ``adata.obsm[use_rep]``, in place, at any number of cells.

    Parameters
    ----------
    adata
        AnnData with ``obsm[use_rep]`` (n_obs, d). Writes ``obsp["distances"]``,
        ``obsp["connectivities"]`` (n_obs, n_obs) and ``uns["neighbors"]``.
    n_neighbors
        Requested neighbours; clipped to ``[2, n_obs - 1]``.
    use_rep
        Representation to build the graph on.
    random_state
        Seed (pynndescent's trees; the exact path has no randomness).
    """
    import scanpy as sc

    k = max(2, min(n_neighbors, adata.n_obs - 1))
    transformer = None  # scanpy's exact path: unchanged results below the threshold
    if adata.n_obs >= EXACT_MAX_CELLS:
        transformer = approximate_transformer(adata.n_obs, k, random_state)
    sc.pp.neighbors(
        adata,
        n_neighbors=k,
        use_rep=use_rep,
        random_state=random_state,
        transformer=transformer,
    )
