"""What the drawn lobe cuts hold against the cytoplasm beside them: one table, one JSON.

Decodes the fused code (``latent.h5ad`` ``obsm['X_vae_full']``) of up to ``--n`` crops of
one label as every figure draws them (``decode(render=True)``), and compares the pixels of
the lobe cuts (:func:`vae.lobes.carve_lobes` with the lobe head's count) with the drawn
cytoplasm within 3 px of them: mean RGB and fine detail (grain and granules as drawn) of
the final drawing, the granule layer's rate and the texture layer's grain amplitude as
decoded (the drawing fills the cuts with the cytoplasm's, ``vae.lobes.fill_cuts``). A cut
that reads as a crack although these match is a matter of geometry (docs/vae.md,
"Rounding sized to the lobe").

Example::

    PYTHONPATH=. python scripts/lobe_cut_check.py outputs/real_e2e/train --label Neutrophils \\
        --out outputs/real_e2e/train/lobe_cuts.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run", type=Path, help="train run folder (model.pt, latent.h5ad)")
    ap.add_argument("--label", default="Neutrophils", help="obs['label'] of the crops drawn")
    ap.add_argument("--n", type=int, default=64, help="crops drawn (the first of the label)")
    ap.add_argument(
        "--gp-path",
        type=int,
        metavar="K",
        help="draw the first K steps of the study's GP maturation path (as stage=traverse "
        "builds it; the run's experiment folder read by vae.api.Study) instead of crops",
    )
    ap.add_argument("--out", type=Path, help="JSON written here")
    args = ap.parse_args()

    import anndata as ad
    import torch
    from torch.nn import functional as F

    from vae import model as vm
    from vae.checkpoint import load_model
    from vae.lobes import carve_lobes, lobe_count

    model = load_model(args.run / "model.pt")
    model = model[0] if isinstance(model, tuple) else model
    model.eval()
    if model.lobe_head is None or not getattr(model.args, "nucleus_head", False):
        raise SystemExit(f"{args.run}/model.pt: no lobe head or nucleus layer: nothing is cut")
    a = ad.read_h5ad(args.run / "latent.h5ad")
    if args.gp_path:
        from vae.api import Study, StudyError

        try:
            _, path = Study.load(args.run.parent).maturation_path()
        except StudyError as e:
            raise SystemExit(f"{args.run.parent}: {e}") from None
        codes, what = path.points[: args.gp_path], f"GP path, first {args.gp_path} steps"
    else:
        rows = np.flatnonzero(
            (a.obs["label"].astype(str) == args.label).to_numpy() & a.obs["has_image"].to_numpy()
        )[: args.n]
        if rows.size == 0:
            raise SystemExit(f"{args.run}/latent.h5ad: no crop labelled {args.label!r}")
        codes, what = a.obsm["X_vae_full"][rows], args.label
    z = torch.from_numpy(np.asarray(codes, np.float32))
    with torch.inference_mode():
        dec = model.decode(z, render=True)
        # the decoder's own maps (Decoded keeps them beside the drawing)
        rate, nuc_logits, amp = dec.granule_rate, dec.nucleus_logits, dec.texture_amp
        sharp = vm.NUCLEUS_RENDER_SHARPNESS
        drawn, cut = carve_lobes(nuc_logits, lobe_count(dec.lobe_logits), sharp)
    cut_px = cut > 0.5
    cytoplasm = (dec.mask > 0.5) & (torch.sigmoid(sharp * drawn) < 0.5) & ~cut_px
    beside = (F.max_pool2d(cut, 7, 1, 3) > 0.5) & cytoplasm

    def mean(x: torch.Tensor, where: torch.Tensor) -> list[float]:
        w = where.expand_as(x).float()
        return (x * w).sum((0, 2, 3)).div(w.sum((0, 2, 3)).clamp_min(1)).tolist()

    res = {
        "run": str(args.run),
        "label": what,
        "n_drawn": int(z.shape[0]),
        "n_with_cuts": int(cut_px.flatten(1).any(1).sum()),
        "rgb_cut": mean(dec.image, cut_px),
        "rgb_beside": mean(dec.image, beside),
        "rgb_cytoplasm": mean(dec.image, cytoplasm),
    }
    # the drawing's own fine detail (grain and granules as drawn): what changes between
    # two drawings of the same codes with other seeds of the grain and granule fields
    # (the rest of the drawing is deterministic; a local contrast would read the cut's
    # own edges)
    with torch.inference_mode():
        other = model.decode(z, render=True, seed=1).image
    detail = (dec.image - other).abs().mean(1, keepdim=True)
    res["drawn_detail_cut"], res["drawn_detail_beside"] = (
        mean(detail, cut_px)[0],
        mean(detail, beside)[0],
    )
    if rate is not None:
        res["granule_rate_cut"], res["granule_rate_beside"] = (
            mean(rate, cut_px)[0],
            mean(rate, beside)[0],
        )
    if amp is not None:
        res["grain_cut"], res["grain_beside"] = mean(amp, cut_px)[0], mean(amp, beside)[0]
    for k, v in res.items():
        shown = (
            [round(x, 4) for x in v]
            if isinstance(v, list)
            else (round(v, 4) if isinstance(v, float) else v)
        )
        print(f"{k:<22} {shown}")
    if args.out is not None:
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
