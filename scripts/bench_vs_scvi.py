"""This project's β-VAE vs scvi-tools ``SCVI`` on Paul15, expression only, in one run.

Both models see the same data and the same split and are timed the same way:

* data: ``expression/paul15_tradeseq_2660x240.h5ad`` of the shared data folder
  (2660 cells x 240 genes, raw UMI counts; labels ``obs.celltype``); a seeded
  stratified split: 10 % test cells that neither model ever sees, 10 % validation,
  80 % training;
* settings of issue 12: 1 torch thread, 30 epochs, batch 128, 10 latent dims, two
  hidden layers of 128, negative binomial likelihood; everything else at each
  tool's defaults (ours: ``pipeline/conf/`` defaults composed with Hydra as
  ``python -m pipeline stage=train`` would, and the pipeline's own table
  builder and trainer, validation and checkpoints every epoch included; scvi-tools:
  ``SCVI(gene_likelihood="nb")`` and ``train()``);
* wall and CPU (process) time of the training call only (data already in memory),
  s/epoch; with one thread the CPU time is the robust number on a busy machine;
* kNN(15) cell-type accuracy of the latent means of all cells, 5-fold stratified;
* held-out NB log-likelihood per count of the test cells: posterior mean z,
  observed library size, each model's decoder mean and inverse dispersion, one
  log-likelihood function (``vae.losses.nb_log_prob``) for both.

Installs nothing. scvi-tools is optional (``pip install -e '.[bench]'``); without it
only our row is printed, with the reason. Prints a table, writes JSON
(``--out``), and its last line reads ``time ratio ours/scvi-tools: X.XX``.

    .venv/bin/python scripts/bench_vs_scvi.py
    .venv/bin/python scripts/bench_vs_scvi.py --seeds 0 1 2 3 4   # mean of 5 seeds
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

PAUL15 = "expression/paul15_tradeseq_2660x240.h5ad"
SETTINGS = {"epochs": 30, "batch_size": 128, "n_latent": 10, "hidden": 128, "n_layers": 2}


def load_paul15(shared: Path):
    """Raw counts (N, G) float32, labels (N,) str, the AnnData with counts + log-normalised X."""
    import anndata as ad
    import scipy.sparse as sp

    a = ad.read_h5ad(shared / PAUL15)
    counts = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
    counts = counts.astype(np.float32)
    labels = a.obs["celltype"].astype(str).to_numpy()
    return counts, labels, a.obs_names.astype(str).to_numpy(), a.var_names.astype(str).to_numpy()


def make_split(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    from vae.data import stratified_split

    return stratified_split(labels, 0.1, 0.1, seed)


def knn_accuracy(z: np.ndarray, labels: np.ndarray, k: int = 15, seed: int = 0) -> float:
    """Mean 5-fold stratified accuracy of a k-nearest-neighbour classifier on ``z``."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    return float(cross_val_score(KNeighborsClassifier(k), z, labels, cv=cv).mean())


def nb_ll_per_count(counts: np.ndarray, mu, log_theta) -> float:
    """Sum of NB log-likelihoods of ``counts`` (N, G) / total counts."""
    import torch

    from vae.losses import nb_log_prob

    x = torch.as_tensor(counts)
    with torch.no_grad():
        ll = nb_log_prob(x, torch.as_tensor(mu), torch.as_tensor(log_theta)).sum()
    return float(ll) / float(x.sum())


# --------------------------------------------------------------------------- ours


def ours(counts, labels, obs_names, var_names, split, seed: int, extra=()) -> dict:
    import anndata as ad
    import pandas as pd
    import torch
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs
    from pipeline.hardware import DistInfo
    from pipeline.train_args import build_model_args, build_train_args, unknown_label_code
    from vae.data import from_anndata
    from vae.inputs.pairing import make_pairs
    from vae.model import TwoBranchVAE
    from vae.train import train

    s = SETTINGS
    lib = counts.sum(1, keepdims=True)
    expr = ad.AnnData(
        X=np.log1p(counts / np.maximum(lib, 1) * 1e4).astype(np.float32),
        obs=pd.DataFrame({"label": labels}, index=obs_names),
        var=pd.DataFrame(index=var_names),
        layers={"counts": counts},
    )
    expr.uns["has_counts"] = True
    paired = make_pairs(None, expr, "unpaired", seed=seed).adata  # pair=expression_only
    data = from_anndata(paired, "paul15")
    # pair.make_pairs keeps the profiles' order: row i of data is cell i
    assert list(paired.obs["expression_ref"]) == list(obs_names)
    register_configs()
    overrides = [
        "stage=train",
        f"vae.n_latent={s['n_latent']}",
        "vae.n_private=0",
        f"vae.hidden=[{','.join([str(s['hidden'])] * s['n_layers'])}]",
        "vae.expression_likelihood=nb",
        "vae.classify_weight=0",  # unsupervised, as SCVI
        f"trainer.max_epochs={s['epochs']}",
        f"trainer.batch_size={s['batch_size']}",
        "trainer.max_minutes=null",
        "trainer.early_stopping_patience=0",
        f"seed={seed}",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "pipeline" / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    margs = build_model_args(cfg, data, "paul15")
    targs = build_train_args(cfg, "class", unknown_label_code(data.label_names), data)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    torch.manual_seed(seed)
    model = TwoBranchVAE(margs)
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        res = train(model, data, split, targs, dist, tmp)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    x = data.x
    with torch.no_grad():
        post = model.encode(expression=x, log_library=torch.log(data.library))
        z = post.joint[0][:, : margs.n_shared].numpy()
        test = np.flatnonzero(split == "test")
        dec = model.decode(post.joint[0][test], image_rows=torch.zeros(test.size, dtype=bool))
        mu = (dec.expression_scale * data.library[test].view(-1, 1)).numpy()
        log_theta = dec.expression_log_theta.numpy()
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "epochs": res.epochs,
        "knn15_5fold": knn_accuracy(z, labels),
        "heldout_nb_ll_per_count": nb_ll_per_count(counts[test], mu, log_theta),
        "parameters_trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


# ------------------------------------------------------------------------ scvi-tools


def scvi_tools(counts, labels, obs_names, var_names, split, seed: int) -> dict:
    import anndata as ad
    import pandas as pd
    import scvi
    import torch

    s = SETTINGS
    scvi.settings.seed = seed
    scvi.settings.num_threads = 1
    torch.set_num_threads(1)
    a = ad.AnnData(
        X=counts.copy(),
        obs=pd.DataFrame({"celltype": labels}, index=obs_names),
        var=pd.DataFrame(index=var_names),
    )
    scvi.model.SCVI.setup_anndata(a)
    model = scvi.model.SCVI(
        a,
        n_latent=s["n_latent"],
        n_hidden=s["hidden"],
        n_layers=s["n_layers"],
        gene_likelihood="nb",
    )
    idx = [np.flatnonzero(split == k) for k in ("train", "val", "test")]
    t0, c0 = time.perf_counter(), time.process_time()
    model.train(
        max_epochs=s["epochs"],
        batch_size=s["batch_size"],
        accelerator="cpu",
        devices=1,
        datasplitter_kwargs={"external_indexing": idx},
        enable_progress_bar=False,
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    z = model.get_latent_representation(a)
    test = idx[2]
    m = model.module
    m.eval()
    with torch.no_grad():
        x = torch.as_tensor(counts[test])
        bi = torch.zeros(test.size, 1, dtype=torch.long)
        inf = m.inference(x, bi)
        gen = m.generative(inf["qz"].loc, inf["library"], bi)
        px = gen["px"]
        mu, log_theta = px.mu.numpy(), torch.log(px.theta).numpy()
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "epochs": s["epochs"],
        "knn15_5fold": knn_accuracy(z, labels),
        "heldout_nb_ll_per_count": nb_ll_per_count(counts[test], mu, log_theta),
        "version": scvi.__version__,
        "parameters_trained": sum(p.numel() for p in m.parameters() if p.requires_grad),
    }


def _mean_row(runs: list[dict]) -> dict:
    """One row from the runs of several seeds: times summed, metrics averaged."""
    out = {
        k: float(np.mean([r[k] for r in runs])) for k in ("knn15_5fold", "heldout_nb_ll_per_count")
    }
    out.update({k: float(np.sum([r[k] for r in runs])) for k in ("wall_s", "cpu_s", "epochs")})
    out["per_seed"] = runs
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared-data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="one run per seed (split, initialisation, sampling); several: per-seed rows, "
        "then the mean of the metrics and the sum of the times",
    )
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "vs_scvi.json"))
    p.add_argument("--only", choices=["ours", "scvi"], default=None)
    p.add_argument("--epochs", type=int, default=SETTINGS["epochs"], help="(profiling only)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for our model (key=value)")
    args = p.parse_args(argv)
    SETTINGS["epochs"] = args.epochs
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    import torch._dynamo  # noqa: F401

    # torch.optim imports torch._dynamo (~1.3 s) when the first optimizer is built;
    # ``import scvi`` (Lightning) has imported it before scvi-tools' timer starts, so
    # it is imported here for both: the timers measure training, not imports
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    shared = Path(args.shared_data)
    if not (shared / PAUL15).exists():
        print(f"error: {shared / PAUL15} not found (--shared-data DIR)", file=sys.stderr)
        return 2
    counts, labels, obs, var = load_paul15(shared)
    split0 = make_split(labels, args.seeds[0])
    print(
        f"Paul15 {counts.shape[0]} cells x {counts.shape[1]} genes; split train/val/test "
        f"{(split0 == 'train').sum()}/{(split0 == 'val').sum()}/{(split0 == 'test').sum()}; "
        f"seeds {args.seeds}; {args.threads} torch thread(s); "
        f"load {Path('/proc/loadavg').read_text().split()[:3]}",
        flush=True,
    )
    runs: dict[str, list[dict]] = {}
    why_not = ""
    if args.only != "ours":
        try:
            import scvi  # noqa: F401
        except ImportError as e:
            why_not = f"scvi-tools is not importable ({e}); pip install -e '.[bench]' to compare"
    for seed in args.seeds:
        split = make_split(labels, seed)
        if args.only != "scvi":
            r = ours(counts, labels, obs, var, split, seed, args.overrides)
            runs.setdefault("ours", []).append(dict(r, seed=seed))
        if args.only != "ours" and not why_not:
            r = scvi_tools(counts, labels, obs, var, split, seed)
            runs.setdefault("scvi-tools", []).append(dict(r, seed=seed))
    print(
        f"{'model':<12} {'seed':>5} {'wall s':>8} {'CPU s':>8} {'s/epoch':>8} {'kNN(15)':>8} "
        f"{'test NB LL/count':>17}"
    )
    rows: dict[str, dict] = {}
    for name, rs in runs.items():
        shown = [(str(r["seed"]), r) for r in rs]
        if len(rs) > 1:
            rows[name] = _mean_row(rs)
            shown.append(("mean", rows[name]))  # times: the sum over the seeds
        else:
            rows[name] = rs[0]
        for seed, r in shown:
            r["s_per_epoch"] = r["wall_s"] / max(r["epochs"], 1)
            print(
                f"{name:<12} {seed:>5} {r['wall_s']:8.2f} {r['cpu_s']:8.2f} "
                f"{r['s_per_epoch']:8.3f} {r['knn15_5fold']:8.3f} "
                f"{r['heldout_nb_ll_per_count']:17.4f}"
            )
    out = {
        "settings": SETTINGS,
        "our_overrides": args.overrides,
        "threads": args.threads,
        "seeds": args.seeds,
        "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}; load {out['loadavg_end']}")
    if "ours" in rows and "scvi-tools" in rows:
        cpu = rows["ours"]["cpu_s"] / rows["scvi-tools"]["cpu_s"]
        print(f"CPU time ratio ours/scvi-tools: {cpu:.2f}")
        ratio = rows["ours"]["wall_s"] / rows["scvi-tools"]["wall_s"]
        print(f"time ratio ours/scvi-tools: {ratio:.2f}")
    elif why_not:
        print(f"time ratio ours/scvi-tools: not measured: {why_not}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
