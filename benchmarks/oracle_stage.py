"""The oracle stage with the engine out of the way: this checkout against an earlier commit.

    python -m benchmarks.oracle_stage --before REF [--per-class 22] [--runs 2]
                                      [--out benchmarks/results/oracle_stage.json]

A random-init ViT of two layers at 224 px (its image tower costs little, as int8 does on a CPU
with VNNI, or any GPU engine) scans zoo scenes rendered at 224 px with the default settings.
What is left is the work around the engine: decoding, segmentation, crops, ablations and
preprocessing. `REF` is checked out into a temporary git worktree; the two take turns, `--runs`
scans each, every scan a fresh `clip-audit` process and `--out`, in the same run. Their reports
are compared with the cost left out (the cuts this measures must not change a finding).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import random_checkpoint, scene_folder, write_result

ARCH = {
    "model_cfg": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {"size": 224, "interpolation": "bicubic", "resize_mode": "shortest"},
}
ROOT = Path(__file__).resolve().parent.parent


def scan(tree: Path, model: Path, arch: Path, data: Path, engines: Path, out: Path) -> tuple[float, dict]:
    """(wall seconds, report) of one scan, run with `tree`'s code."""
    argv = [str(model), str(data), "--arch", str(arch), "--engine-dir", str(engines), "--out", str(out)]
    code = "import sys; from auditor.cli import main; sys.argv[0] = 'clip-audit'; main()"
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", code, "-q", "scan", *argv, "--format", "json", "--inversion", "never"]
    started = time.perf_counter()
    done = subprocess.run(
        command, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"scan with {tree} failed ({done.returncode}): {done.stderr.strip()}")
    return seconds, json.loads((out / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", required=True, help="the git commit to compare with")
    parser.add_argument("--per-class", type=int, default=22)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/oracle_stage.json"))
    args = parser.parse_args()
    before = subprocess.run(
        ["git", "rev-parse", args.before], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        subprocess.run(
            ["git", "worktree", "add", "-q", "--detach", str(folder / "before"), before], cwd=ROOT, check=True
        )
        try:
            arch = folder / "tiny-vit-224.json"
            arch.write_text(json.dumps(ARCH))
            model = random_checkpoint(str(arch), folder)
            data = scene_folder(folder / "data", args.per_class, 224)
            trees = {"before": folder / "before", "after": ROOT}
            scan(ROOT, model, arch, data, folder / "engines", folder / "warm")  # builds the engines
            runs: dict[str, list[tuple[float, dict]]] = {name: [] for name in trees}
            for run in range(args.runs):
                for name, tree in trees.items():
                    runs[name].append(
                        scan(tree, model, arch, data, folder / "engines", folder / f"{name}-{run}")
                    )
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(folder / "before")], cwd=ROOT, check=False
            )
    reports = {
        name: [{k: v for k, v in r.items() if k != "cost"} for _, r in found] for name, found in runs.items()
    }
    body = {
        "before": before,
        "arch": "ViT, 2 layers, width 64, patch 32, 224 px, random init (torch.manual_seed(0))",
        "data": f"{args.per_class * 12} zoo scenes at 224 px",
        "runs": args.runs,
        "seconds": {name: [round(s, 2) for s, _ in found] for name, found in runs.items()},
        "oracle_seconds": {
            name: [r["cost"]["seconds"]["oracle"] for _, r in found] for name, found in runs.items()
        },
        "median_oracle_seconds": {
            name: round(statistics.median(r["cost"]["seconds"]["oracle"] for _, r in found), 2)
            for name, found in runs.items()
        },
        "median_seconds": {
            name: round(statistics.median(s for s, _ in found), 2) for name, found in runs.items()
        },
        "oracle_images": runs["after"][0][1]["cost"]["oracle_images"],
        "images_scored": runs["after"][0][1]["cost"]["images_scored"],
        "same_report_less_cost": all(r == reports["before"][0] for rs in reports.values() for r in rs),
    }
    medians = body["median_oracle_seconds"]
    body["oracle_speedup"] = round(medians["before"] / medians["after"], 2)  # type: ignore[index]
    write_result(args.out, "oracle_stage", body)


if __name__ == "__main__":
    main()
