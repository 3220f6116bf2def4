"""scripts/labelled_crops_check.py: a labelled source sorted into folders as a user would."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.helpers.run import load_script


def test_crops_are_sorted_into_labelled_class_folders_and_a_query(tmp_path):
    """``shots`` crops per class go to labelled/<class>/ (every crop of a smaller class),
    the rest to query/<parent>/ with their class in the returned truth, keyed as
    Study.read names a query crop; the same seed sorts alike; a used folder is refused."""
    mod = load_script("labelled_crops_check")
    src = tmp_path / "src"
    items = []
    for ds, n_a, n_b in (("d1", 5, 2), ("d2", 3, 0)):
        (src / ds).mkdir(parents=True)
        for i in range(n_a + n_b):
            p = src / ds / f"{i:03d}.bmp"
            p.write_bytes(b"x")
            items.append((p, "a" if i < n_a else "b"))
    truth = mod.sort_folders(items, tmp_path / "w", shots=3, seed=0)
    lab = {
        c.name: sorted(f.name for f in c.iterdir()) for c in (tmp_path / "w" / "labelled").iterdir()
    }
    assert len(lab["a"]) == 3 and len(lab["b"]) == 2  # class b has only 2 crops
    query = sorted(
        f"{d.name}/{f.name}" for d in (tmp_path / "w" / "query").iterdir() for f in d.iterdir()
    )
    assert sorted(truth.index) == query and len(query) == 10 - 5
    assert set(truth) == {"a"}
    linked = {f.resolve() for c in (tmp_path / "w" / "labelled").iterdir() for f in c.iterdir()}
    assert linked.isdisjoint({(src / q).resolve() for q in query})  # no crop on both sides
    again = mod.sort_folders(items, tmp_path / "w2", shots=3, seed=0)
    pd.testing.assert_series_equal(truth, again)
    with pytest.raises(SystemExit, match="not empty"):
        mod.sort_folders(items, tmp_path / "w", shots=3, seed=0)
    assert np.all([(tmp_path / "w" / "query" / q).is_symlink() for q in query])
