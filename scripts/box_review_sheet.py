"""Sheets for reviewing a detection set's white-cell boxes by eye (issue 10).

Two sheets, both from the images and annotations as published:

* ``--all``: every white-cell box of a split, cut out with 30 % of its side around it
  and numbered (sheets of 80, ordered by image width, i.e. TXL-PBC's microscope): what
  a reviewer reads to find boxes that do not hold a white cell. Also writes
  ``<out stem>_index.json`` (number -> image, box) so a box can be looked up.
* ``--review CSV``: each box of a review file (:func:`segmentation.datasets.read_box_review`)
  drawn in its whole field, so a reader can check the review::

    PYTHONPATH=. .venv/bin/python scripts/box_review_sheet.py \\
        --path ../shared/data/smears/txl_pbc --split val --all --out val_boxes.png
    PYTHONPATH=. .venv/bin/python scripts/box_review_sheet.py \\
        --path ../shared/data/smears/txl_pbc --split val \\
        --review docs/reviews/txl_pbc_val_wbc_boxes.csv --out docs/figures/txl_val_reviewed_boxes.png

Docs: docs/segmentation_train.md ("The ground truth, reviewed").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TILE = 118  # px per box on the --all sheets
COLS, ROWS = 10, 8


def all_boxes(ds, out: Path) -> list[Path]:
    """Write numbered sheets of every white-cell box of ``ds``; returns their paths."""
    from PIL import Image, ImageDraw

    rows = sorted(
        ((rec.width, rec, a.bbox) for rec in ds for a in rec.wbcs),
        key=lambda r: (r[0], str(r[1].path)),
    )
    index = [
        {"i": i, "width": w, "image": Path(rec.path).name, "box": [float(v) for v in b]}
        for i, (w, rec, b) in enumerate(rows)
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.stem}_index.json").write_text(json.dumps(index, indent=1))
    per = COLS * ROWS
    paths = []
    for sh in range((len(rows) + per - 1) // per):
        sheet = Image.new("RGB", (COLS * TILE, ROWS * (TILE + 12)), "white")
        draw = ImageDraw.Draw(sheet)
        for k, (w, rec, b) in enumerate(rows[sh * per : (sh + 1) * per]):
            im = Image.open(rec.path).convert("RGB")
            x0, y0, x1, y1 = b
            m = 0.3 * max(x1 - x0, y1 - y0)
            cx0, cy0 = max(0.0, x0 - m), max(0.0, y0 - m)
            c = im.crop((cx0, cy0, min(im.width, x1 + m), min(im.height, y1 + m)))
            ImageDraw.Draw(c).rectangle(
                [x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0],
                outline=(0, 230, 0),
                width=max(1, c.width // 60),
            )
            c.thumbnail((TILE - 4, TILE - 4))
            x, y = (k % COLS) * TILE, (k // COLS) * (TILE + 12)
            sheet.paste(c, (x, y))
            draw.text((x + 2, y + TILE - 2), f"{sh * per + k} w{w}", fill=(0, 0, 0))
        p = out if sh == 0 else out.with_name(f"{out.stem}_{sh}{out.suffix}")
        sheet.save(p)
        paths.append(p)
    return paths


def review_sheet(ds, review, out: Path, side: int = 280) -> Path:
    """Draw each reviewed box (green, with its reviewed category) in its whole field."""
    from PIL import Image, ImageDraw

    recs = {Path(r.path).name: r for r in ds}
    tiles = []
    for e in review:
        rec = recs.get(e.image)
        if rec is None:
            continue  # another split
        im = Image.open(rec.path).convert("RGB")
        ImageDraw.Draw(im).rectangle(
            list(e.bbox), outline=(0, 230, 0), width=max(2, im.width // 150)
        )
        k = side / max(im.size)
        im = im.resize((round(im.width * k), round(im.height * k)))
        ImageDraw.Draw(im).text((4, 4), f"line {e.row}: {e.category}", fill=(0, 0, 0))
        tiles.append(im)
    if not tiles:
        raise FileNotFoundError("no image of the review is in this split")
    sheet = Image.new("RGB", ((side + 5) * len(tiles) - 5, side), "white")
    for k, t in enumerate(tiles):
        sheet.paste(t, (k * (side + 5), 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def main(argv: list[str] | None = None) -> None:
    from segmentation.datasets import READERS, read_box_review

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--path", required=True, help="a YOLO smear set (TXL-PBC)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--format", default="yolo", choices=["coco", "voc", "yolo"])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--all", action="store_true", help="every white-cell box, numbered")
    what.add_argument("--review", help="a review CSV: its boxes in their fields")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.format == "coco":  # one JSON with per-image splits
        ds = READERS["coco"](a.path).split(a.split)
    else:
        ds = READERS[a.format](a.path, splits=[a.split])
    if a.all:
        paths = all_boxes(ds, a.out)
        print(f"{sum(len(r.wbcs) for r in ds)} boxes on {len(paths)} sheet(s): {paths[0]} ...")
    else:
        print(review_sheet(ds, read_box_review(a.review), a.out))


if __name__ == "__main__":
    from segmentation.datasets import AnnotationError

    try:
        main()
    except (AnnotationError, FileNotFoundError) as e:
        sys.exit(f"box_review_sheet.py: {e}")
