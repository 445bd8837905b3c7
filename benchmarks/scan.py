"""Detection figures of `scan` on every zoo model, against the generator's ground truth.

    python -m benchmarks.scan [--per-class 120] [--out benchmarks/results/scan.json]

For each zoo model: scan data from `write_scan_data` (5 % poisoned, filed under the target),
then the scan with default settings (classic oracle, 32 images per class sampled). Reported:
verdict, target, victim precision / recall against the planted files, median IoU of trigger
boxes with the planted boxes, transplant success, the share of images the oracle ran on, and
the wall time of each stage.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from auditor.data import open_dataset
from auditor.models import load_model
from auditor.oracle import make_oracle
from auditor.scan import scan
from auditor.zoo.build import CONFIG_PATH, ZOO, checkpoint_path, write_scan_data
from benchmarks.common import box_iou, write_result


def measure(name: str, per_class: int, tmp: Path) -> dict[str, object]:
    truth = write_scan_data(name, tmp / name, per_class=per_class)
    started = time.perf_counter()
    result = scan(
        load_model(checkpoint_path(name), CONFIG_PATH), open_dataset(tmp / name), make_oracle("classic")
    )
    wall = time.perf_counter() - started
    report = result.report
    planted = {p["path"]: p["box"] for p in truth["poisoned"]}
    found = {v.path: v.trigger_box for v in report.victims}
    hits = set(planted) & set(found)
    ious = [box_iou(planted[p], found[p]) for p in hits if found[p] is not None]  # type: ignore[arg-type]
    return {
        "truth": {"target": truth["target"], "attack": truth["attack"], "poisoned": len(planted)},
        "verdict": report.verdict,
        "severity": report.severity,
        "target_labels": list(report.target_labels),
        "trigger_kind": report.trigger.kind,
        "transplant_success_rate": report.trigger.transplant_success_rate,
        "victims_reported": len(found),
        "victim_precision": round(len(hits) / len(found), 4) if found else None,
        "victim_recall": round(len(hits) / len(planted), 4) if planted else None,
        "victims_share_of_images": round(len(found) / truth["images"], 4),
        "median_box_iou": round(float(np.median(ious)), 4) if ious else None,
        "images": truth["images"],
        "oracle_images": report.cost.oracle_images,
        "oracle_share": round(report.cost.oracle_images / truth["images"], 4),
        "images_scored": report.cost.images_scored,
        "oracle_scored": report.cost.oracle_scored,
        "oracle_scored_per_image": round(report.cost.oracle_scored / max(1, report.cost.oracle_images), 2),
        "seconds": {**report.cost.seconds, "total": round(wall, 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-class", type=int, default=120)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scan.json"))
    args = parser.parse_args()
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ZOO:
            models[name] = measure(name, args.per_class, Path(tmp))
            print(name, json.dumps(models[name]), file=sys.stderr)
    body = {
        "settings": {"oracle": "classic", "per_class_sample": 32, "scan_poison_fraction": 0.05},
        "models": models,
    }
    write_result(args.out, "scan", body)


if __name__ == "__main__":
    main()
