"""Expression batches (``vae.batch_key``): the decoder reads the batch, the encoders do
not, evaluate scores how well the batches mix within a class."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.runner import StageError
from tests.helpers.run import TINY_TRAIN
from tests.helpers.vae_toy import make_paired
from vae.analysis.metrics import batch_mixing
from vae.data import PairedDataError, assign_batches, from_anndata, raw_batch, to_batch
from vae.model import TwoBranchVAE, VAEArgs, batch_onehot


def _model(batch_names=("A", "B"), n_genes: int = 12) -> TwoBranchVAE:
    torch.manual_seed(0)
    return TwoBranchVAE(
        VAEArgs(
            n_genes=n_genes,
            crop_size=16,
            n_shared=4,
            n_private=2,
            channels=[8, 16],
            hidden=[16],
            dropout=0.0,
            batch_key="batch" if batch_names else None,
            batch_names=list(batch_names),
        )
    )


def test_batch_onehot_known_rows_one_hot_unknown_rows_the_average():
    like = torch.zeros(1)
    got = batch_onehot(torch.tensor([0, 1, -1, 5]), 2, 4, like)
    assert torch.equal(got, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5]]))
    assert torch.equal(batch_onehot(None, 4, 3, like), torch.full((3, 4), 0.25))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"batch_names": ["A", "B"]}, "needs batch_key"),
        ({"batch_key": "b", "batch_names": ["A", "A"]}, "distinct"),
        ({"batch_key": "b", "batch_names": ["A"]}, "two or more"),
        ({"batch_key": "b", "batch_names": ["A", "B"], "n_genes": 0}, "without genes"),
    ],
)
def test_vae_args_refuse_batch_settings_that_cannot_work(kw, match):
    with pytest.raises(ValueError, match=match):
        VAEArgs(**{"n_genes": 5, "crop_size": 16, "channels": [8, 16], **kw})


def test_the_decoder_reads_the_batch_the_image_and_the_encoders_do_not():
    model = _model().eval()
    d = from_anndata(make_paired(8, seed=1))
    b = to_batch(raw_batch(d, torch.arange(d.n)), torch.device("cpu"))
    post = model.encode(b.image, b.x, b.has_image, b.has_expression, b.mask, b.log_library)
    z = post.joint[0]
    n = z.shape[0]
    with torch.no_grad():
        d0 = model.decode(z, batch=torch.zeros(n, dtype=torch.long))
        d1 = model.decode(z, batch=torch.ones(n, dtype=torch.long))
        avg = model.decode(z)
        unknown = model.decode(z, batch=torch.full((n,), -1))
    assert not torch.allclose(d0.expression_log, d1.expression_log)
    assert torch.allclose(avg.expression_log, unknown.expression_log)
    assert torch.equal(d0.image, d1.image)  # the image decoder never sees the batch
    # the decoder's first layer holds one input column per batch beside the code
    first = model.expression_decoder.net[0]
    assert first.in_features == model.args.n_shared + model.args.n_private + 2


def test_a_model_without_batches_ignores_the_argument():
    model = _model(batch_names=()).eval()
    z = torch.randn(3, model.n_latent)
    with torch.no_grad():
        a = model.decode(z, batch=torch.tensor([0, 1, 0]))
        b = model.decode(z)
    assert torch.equal(a.expression_log, b.expression_log)


def _paired_with_batches(n: int = 12) -> ad.AnnData:
    a = make_paired(n, image_only=3, expression_only=4)
    a.obs["batch"] = np.where(np.arange(a.n_obs) % 2, "run2", "run1")
    return a


def test_assign_batches_codes_the_profiles_and_leaves_image_rows_unknown():
    a = _paired_with_batches()
    d = from_anndata(a)
    names = assign_batches(d, a.obs, "batch", "paired.h5ad")
    assert names == ["run1", "run2"] == d.batch_names
    he = a.obs["has_expression"].to_numpy()
    want = np.where(he, np.arange(a.n_obs) % 2, -1)
    assert d.batch.tolist() == want.tolist()
    # a trained model's names: a batch it never saw is unknown (-1), not a new code
    a.obs.loc[a.obs_names[0], "batch"] = "run9"
    assign_batches(d, a.obs, "batch", "paired.h5ad", names=["run1", "run2"])
    assert d.batch[0].item() == -1
    # the batches travel with the rows into training batches
    raw = raw_batch(d, torch.tensor([1, 0]))
    assert to_batch(raw, torch.device("cpu")).batch.tolist() == [d.batch[1].item(), -1]


def test_assign_batches_reads_the_column_pair_renamed():
    """stage=pair carries an expression column whose name the table already uses
    (specimen, maturation...) as expression_<name> and records it: vae.batch_key=specimen
    means the renamed one then, and only then (review: a user's `ref` read the pipeline's
    `expression_ref`, a profile id, when the rename was guessed from the names)."""
    a = _paired_with_batches()
    a.obs["expression_specimen"] = a.obs.pop("batch")
    a.obs["specimen"] = "pipeline's own"
    d = from_anndata(a)
    renamed = {"specimen": "expression_specimen"}
    assert assign_batches(d, a.obs, "specimen", "p", renamed=renamed) == ["run1", "run2"]
    assert assign_batches(d, a.obs, "specimen", "p") == ["pipeline's own"]
    a.obs["ref"] = a.obs["expression_specimen"]
    a.obs["expression_ref"] = [f"profile{i}" for i in range(a.n_obs)]
    assert assign_batches(d, a.obs, "ref", "p") == ["run1", "run2"]


def test_batch_values_read_a_patient_id_alike_whatever_its_dtype():
    """7 written as 7.0 (a column with gaps) or "7 " is batch "7" (review: a float query
    column decoded every profile in the average batch)."""
    from vae.data import batch_values

    obs = pd.DataFrame({"p": [7.0, 12.0, np.nan, 7.5], "q": ["7 ", " 12", "", "x"]})
    assert batch_values(obs, "p", "q.h5ad").tolist() == ["7", "12", None, "7.5"]
    assert batch_values(obs, "q", "q.h5ad").tolist() == ["7", "12", None, "x"]


def test_assign_batches_names_the_file_and_the_column():
    a = _paired_with_batches()
    d = from_anndata(a)
    with pytest.raises(
        PairedDataError, match=r"paired.h5ad: obs\['donor'\] \(vae.batch_key=donor\)"
    ):
        assign_batches(d, a.obs, "donor", "paired.h5ad")
    a.obs.loc[a.obs_names[0], "batch"] = np.nan  # a profile without its batch
    with pytest.raises(PairedDataError, match="empty for 1 rows with a profile"):
        assign_batches(d, a.obs, "batch", "paired.h5ad")


def test_batch_mixing_tells_batch_islands_from_mixed_batches():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b"], 100)
    batches = np.tile(np.repeat(["x", "y"], 50), 2)
    centre = np.where(labels == "a", 0.0, 10.0)[:, None]
    mixed = centre + rng.normal(size=(200, 3))
    islands = mixed + np.where(batches == "x", 0.0, 5.0)[:, None]
    m, s = batch_mixing(mixed, batches, labels), batch_mixing(islands, batches, labels)
    assert abs(m["separation"]) < 0.1 and s["separation"] > 0.9
    assert m["n_batches"] == 2 and m["classes"] == ["a", "b"] and m["n_cells"] == 200
    # a batch holding more of one class is not a batch effect: scored within classes
    keep = ~((labels == "a") & (batches == "y") & (np.arange(200) % 50 > 10))
    skew = batch_mixing(mixed[keep], batches[keep], labels[keep])
    assert abs(skew["separation"]) < 0.15
    # unknown batches are left out; a class with one batch is not scored
    b2 = batches.astype(object)
    b2[labels == "b"] = None
    one = batch_mixing(mixed, b2, labels)
    assert one["classes"] == ["a"] and one["n_cells"] == 100
    assert batch_mixing(mixed, np.full(200, "x"), labels) is None
    # a class of k + 1 cells or fewer: every cell's neighbours are its whole class, so
    # even batches 100 apart would score as mixed: left out and named (review)
    few = np.r_[np.zeros((6, 2)), np.full((6, 2), 100.0)]
    out = batch_mixing(
        np.r_[few, mixed[:, :2]],
        np.r_[np.repeat(["x", "y"], 6), batches],
        np.r_[np.full(12, "tiny"), labels],
    )
    assert out["classes"] == ["a", "b"] and out["classes_too_small"] == ["tiny"]
    alone = batch_mixing(few, np.repeat(["x", "y"], 6), np.full(12, "c"), k=15)
    assert alone is None
    assert batch_mixing(few, np.repeat(["x", "y"], 6), np.full(12, "c"), k=5)["separation"] > 0.9


def _expression_h5ad(path: Path) -> Path:
    """An expression.h5ad (as stage=expression writes it) whose second batch carries twice
    the counts of half the genes."""
    a = make_paired(0, expression_only=60)
    batch = np.where((np.arange(60) // 3) % 3 == 0, "B", "A")  # every kind in both
    counts = np.asarray(a.layers["counts"], dtype=np.float32).copy()
    counts[batch == "B", ::2] *= 2
    x = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    obs = a.obs[["label", "maturation", "t", "kind"]].copy()
    obs["batch"] = batch
    out = ad.AnnData(X=x, obs=obs, var=a.var)
    out.layers["counts"] = counts
    out.uns["has_counts"] = True
    out.write_h5ad(path)
    return path


def test_train_with_batch_key_saves_the_batches_and_evaluate_scores_their_mixing(
    tmp_path, run_in_process, caplog
):
    from vae.checkpoint import load_model

    expr = _expression_h5ad(tmp_path / "expression.h5ad")
    common = [f"paths.root={tmp_path / 'out'}", "experiment=b", *TINY_TRAIN]
    run_in_process(["pair=expression_only", f"paths.inputs.expression={expr}", *common], "pair")
    run = tmp_path / "out" / "b"
    run_in_process([*common, "vae.batch_key=batch"], "train")
    model, _ = load_model(run / "train" / "model.pt", "cpu")
    assert model.args.batch_key == "batch" and model.args.batch_names == ["A", "B"]
    assert model.expression_decoder.n_batches == 2
    run_in_process([*common, "analysis.split=all"], "evaluate")  # 5 cells a batch per class
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    mix = metrics["batch_mixing"]
    assert mix["batch_key"] == "batch" and set(mix) == {
        "batch_key",
        "column",
        "expression",
        "joint",
    }
    for latent in ("expression", "joint"):
        assert mix[latent]["n_batches"] == 2 and -1 <= mix[latent]["separation"] <= 1
    table = pd.read_csv(run / "evaluate" / "batch_mixing.csv")
    assert table["latent"].tolist() == ["expression", "joint"]
    run_in_process(common, "traverse")  # decodes the path in the average batch
    # embedding the study's own profiles gives back its anomaly scores: each query
    # profile is decoded in its own batch, as the study's were (review: 0.31 apart)
    from vae.api import Study

    study = Study.load(run)
    q = study.embed(study.read(run / "pair" / "paired.h5ad", "h5ad"), "again")
    lat = ad.read_h5ad(run / "train" / "latent.h5ad")
    held = (lat.obs["split"] != "train").to_numpy()  # a training row is its own neighbour
    for col in ("anomaly_expression_reconstruction", "anomaly_score"):
        x, y = q.obs[col].to_numpy(float)[held], lat.obs[col].to_numpy(float)[held]
        assert np.allclose(x, y, atol=1e-4, equal_nan=True), col
    # a query whose batches the study never saw: said once, at WARNING, not per block
    import logging

    other = ad.read_h5ad(run / "pair" / "paired.h5ad")
    other.obs["batch"] = "elsewhere"
    with caplog.at_level(logging.INFO):
        study.embed(other, "other")
        study.embed(other, "other again")
    said = [r for r in caplog.records if "none of the query's batches" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    html = (run / "traverse" / "report.html").read_text()
    assert "Batch mixing (expression code, obs[&#x27;batch&#x27;])" in html  # escaped


def test_a_batch_key_the_table_lacks_stops_train_naming_file_and_column(tmp_path, run_in_process):
    expr = _expression_h5ad(tmp_path / "expression.h5ad")
    common = [f"paths.root={tmp_path / 'out'}", "experiment=b", *TINY_TRAIN]
    run_in_process(["pair=expression_only", f"paths.inputs.expression={expr}", *common], "pair")
    with pytest.raises(
        StageError, match=r"paired.h5ad: obs\['donor'\] \(vae.batch_key=donor\) is missing"
    ):
        run_in_process([*common, "vae.batch_key=donor"], "train")
    assert not (tmp_path / "out" / "b" / "train" / "model.pt").exists()


# --- stage=expression: expression.batch_key ----------------------------------


def _two_batches(n: int = 120, seed: int = 0) -> ad.AnnData:
    """Counts of two cell types in two batches; batch B multiplies every gene by its own
    factor (a run effect), so an uncorrected PCA splits the batches."""
    rng = np.random.default_rng(seed)
    kind = np.repeat(["T1", "T2"], n // 2)
    batch = np.tile(["A", "B"], n // 2)
    g = 30
    base = np.where(kind[:, None] == "T1", np.linspace(1, 20, g), np.linspace(20, 1, g))
    factor = np.exp(rng.normal(0, 1.0, g))
    mean = base * np.where(batch[:, None] == "B", factor, 1.0) * 5
    counts = rng.poisson(mean).astype(np.float32)
    obs = pd.DataFrame({"celltype": kind, "batch": batch}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(g)]))


def _expr_params(**kw):
    from vae.inputs.expression import PreprocessParams

    base = dict(programs={}, require_program_match=False, umap=False, maturation="none")
    base.update(kw)
    base.setdefault("n_top_genes", 20)
    return PreprocessParams(**base)


def test_expression_batch_key_corrects_the_pca_and_leaves_x_as_measured():
    from vae.inputs.expression import preprocess

    a = _two_batches()
    plain = preprocess(a, _expr_params(n_pcs=5)).adata
    fixed = preprocess(a, _expr_params(n_pcs=5, batch_key="batch")).adata
    assert np.array_equal(np.asarray(plain.X), np.asarray(fixed.X))  # X is not corrected
    kinds, batches = fixed.obs["celltype"].to_numpy(), fixed.obs["batch"].to_numpy()
    before = batch_mixing(plain.obsm["X_pca"], batches, kinds)["separation"]
    after = batch_mixing(fixed.obsm["X_pca"], batches, kinds)["separation"]
    assert before > 0.5 and after < before / 2
    rec = fixed.uns["batch_correction"]
    assert rec["method"] == "combat" and rec["batch_key"] == "batch"
    assert rec["batches"] == {"A": 60, "B": 60} and rec["n_genes"] == 20
    # the PCA read the HVGs only: the other genes load 0
    off = ~fixed.var["highly_variable"].to_numpy()
    assert off.any() and not np.asarray(fixed.varm["PCs"])[off].any()


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.obs.drop(columns="batch", inplace=True), "no obs column 'batch'"),
        (lambda a: a.obs.__setitem__("batch", ["A"] * 119 + [None]), "empty for 1 cells"),
        (lambda a: a.obs.__setitem__("batch", ["A"] * 119 + ["C"]), "batch 'C' has one cell"),
    ],
)
def test_expression_batch_key_errors_name_the_setting(change, match):
    from vae.inputs.expression import ExpressionInputError, preprocess

    a = _two_batches()
    change(a)
    with pytest.raises(ExpressionInputError, match=match) as e:
        preprocess(a, _expr_params(batch_key="batch"), source="mine.h5ad")
    assert e.value.field == "expression.batch_key" and "mine.h5ad" in str(e.value)


def test_expression_batch_key_takes_an_integer_patient_id():
    """scanpy's per-batch HVG needs a categorical: an int column failed (review)."""
    from vae.inputs.expression import preprocess

    a = _two_batches()
    a.obs["patient"] = np.where(a.obs["batch"] == "A", 7, 12)
    out = preprocess(a, _expr_params(n_pcs=5, batch_key="patient")).adata
    assert out.uns["batch_correction"]["batches"] == {"12": 60, "7": 60}
    assert "_hvg_batch" not in out.obs and out.obs["patient"].dtype.kind == "i"


def test_expression_and_vae_group_a_patient_id_the_same_way():
    """The expression stage read ids with astype(str) (7.0 -> "7.0"; "7 " and "7" two
    batches) and the VAE as integers, stripped: both now read schema.batch_text."""
    from vae.data import batch_values
    from vae.inputs.expression import preprocess

    a = _two_batches()
    a.obs["patient"] = pd.Series(
        np.where(a.obs["batch"] == "A", 7.0, 12.0), index=a.obs_names, dtype=object
    )
    a.obs.loc[a.obs_names[:10], "patient"] = [" 7", "7 ", "7"] * 3 + ["7"]  # as typed
    out = preprocess(a, _expr_params(n_pcs=5, batch_key="patient")).adata
    groups = out.uns["batch_correction"]["batches"]
    vae_side = pd.Series(batch_values(a.obs, "patient", "x.h5ad")).value_counts().to_dict()
    assert groups == vae_side
    assert set(groups) == {"7", "12"} and sum(groups.values()) == a.n_obs


def test_vae_batch_key_follows_expression_batch_key_unless_set():
    from tests.helpers.run import compose_config

    one = ["stage=all", "expression.batch_key=donor"]  # one command: every stage alike
    assert compose_config(one).vae.batch_key == "donor"
    assert compose_config(["stage=train"]).vae.batch_key is None
    both = compose_config(["stage=train", "expression.batch_key=donor", "vae.batch_key=null"])
    assert both.vae.batch_key is None and both.expression.batch_key == "donor"


def test_train_warns_when_expression_corrected_batches_and_the_vae_was_not_told(
    tmp_path, run_in_process, caplog
):
    """Stage by stage, expression.batch_key given to stage=expression only: pair carries
    the record, train says the VAE got no covariate and how to give it one."""
    import logging

    expr = _expression_h5ad(tmp_path / "expression.h5ad")
    a = ad.read_h5ad(expr)
    a.uns["batch_correction"] = {"batch_key": "batch", "method": "combat", "n_genes": 12}
    a.write_h5ad(expr)
    common = [f"paths.root={tmp_path / 'out'}", "experiment=b", *TINY_TRAIN]
    run_in_process(["pair=expression_only", f"paths.inputs.expression={expr}", *common], "pair")
    paired = ad.read_h5ad(tmp_path / "out" / "b" / "pair" / "paired.h5ad")
    assert paired.uns["expression_batch_correction"]["batch_key"] == "batch"
    # the expression columns pair renamed are recorded (vae.data.batch_column reads it)
    assert json.loads(paired.uns["expression_obs_renamed"]) == {
        "maturation": "expression_maturation"
    }
    with caplog.at_level(logging.WARNING):
        run_in_process(common, "train")
    (msg,) = [r.getMessage() for r in caplog.records if "corrected batches" in r.getMessage()]
    assert "vae.batch_key is null" in msg and "expression.batch_key=batch" in msg


def test_a_checkpoint_whose_weights_do_not_fit_names_the_keys(tmp_path):
    """The load error kept only torch's header line ("Error(s) in loading state_dict
    for TwoBranchVAE:"), so which weights did not fit was lost (review)."""
    from dataclasses import asdict

    from vae.checkpoint import CheckpointError, load_model

    model = _model()
    state = model.state_dict()
    state["expression_decoder.batch_out.weight"] = torch.zeros(12, 2)
    path = tmp_path / "model.pt"
    torch.save({"model_args": asdict(model.args), "model": state}, path)
    with pytest.raises(CheckpointError, match="Unexpected key.*batch_out.weight"):
        load_model(path)
