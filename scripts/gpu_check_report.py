"""gpu_check.json from a run of scripts/gpu_check.sh: stage seconds and metrics.

    python scripts/gpu_check_report.py RUN_DIR N_DEVICES SINGLE_S DDP_S|null

RUN_DIR is outputs/<root>/<experiment>; each stage folder's manifest.json gives its
status and seconds, its metrics file (segment_train metrics.json, segment
summary.json, train train_summary.json, evaluate metrics.json, traverse
traverse_summary.json) is copied in; ``<stage>/ddp`` folders are the torchrun runs.
"""

import json
import sys
from pathlib import Path

run, n, single_s, ddp_s = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
METRICS = {
    "segment_train": "metrics.json",
    "segment": "summary.json",
    "train": "train_summary.json",
    "evaluate": "metrics.json",
    "traverse": "traverse_summary.json",
}


def read(d: Path) -> dict:
    out = {}
    man = d / "manifest.json"
    if man.exists():
        m = json.loads(man.read_text())
        out["status"], out["seconds"] = m.get("status"), m.get("seconds")
    name = METRICS.get(d.name if d.parent == run else d.parent.name)
    if name and (d / name).exists():
        out["metrics"] = json.loads((d / name).read_text())
    return out


import torch  # noqa: E402 - after the argument parsing, for the device names

devices = [torch.cuda.get_device_name(i) for i in range(n)] if torch.cuda.is_available() else []
stages = {d.name: read(d) for d in sorted(run.iterdir()) if (d / "manifest.json").exists()}
ddp = {d.parent.name: read(d) for d in sorted(run.glob("*/ddp")) if (d / "manifest.json").exists()}
report = {
    "devices": devices,
    "torch": torch.__version__,
    "precision": "bf16",
    "single_device": {"wall_s": int(single_s), "stages": stages},
    "ddp": None if ddp_s == "null" else {"processes": n, "wall_s": int(ddp_s), "stages": ddp},
}
path = run.parent / "gpu_check.json"
path.write_text(json.dumps(report, indent=2) + "\n")
print(f"gpu_check: {n} device(s); single device {single_s} s; DDP {ddp_s} s; wrote {path}")
for name, s in stages.items():
    print(f"  {name:14s} {s.get('seconds')} s  {s.get('status')}")
for name, s in ddp.items():
    print(f"  {name + ' (ddp)':14s} {s.get('seconds')} s  {s.get('status')}")
