"""End to end: `clip-audit scan` with its defaults (`--engine auto --precision auto`) and on ONNX
Runtime fp32, against PyTorch fp32, with the image tower's own speedup measured in the same run.

    python -m benchmarks.scan_engines [--arch ViT-B-32] [--per-class 22] [--runs 2]
                                      [--variants torch,onnx,auto]
                                      [--out benchmarks/results/scan_engines.json]

The model is a random-init checkpoint of `--arch`; the data are zoo scenes rendered at the model's
input size (12 classes x per_class images: 264 at the default). One untimed scan of the last
variant first builds the engine cache (`engine_build_seconds`); then the variants take turns,
`--runs` scans each, every scan a fresh `clip-audit` process with a fresh `--out`, timed from
start to exit. Each report is compared with PyTorch's field by field (only the per-stage seconds
left out), and by its findings: verdict, severity, target and victim labels, victim files.
Then `clip-audit bench` times the image tower (torch and onnx-int8, batch 32) in the same run,
for issue 14's two bars: PyTorch's wall time / the default's >= 0.8 x the tower's int8 speedup,
and the default's wall time <= 1.5 x images_scored / (the tower's images/s) + 10 s.

Cost: ~15 min on a CPU with AVX-512 VNNI (ViT-B-32 at ~25 images/s in PyTorch); on a 2-core
AVX2 machine where it runs at ~4.6 images/s, well over an hour: use `--per-class 6 --runs 1`
there to see the ratios first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import random_checkpoint, scene_folder, write_result

CLI = str(Path(sys.executable).with_name("clip-audit"))


# Variant -> (--engine, --precision); "auto" is what a scan does by default.
VARIANTS = {
    "torch": ("torch", "fp32"),
    "onnx": ("onnx", "fp32"),
    "onnx-int8": ("onnx", "int8"),
    "auto": ("auto", "auto"),
}


def scan_seconds(
    model: Path, data: Path, arch: str, variant: str, out: Path, engine_dir: Path, extra: Sequence[str] = ()
) -> float:
    """Seconds of one `clip-audit scan` process (`extra`: more options), from start to exit."""
    engine, precision = VARIANTS[variant]
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
        "--precision",
        precision,
        "--engine-dir",
        str(engine_dir),
        "--out",
        str(out),
        "--format",
        "json",
        *extra,
    ]
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"scan --engine {engine} failed ({done.returncode}): {done.stderr.strip()}")
    return seconds


def tower_speed(model: Path, data: Path, arch: str, engine_dir: Path) -> dict[str, dict[str, float]]:
    """`clip-audit bench` at batch 32: images/s and speedup of torch and onnx-int8, by engine."""
    command = [CLI, "-q", "bench", str(model), "--arch", arch, "--engines", "torch,onnx-int8"]
    command += ["--batch", "32", "--data", str(data), "--engine-dir", str(engine_dir), "--format", "json"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout)["throughput"]
    return {r["engine"]: {k: r[k] for k in ("images_per_second", "speedup_vs_torch")} for r in rows}


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


FINDINGS = ("verdict", "severity", "target_labels", "victim_labels")


def victims(report: dict) -> list[str]:  # type: ignore[type-arg]
    return [v["path"] for v in report["victims"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--per-class", type=int, default=22)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--variants", default="torch,onnx,auto", help=", ".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scan_engines.json"))
    args = parser.parse_args()
    variants = ["torch", *[v for v in args.variants.split(",") if v in VARIANTS and v != "torch"]]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = random_checkpoint(args.arch, folder)
        from auditor.models import resolve_arch

        size = resolve_arch(args.arch).image_size
        data = scene_folder(folder / "data", args.per_class, size)
        images = sum(1 for _ in data.rglob("*.png"))
        engines_dir = folder / "engines"
        build = scan_seconds(model, data, args.arch, variants[-1], folder / "build", engines_dir)
        print(f"first {variants[-1]} scan (builds the engines): {build:.1f}s", file=sys.stderr)
        seconds: dict[str, list[float]] = {v: [] for v in variants}
        for run in range(args.runs):
            for variant in variants:
                out = folder / f"{variant}-{run}"  # a fresh --out: no resumable-scan cache to reuse
                seconds[variant].append(scan_seconds(model, data, args.arch, variant, out, engines_dir))
                print(f"run {run} {variant}: {seconds[variant][-1]:.1f}s", file=sys.stderr)
        reports = {v: json.loads((folder / f"{v}-0" / "report.json").read_text()) for v in variants}
        tower = tower_speed(model, data, args.arch, engines_dir)
    medians = {v: statistics.median(s) for v, s in seconds.items()}
    compared = {}
    for variant in variants[1:]:
        diff = differences(reports["torch"], reports[variant])
        compared[variant] = {
            "over_torch": round(medians[variant] / medians["torch"], 3),
            "same_report": not diff,
            "same_findings": all(reports[variant][k] == reports["torch"][k] for k in FINDINGS)
            and victims(reports[variant]) == victims(reports["torch"]),
            "report_differences": diff[:20] + ([f"... {len(diff) - 20} more"] if len(diff) > 20 else []),
        }
    body = {
        "arch": args.arch,
        "weights": "random init (torch.manual_seed(0))",
        "data": f"{images} zoo scenes at {size} px",
        "runs": args.runs,
        "variants": {v: {"engine": VARIANTS[v][0], "precision": VARIANTS[v][1]} for v in variants},
        "engine_build_seconds": round(build, 1),
        "seconds": {v: [round(x, 2) for x in s] for v, s in seconds.items()},
        "median_seconds": {v: round(m, 2) for v, m in medians.items()},
        "against_torch": compared,
        "images_scored": reports["torch"]["cost"]["images_scored"],
        "stage_seconds": {v: r["cost"]["seconds"] for v, r in reports.items()},
        "oracle_scored_per_image": {
            v: round(r["cost"].get("oracle_scored", 0) / max(1, r["cost"]["oracle_images"]), 2)
            for v, r in reports.items()
        },
        "verdict": reports["torch"]["verdict"],
        "tower_batch32": tower,
    }
    if "auto" in medians:
        speedup = tower["onnx-int8"]["speedup_vs_torch"]
        scored = reports["auto"]["cost"]["images_scored"]
        body["bars"] = {
            "scan_speedup": round(medians["torch"] / medians["auto"], 2),
            "scan_speedup_bar": round(0.8 * speedup, 2),
            "auto_seconds": round(medians["auto"], 1),
            "busy_bar_seconds": round(1.5 * scored / tower["onnx-int8"]["images_per_second"] + 10, 1),
        }
    write_result(args.out, "scan_engines", body)
    print(
        json.dumps({k: body[k] for k in ("median_seconds", "against_torch")}),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
