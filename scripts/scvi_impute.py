"""scvi-tools imputation for ``scripts/bench_imputation.py``, runnable by another Python.

scvi-tools is an optional dependency (the ``[bench]`` extra) and may live in a
separate environment; the benchmark then calls this file with that
environment's interpreter (``--scvi-python``). It needs only numpy, anndata and
scvi-tools, never this project's packages::

    /path/to/python scripts/scvi_impute.py IN.npz OUT.npz

``IN.npz`` holds ``counts_ref`` (m, G) training counts, ``counts_query`` (n, G)
masked query counts, ``target_sum``, ``seed`` and ``max_epochs`` (<= 0: scvi's
own default). ``OUT.npz`` gets ``prediction`` (n, G):
``log1p(get_normalized_expression(query, library_size=target_sum))``, plus
``epochs`` (epochs trained) and ``version``.
"""

from __future__ import annotations

import sys

import numpy as np


def scvi_predict(
    counts_ref: np.ndarray,
    counts_query: np.ndarray,
    target_sum: float,
    seed: int,
    max_epochs: int | None,
) -> tuple[np.ndarray, int]:
    """Train ``scvi.model.SCVI`` (NB, defaults otherwise) on ``counts_ref``; impute ``counts_query``.

    Returns the (n, G) log1p-normalised prediction and the number of epochs trained.
    """
    import anndata as ad
    import scvi
    import torch

    scvi.settings.seed = int(seed)
    scvi.settings.num_threads = 1
    torch.set_num_threads(1)
    ref = ad.AnnData(X=np.asarray(counts_ref, dtype=np.float32))
    scvi.model.SCVI.setup_anndata(ref)
    model = scvi.model.SCVI(ref, gene_likelihood="nb")
    kw = {"max_epochs": int(max_epochs)} if max_epochs else {}
    model.train(accelerator="cpu", devices=1, enable_progress_bar=False, **kw)
    q = ad.AnnData(X=np.asarray(counts_query, dtype=np.float32))
    q.var_names = ref.var_names
    norm = model.get_normalized_expression(q, library_size=float(target_sum), return_numpy=True)
    epochs = len(model.history["elbo_train"]) if "elbo_train" in model.history else -1
    return np.log1p(np.asarray(norm, dtype=np.float64)).astype(np.float32), int(epochs)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: scvi_impute.py IN.npz OUT.npz", file=sys.stderr)
        return 2
    import scvi

    z = np.load(argv[0])
    pred, epochs = scvi_predict(
        z["counts_ref"],
        z["counts_query"],
        float(z["target_sum"]),
        int(z["seed"]),
        int(z["max_epochs"]) if int(z["max_epochs"]) > 0 else None,
    )
    with open(argv[1], "wb") as f:  # the caller reads it only after a zero exit
        np.savez(f, prediction=pred, epochs=epochs, version=str(scvi.__version__))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
