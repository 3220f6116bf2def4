"""Watch the .h5ad files a reader opens, to test that it closes them when it fails."""

from __future__ import annotations


def opens_and_fails(monkeypatch, fail_target: str) -> list:
    """Record every AnnData ``anndata.read_h5ad`` opens, and make ``fail_target`` (a dotted
    ``monkeypatch.setattr`` target: the step after the read) raise ``RuntimeError("boom")``.

    Returns the list the opened AnnData objects are appended to: after the reader failed,
    each one's ``.file.is_open`` must be False.
    """
    import anndata as ad

    opened: list = []
    read = ad.read_h5ad

    def read_h5ad(*args, **kwargs):
        opened.append(read(*args, **kwargs))
        return opened[-1]

    def fails(_):
        raise RuntimeError("boom")

    monkeypatch.setattr("anndata.read_h5ad", read_h5ad)
    monkeypatch.setattr(fail_target, fails)
    return opened
