"""Pack a segment_train checkpoint into the compact shipped-detector file.

Usage:
  python scripts/pack_detector.py outputs/det_ft/segment_train/model.pt \
      segmentation/weights/wbc_detector.pt [--note "how it was trained"]

Large weight tensors become int8 with one fp32 scale per output channel
(segmentation/shipped.py); optimizer, scheduler and RNG states are dropped.
The file keeps ``model_args`` (to rebuild the network), ``cell_px`` (the white-cell
size in network px it was trained at), ``estimate_scale: True`` (smears are scaled
by measuring each image) and where it came from. Prints the size and the largest
weight error of the round trip. docs/segmentation_train.md, "Shipped detector".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from segmentation.io import atomic_path, load_torch_file
from segmentation.shipped import PACKED_FORMAT, pack_state, unpack_state

LIMIT_MB = 25.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="segment_train model.pt")
    ap.add_argument("out")
    ap.add_argument("--note", default="", help="provenance text stored in the file")
    a = ap.parse_args()
    ck = load_torch_file(a.checkpoint, "cpu", "checkpoint")
    state = ck["model"]
    packed = pack_state(state)
    out = {
        "model": packed,
        "model_format": PACKED_FORMAT,
        "model_args": dict(ck["model_args"]),
        "input_scale": None,
        "cell_px": float(ck.get("cell_px") or 40.0),
        "estimate_scale": True,
        "source": {
            "checkpoint": str(a.checkpoint),
            "epoch": int(ck.get("epoch", -1)),
            "data": [
                s.get("name") for s in ck.get("config", {}).get("data", {}).get("smear_sources", [])
            ],
            "note": a.note,
        },
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(a.out)) as tmp:
        torch.save(out, tmp)
    size = Path(a.out).stat().st_size / 1e6
    back = unpack_state(packed)
    err = max(
        float((back[k].float() - v.float()).abs().max() / v.float().abs().max().clamp_min(1e-12))
        for k, v in state.items()
        if v.is_floating_point() and v.numel()
    )
    n = sum(v.numel() for v in state.values() if v.is_floating_point())
    print(json.dumps({"out": a.out, "mb": round(size, 2), "params": n, "max_rel_err": err}))
    if size > LIMIT_MB:
        raise SystemExit(f"{a.out}: {size:.1f} MB is over the {LIMIT_MB} MB package-data limit")


if __name__ == "__main__":
    main()
