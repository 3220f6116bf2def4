"""Image sources (``vae.image_batch_key``): the image decoder reads each crop's source
(microscope, stain), the encoders, the expression decoder and the lobe head do not; a
code without a crop is drawn in the average of the sources."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.runner import StageError
from tests.helpers.run import TINY_TRAIN
from tests.helpers.vae_toy import make_paired
from vae.data import PairedDataError, assign_image_batches, from_anndata, raw_batch, to_batch
from vae.model import TwoBranchVAE, VAEArgs


def _model(sources=("bccd", "txl"), **kw) -> TwoBranchVAE:
    torch.manual_seed(0)
    return TwoBranchVAE(
        VAEArgs(
            n_genes=12,
            crop_size=16,
            n_shared=4,
            n_private=2,
            channels=[8, 16],
            hidden=[16],
            dropout=0.0,
            image_batch_key="image_source" if sources else None,
            image_batch_names=list(sources),
            **kw,
        )
    )


def _paired_with_sources() -> ad.AnnData:
    a = make_paired(12, image_only=3, expression_only=4)
    has = a.obs["has_image"].to_numpy().astype(bool)
    src = np.where(np.arange(a.n_obs) % 2, "txl", "bccd").astype(object)
    src[~has] = None  # a profile without a crop has no source
    a.obs["image_source"] = src
    return a


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"image_batch_names": ["A", "B"]}, "needs image_batch_key"),
        ({"image_batch_key": "s", "image_batch_names": ["A", "A"]}, "distinct"),
        ({"image_batch_key": "s", "image_batch_names": ["A"]}, "two or more"),
    ],
)
def test_vae_args_refuse_source_settings_that_cannot_work(kw, match):
    with pytest.raises(ValueError, match=match):
        VAEArgs(**{"n_genes": 5, "crop_size": 16, "channels": [8, 16], **kw})


def test_the_image_decoder_reads_the_source_nothing_else_does():
    model = _model(nucleus_head=True, lobe_head=True).eval()
    d = from_anndata(make_paired(8, seed=1))
    b = to_batch(raw_batch(d, torch.arange(d.n)), torch.device("cpu"))
    post = model.encode(b.image, b.x, b.has_image, b.has_expression, b.mask, b.log_library)
    z = post.joint[0]
    n = z.shape[0]
    with torch.no_grad():
        d0 = model.decode(z, image_batch=torch.zeros(n, dtype=torch.long), render=False)
        d1 = model.decode(z, image_batch=torch.ones(n, dtype=torch.long), render=False)
        avg = model.decode(z, render=False)
        unknown = model.decode(z, image_batch=torch.full((n,), -1), render=False)
    assert not torch.allclose(d0.image, d1.image)
    assert torch.allclose(avg.image, unknown.image) and torch.allclose(avg.mask, unknown.mask)
    # the average source lies between the two, as the decoder's input does
    assert not torch.allclose(avg.image, d0.image) and not torch.allclose(avg.image, d1.image)
    assert torch.equal(d0.expression_log, d1.expression_log)  # genes are not a microscope's
    assert torch.equal(d0.lobe_logits, d1.lobe_logits)  # nor is a nucleus's lobe count
    # the decoder's input holds one column per source beside the image part of the code
    assert model.image_decoder.fc.in_features == 4 + 2 + 2  # shared, image-private, sources
    # a model without sources ignores the argument
    plain = _model(sources=()).eval()
    with torch.no_grad():
        a = plain.decode(z, image_batch=torch.zeros(n, dtype=torch.long))
        c = plain.decode(z)
    assert torch.equal(a.image, c.image)


def test_the_loss_scores_each_crop_in_its_own_source():
    """Training decodes every crop (fused, image alone, from its profile) in its source:
    the same codes scored in the other source give another image term."""
    model = _model()
    a = _paired_with_sources()
    d = from_anndata(a)
    assign_image_batches(d, a.obs, "image_source", "paired.h5ad")
    b = to_batch(raw_batch(d, torch.arange(d.n)), torch.device("cpu"))
    assert b.image_batch is not None

    def image_term(codes):
        torch.manual_seed(3)
        out = model(
            b.image, b.mask, b.x, b.has_image, b.has_expression, b.log_library, image_batch=codes
        )
        return out.joint.image

    own = image_term(b.image_batch)
    again = image_term(b.image_batch)
    swapped = image_term(torch.where(b.image_batch >= 0, 1 - b.image_batch, b.image_batch))
    assert torch.equal(own, again)
    rows = b.has_image
    assert not torch.allclose(own[rows], swapped[rows])


def test_assign_image_batches_codes_the_crops_and_leaves_profiles_unknown():
    a = _paired_with_sources()
    d = from_anndata(a)
    names = assign_image_batches(d, a.obs, "image_source", "paired.h5ad")
    assert names == ["bccd", "txl"] == d.image_batch_names
    has = a.obs["has_image"].to_numpy().astype(bool)
    codes = d.image_batch.numpy()
    assert (codes[~has] == -1).all()
    want = np.where(np.arange(a.n_obs) % 2, 1, 0)
    assert (codes[has] == want[has]).all()
    # a trained model's sources: a crop of any other source is drawn as the average
    a.obs.loc[a.obs_names[0], "image_source"] = "raabin"
    assign_image_batches(d, a.obs, "image_source", "q.h5ad", ["bccd", "txl"])
    assert d.image_batch[0] == -1


def test_assign_image_batches_names_the_file_and_the_column():
    a = _paired_with_sources()
    d = from_anndata(a)
    with pytest.raises(PairedDataError, match=r"paired.h5ad: obs\['scope'\].*missing"):
        assign_image_batches(d, a.obs, "scope", "paired.h5ad")
    a.obs.loc[a.obs_names[0], "image_source"] = None  # a crop without its source
    with pytest.raises(PairedDataError, match=r"empty for 1 rows with a crop \(first: "):
        assign_image_batches(d, a.obs, "image_source", "paired.h5ad")


def test_train_with_image_sources_saves_them_and_evaluate_embed_use_them(tmp_path, run_in_process):
    from vae.api import Study
    from vae.checkpoint import load_model

    a = _paired_with_sources()
    a.write_h5ad(tmp_path / "paired.h5ad")
    common = [
        f"paths.root={tmp_path / 'out'}",
        f"paths.inputs.paired={tmp_path / 'paired.h5ad'}",
        "experiment=s",
        *TINY_TRAIN,
    ]
    run_in_process([*common, "vae.image_batch_key=image_source"], "train")
    run = tmp_path / "out" / "s"
    model, _ = load_model(run / "train" / "model.pt", "cpu")
    assert model.args.image_batch_key == "image_source"
    assert model.args.image_batch_names == ["bccd", "txl"]
    assert "image sources (vae.image_batch_key=image_source), crops each: bccd" in (
        (run / "train" / "train.log").read_text()
    )
    run_in_process([*common, "analysis.split=all"], "evaluate")
    # the path and sweeps: drawn in the average of the sources, or under one the user names
    run_in_process(common, "traverse")
    avg = pd.read_csv(run / "traverse" / "path_features_gp.csv")
    summary = json.loads((run / "traverse" / "traverse_summary.json").read_text())
    assert summary["draw_source"] == "average of the sources"
    run_in_process([*common, "analysis.draw_source=txl", "overwrite=true"], "traverse")
    txl = pd.read_csv(run / "traverse" / "path_features_gp.csv")
    summary = json.loads((run / "traverse" / "traverse_summary.json").read_text())
    assert summary["draw_source"] == "txl"
    drawn = ["cytoplasm_hue", "cytoplasm_saturation", "nucleus_fraction", "cell_area"]
    drawn = [c for c in drawn if c in avg]
    assert drawn and not np.allclose(
        avg[drawn].to_numpy(float), txl[drawn].to_numpy(float), equal_nan=True
    )
    with pytest.raises(
        StageError,
        match=r"analysis.draw_source='raabin' is not one of the model's image sources: bccd, txl",
    ):
        run_in_process([*common, "analysis.draw_source=raabin", "overwrite=true"], "traverse")
    # embedding the study's own crops gives back their image reconstruction scores: each
    # query crop is drawn in its own source, as the study's were
    study = Study.load(run)
    q = study.embed(study.read(tmp_path / "paired.h5ad", "h5ad"), "again")
    lat = ad.read_h5ad(run / "train" / "latent.h5ad")
    col = "anomaly_image_reconstruction"
    assert col in q.obs and col in lat.obs
    x, y = q.obs[col].to_numpy(float), lat.obs[col].to_numpy(float)
    assert np.allclose(x, y, atol=1e-4, equal_nan=True)
    # the API draws codes as under a named microscope, or in the average
    assert study.image_sources == ["bccd", "txl"]
    z = np.asarray(lat.obsm["X_vae_full"][:4], np.float32)
    under = {src: study.decode(z, source=src).images for src in (None, "bccd", "txl")}
    assert not np.allclose(under["bccd"], under["txl"])
    assert not np.allclose(under[None], under["bccd"])
    from vae.api import StudyError

    with pytest.raises(
        StudyError,
        match=r"decode: source='raabin' is not one of the model's image sources: bccd, txl",
    ):
        study.decode(z, source="raabin")
    # ... and without the column they are drawn in the average: other scores
    other = ad.read_h5ad(tmp_path / "paired.h5ad")
    del other.obs["image_source"]
    q2 = study.embed(other, "no sources")
    x2 = q2.obs[col].to_numpy(float)
    has = ~np.isnan(y)
    assert not np.allclose(x2[has], y[has], atol=1e-4)


def test_an_image_source_column_the_table_lacks_stops_train(tmp_path, run_in_process):
    make_paired(12).write_h5ad(tmp_path / "paired.h5ad")
    common = [
        f"paths.root={tmp_path / 'out'}",
        f"paths.inputs.paired={tmp_path / 'paired.h5ad'}",
        "experiment=s",
        *TINY_TRAIN,
    ]
    with pytest.raises(
        StageError, match=r"paired.h5ad: obs\['scope'\] \(vae.image_batch_key=scope\) is missing"
    ):
        run_in_process([*common, "vae.image_batch_key=scope"], "train")
    assert not (tmp_path / "out" / "s" / "train" / "model.pt").exists()


def test_one_source_only_trains_without_the_covariate(tmp_path, run_in_process, caplog):
    import logging

    a = make_paired(12)
    a.obs["image_source"] = pd.Series("bccd", index=a.obs_names, dtype=object)
    a.write_h5ad(tmp_path / "paired.h5ad")
    common = [
        f"paths.root={tmp_path / 'out'}",
        f"paths.inputs.paired={tmp_path / 'paired.h5ad'}",
        "experiment=s",
        *TINY_TRAIN,
    ]
    from vae.checkpoint import load_model

    with caplog.at_level(logging.WARNING):
        run_in_process([*common, "vae.image_batch_key=image_source"], "train")
    assert any("every crop is from 'bccd'" in r.getMessage() for r in caplog.records)
    model, _ = load_model(tmp_path / "out" / "s" / "train" / "model.pt", "cpu")
    assert model.args.image_batch_names == [] and model.args.image_batch_key is None
