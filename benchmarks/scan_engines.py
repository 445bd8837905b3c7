"""End to end: `clip-audit scan --engine onnx` against `--engine torch` on the same model and data.

    python -m benchmarks.scan_engines [--arch ViT-B-32] [--per-class 22] [--runs 3]
                                      [--out benchmarks/results/scan_engines.json]

The model is a random-init checkpoint of `--arch`; the data are zoo scenes rendered at the model's
input size (12 classes x per_class images: 264 at the default). One untimed `--engine onnx` scan
first builds the engine cache (its time is recorded as `engine_build_seconds`); then the engines
take turns, `--runs` scans each, every scan a fresh `clip-audit` process timed from start to exit.
The reports are compared field by field, leaving out only the per-stage seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import random_checkpoint, scene_folder, write_result

CLI = str(Path(sys.executable).with_name("clip-audit"))


def scan_seconds(model: Path, data: Path, arch: str, engine: str, out: Path, engine_dir: Path) -> float:
    command = [
        CLI,
        "-q",
        "scan",
        str(model),
        str(data),
        "--arch",
        arch,
        "--engine",
        engine,
        "--engine-dir",
        str(engine_dir),
        "--out",
        str(out),
        "--format",
        "json",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"scan --engine {engine} failed ({done.returncode}): {done.stderr.strip()}")
    return seconds


def differences(a: object, b: object, path: str = "") -> list[str]:
    """Paths where two JSON values differ (cost.seconds left out: it is the thing measured)."""
    if path == "cost.seconds":
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d
            for k in sorted(set(a) | set(b))
            for d in differences(a.get(k), b.get(k), f"{path}.{k}".strip("."))
        ]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")
        ]
    if isinstance(a, float) and isinstance(b, float):
        return [] if abs(a - b) <= 1e-6 else [path]
    return [] if a == b else [path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--per-class", type=int, default=22)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scan_engines.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = random_checkpoint(args.arch, folder)
        from auditor.models import resolve_arch

        size = resolve_arch(args.arch).image_size
        data = scene_folder(folder / "data", args.per_class, size)
        images = sum(1 for _ in data.rglob("*.png"))
        engines_dir = folder / "engines"
        build = scan_seconds(model, data, args.arch, "onnx", folder / "build", engines_dir)
        print(f"first onnx scan (builds the engines): {build:.1f}s", file=sys.stderr)
        seconds: dict[str, list[float]] = {"torch": [], "onnx": []}
        for run in range(args.runs):
            for engine in seconds:
                out = folder / f"{engine}-{run}"  # a fresh --out: no resumable-scan cache to reuse
                seconds[engine].append(scan_seconds(model, data, args.arch, engine, out, engines_dir))
                print(f"run {run} {engine}: {seconds[engine][-1]:.1f}s", file=sys.stderr)
        reports = {e: json.loads((folder / f"{e}-0" / "report.json").read_text()) for e in seconds}
    medians = {e: statistics.median(s) for e, s in seconds.items()}
    diff = differences(reports["torch"], reports["onnx"])
    body = {
        "arch": args.arch,
        "weights": "random init (torch.manual_seed(0))",
        "data": f"{images} zoo scenes at {size} px",
        "runs": args.runs,
        "engine_build_seconds": round(build, 1),
        "seconds": {e: [round(x, 2) for x in s] for e, s in seconds.items()},
        "median_seconds": {e: round(m, 2) for e, m in medians.items()},
        "onnx_over_torch": round(medians["onnx"] / medians["torch"], 3),
        "images_scored": reports["torch"]["cost"]["images_scored"],
        "stage_seconds": {e: r["cost"]["seconds"] for e, r in reports.items()},
        "same_report": not diff,
        "report_differences": diff,
        "verdict": reports["torch"]["verdict"],
    }
    write_result(args.out, "scan_engines", body)
    print(
        json.dumps({k: body[k] for k in ("median_seconds", "onnx_over_torch", "same_report")}),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
