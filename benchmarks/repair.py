"""Repair efficiency: the tool's compact repair against a CleanCLIP-style fine-tune on clean data.

    python -m benchmarks.repair [--models patch-random patch-corner] [--baseline-budget 10]
        [--out benchmarks/results/repair.json]

Per patch model of the zoo:
1. scan data (40 scenes per class, 5 % poisoned) is scanned with default settings and the scan's
   outputs written, as `clip-audit scan --out` does;
2. the tool: `auditor.repair` with default settings on the scan's compact set; its own early
   stop decides when to end (it never sees the planted trigger);
3. the baseline: the same model, the same optimizer (AdamW, same learning rate, batch size and
   schedule shape), CleanCLIP's objective (contrastive + in-modal self-supervision) on clean
   zoo pairs with varied captions, whole model trainable, no knowledge of the trigger. It runs
   until attack success is at most 0.05 or its budget, 10x the images the tool saw (all of the
   steps its loop ran, the anchor pool's batches included; `--baseline-budget`), is spent.

Attack success and clean accuracy are measured with the *planted* trigger on held-out test
scenes (never used for training or for the tool's decisions), every 10 steps for the baseline
and at the end for the tool. Reported per run: steps, images seen, and the measurements.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from auditor.data import open_dataset
from auditor.models import LoadedModel, load_model
from auditor.oracle import make_oracle
from auditor.repair import (
    HoldOut,
    Measurement,
    RepairConfig,
    TrainingPairs,
    fine_tune,
    load_scan_outputs,
    measure,
    preprocess_images,
    repair,
)
from auditor.scan import scan
from auditor.scan.writers import write_outputs
from auditor.zoo.build import (
    CONFIG_PATH,
    ZOO,
    checkpoint_path,
    training_pairs,
    write_scan_data,
    write_test_data,
)
from benchmarks.common import write_result

SUCCESS_BAR = 0.05
BASELINE_BUDGET = 10  # times the images the tool's repair saw (the default of --baseline-budget)


def planted_holdout(loaded: LoadedModel, test_root: Path, name: str) -> tuple[HoldOut, list[str], int]:
    """Held-out test scenes and the same scenes of other labels with the planted trigger."""

    from auditor.data import load_image, pil_to_array

    attack = ZOO[name].attack
    assert attack is not None and attack.target is not None
    dataset = open_dataset(test_root)
    images = [pil_to_array(load_image(dataset.absolute(s))) for s in dataset.samples]
    labels = np.array([dataset.label_index(s) for s in dataset.samples])
    target = dataset.classes.index(attack.target)
    attacked = [
        attack.trigger.apply(x, np.random.default_rng((0, i)))[0]
        for i, x in enumerate(images)
        if labels[i] != target
    ]

    return (
        HoldOut(preprocess_images(loaded, images), labels, None, preprocess_images(loaded, attacked)),
        dataset.classes,
        target,
    )


def clean_pairs(per_class: int) -> TrainingPairs:
    pairs = training_pairs(ZOO["clean"], per_class=per_class, seed=4242)
    n = len(pairs.captions)
    return TrainingPairs(tuple(pairs.images), tuple(pairs.captions), (False,) * n, (True,) * n)


def run_model(
    name: str, tmp: Path, clean: TrainingPairs, budget: float = BASELINE_BUDGET
) -> dict[str, object]:
    scan_root = tmp / f"{name}-scan"
    write_scan_data(name, scan_root, per_class=40)
    test_root = write_test_data(tmp / f"{name}-test", per_class=40)
    dataset = open_dataset(scan_root)

    loaded = load_model(checkpoint_path(name), CONFIG_PATH)
    result = scan(loaded, dataset, make_oracle("classic"))
    write_outputs(result, tmp / f"{name}-report", "json", dataset)
    outputs = load_scan_outputs(tmp / f"{name}-report" / "report.json")
    holdout, classes, target = planted_holdout(loaded, test_root, name)
    before = measure(loaded, classes, holdout, target)

    started = time.perf_counter()
    tool = repair(loaded, dataset, outputs)
    tool_seconds = time.perf_counter() - started
    tool_after = measure(loaded, classes, holdout, target)
    print(f"{name}: tool {tool.steps} steps, {tool.images_seen} images -> {tool_after}", file=sys.stderr)

    baseline_loaded = load_model(checkpoint_path(name), CONFIG_PATH)
    config = replace(
        RepairConfig(),
        towers="both",
        image_blocks=None,
        anchor=0.0,
        trigger_augment=0.0,
        in_modal=1.0,
        steps=math.ceil(budget * tool.images_seen / RepairConfig.batch_size),
    )
    history: list[tuple[int, Measurement]] = []

    def baseline_stop(step: int) -> bool:
        history.append((step, measure(baseline_loaded, classes, holdout, target)))
        return step > 0 and (history[-1][1].attack_success or 0.0) <= SUCCESS_BAR

    started = time.perf_counter()
    steps = fine_tune(baseline_loaded, clean, config, baseline_stop)
    baseline_seconds = time.perf_counter() - started
    reached = (history[-1][1].attack_success or 0.0) <= SUCCESS_BAR
    print(f"{name}: baseline {steps} steps -> {history[-1][1]}", file=sys.stderr)
    return {
        "before": before.to_dict() | {"per_class_accuracy": None},
        "compact_set": {
            "pairs": len(outputs.compact),
            "fraction_of_scan_data": len(outputs.compact) / len(dataset.samples),
        },
        "tool": {
            "steps": tool.steps,
            "images_seen": tool.images_seen,
            "stopped": tool.stopped,
            "after": _rates(tool_after),
            "clean_accuracy_drop": round(before.clean_accuracy - tool_after.clean_accuracy, 4),
            "seconds": round(tool_seconds, 1),
        },
        "baseline": {
            "pairs": len(clean.captions),
            "steps": steps,
            "images_seen": steps * config.batch_size,
            "budget_images": config.steps * config.batch_size,
            "reached_bar": reached,
            "after": _rates(history[-1][1]),
            "seconds": round(baseline_seconds, 1),
            "curve": [{"step": s, **_rates(m)} for s, m in history[:: max(1, len(history) // 20)]],
        },
        "images_ratio_tool_to_baseline": round(tool.images_seen / (steps * config.batch_size), 4),
    }


def _rates(m: Measurement) -> dict[str, float | None]:
    return {"clean_accuracy": round(m.clean_accuracy, 4), "attack_success": round(m.attack_success or 0.0, 4)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["patch-random", "patch-corner"])
    parser.add_argument("--clean-per-class", type=int, default=250)
    parser.add_argument("--baseline-budget", type=float, default=BASELINE_BUDGET, help="x the tool's images")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/repair.json"))
    args = parser.parse_args(argv)
    clean = clean_pairs(args.clean_per_class)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results[name] = run_model(name, Path(tmp), clean, args.baseline_budget)
    write_result(
        args.out,
        "repair",
        {
            "success_bar": SUCCESS_BAR,
            "baseline_budget": f"{args.baseline_budget:g}x the tool's images",
            "measured_on": "held-out test scenes (40 per class), planted trigger",
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
