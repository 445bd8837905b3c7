"""Measure every bundled zoo model: clean accuracy and attack success of its planted trigger.

    python -m benchmarks.zoo [--per-class 100] [--out benchmarks/results/zoo.json]

Held-out scenes come from `write_test_data` (a seed disjoint from training). For each poisoned
model the planted trigger is also measured on the clean model, as the baseline it must beat.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from auditor.data import open_dataset
from auditor.evaluate import evaluate
from auditor.models import load_model
from auditor.zoo.build import CONFIG_PATH, ZOO, checkpoint_path, load_manifest, write_test_data
from benchmarks.common import write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/zoo.json"))
    args = parser.parse_args()
    manifest = load_manifest()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = open_dataset(write_test_data(Path(tmp) / "test", per_class=args.per_class))
        clean = load_model(checkpoint_path("clean"), CONFIG_PATH)
        models = {}
        for name, zoo_model in ZOO.items():
            loaded = clean if name == "clean" else load_model(checkpoint_path(name), CONFIG_PATH)
            result = evaluate(loaded, dataset, zoo_model.attack)
            entry: dict[str, object] = {
                "description": zoo_model.description,
                "attack": result.attack,
                "target": result.target,
                "clean_accuracy": round(result.clean_accuracy, 4),
                "attack_success_rate": None
                if result.attack_success_rate is None
                else round(result.attack_success_rate, 4),
                "training": manifest.get(name),
            }
            if zoo_model.attack is not None:
                baseline = evaluate(clean, dataset, zoo_model.attack)
                entry["same_trigger_on_clean_model"] = round(baseline.attack_success_rate or 0.0, 4)
            models[name] = entry
            print(name, json.dumps({k: v for k, v in entry.items() if k != "training"}), file=sys.stderr)
    clean_ca = float(models["clean"]["clean_accuracy"])  # type: ignore[arg-type]
    body = {
        "held_out_images": len(dataset.samples),
        "seconds": round(time.time() - started, 1),
        "quality_bars": {
            "clean_accuracy_min": 0.80,
            "attack_success_min": 0.90,
            "clean_accuracy_drop_max": 0.03,
        },
        "meets_bars": all(
            (m["attack"] is None and float(m["clean_accuracy"]) >= 0.80)  # type: ignore[arg-type]
            or (
                float(m["attack_success_rate"]) >= 0.90  # type: ignore[arg-type]
                and float(m["clean_accuracy"]) >= clean_ca - 0.03
            )  # type: ignore[arg-type]
            for m in models.values()
        ),
        "models": models,
    }
    write_result(args.out, "zoo", body)


if __name__ == "__main__":
    main()
