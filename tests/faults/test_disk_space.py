"""A disk too full for an ``.h5ad``: h5py crashed the process (segmentation fault,
no message, exit 139) when the disk filled during ``pair``'s gzip write, found by
filling a 5 MiB tmpfs (2026-12-05). Every ``.h5ad`` the stages write is now checked
against the free space before a byte is written."""

from __future__ import annotations

import errno
import os
import shutil
from collections import namedtuple

import anndata as ad
import numpy as np
import pytest

from pipeline import runner
from segmentation.io import atomic_path, final_name, h5ad_bytes, write_h5ad
from tests.faults.conftest import cfg_for

_Usage = namedtuple("_Usage", "total used free")


def _crops_table(n: int = 600, seed: int = 0) -> ad.AnnData:
    """Rows like ``paired.h5ad``'s: masked crops (white outside a disc), masks, X."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    disc = (yy - 16) ** 2 + (xx - 16) ** 2 < 12**2
    crops = np.full((n, 32, 32, 3), 255, np.uint8)
    crops[:, disc] = rng.integers(60, 200, (n, int(disc.sum()), 3), dtype=np.uint8)
    a = ad.AnnData(rng.poisson(1.0, (n, 50)).astype(np.float32))
    a.obsm["crops"] = crops
    a.obsm["masks"] = np.broadcast_to(disc, (n, 32, 32)).copy()
    a.obs["label"] = rng.choice(["band", "blast"], n)
    return a


def _full_disk(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _Usage(10 * free, 9 * free, free))


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_the_estimate_is_close_to_the_file_written(tmp_path, compression):
    """Within 25 % of the bytes written (on the real chain's paired.h5ad, gzip: 16.0 MiB
    estimated for 14.9 written; its latent.h5ad 4.8 for 3.3, the 1 MiB allowance)."""
    a = _crops_table()
    path = tmp_path / "t.h5ad"
    write_h5ad(a, path, compression=compression)
    size = os.path.getsize(path)
    est = h5ad_bytes(a, compression)
    assert size <= est <= 1.25 * size + (1 << 20), (compression, size, est)


def test_a_write_that_will_not_fit_is_refused_before_a_byte_is_written(tmp_path, monkeypatch):
    final = tmp_path / "paired.h5ad"
    final.write_text("previous result")
    a = _crops_table()
    _full_disk(monkeypatch, free=1 << 20)
    with pytest.raises(OSError) as e, atomic_path(final) as tmp:
        write_h5ad(a, tmp, compression="gzip")
    assert e.value.errno == errno.ENOSPC
    assert e.value.filename == str(final)  # the file the user knows, not the temporary
    assert "MiB needed, 1 MiB free" in e.value.strerror and "paths.root" in e.value.strerror
    assert final.read_text() == "previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paired.h5ad"]


def test_a_write_that_fits_goes_on(tmp_path, monkeypatch):
    a = _crops_table(100)
    _full_disk(monkeypatch, free=int(h5ad_bytes(a)) + 1)
    write_h5ad(a, tmp_path / "t.h5ad")
    assert ad.read_h5ad(tmp_path / "t.h5ad").n_obs == 100


def test_final_name_of_a_temporary(tmp_path):
    final = tmp_path / "cells.h5ad"
    with atomic_path(final) as tmp:
        assert final_name(tmp) == final
        tmp.write_text("x")
    assert final_name(tmp_path / ".hidden.h5ad") == tmp_path / ".hidden.h5ad"


def test_the_stage_says_so_in_one_line(tmp_path, toy, monkeypatch, capsys):
    """Through the runner: exit 1 with the file and the sizes in the error line."""

    def body(ctx):
        with ctx.atomic("smears") as tmp:
            write_h5ad(_crops_table(), tmp, compression="gzip")

    toy("simulate", body)
    root = tmp_path / "out"
    cfg = cfg_for(root, "simulate")
    _full_disk(monkeypatch, free=1 << 20)
    capsys.readouterr()
    assert runner.main(cfg) == 1
    line = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:"))
    assert str(root / "t" / "simulate" / "smears") in line and "MiB free" in line
