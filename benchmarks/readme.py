"""The README's speed tables, written from the committed benchmark results (never by hand).

    python -m benchmarks.readme           # rewrite the block between the README's markers
    python -m benchmarks.readme --check   # exit 1 if the README differs from the results

Sources: `benchmarks/results/scan_engines.json` (whole scans, classic oracle),
`scan_sam.json` (whole scans, `--oracle sam`) and `engines.json` (the image tower, and the
per-image work one image at a time). Each table names its file, machine and date.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path("benchmarks/results")
README = Path("README.md")
START, END = "<!-- speed tables: python -m benchmarks.readme -->", "<!-- end of speed tables -->"


def _load(name: str) -> dict:  # type: ignore[type-arg]
    return json.loads((RESULTS / name).read_text())


def _source(name: str, result: dict) -> str:  # type: ignore[type-arg]
    cpu = result["machine"]
    flags = ", ".join(cpu["cpu_flags"]) or "no AVX flags read"
    return (
        f"[`{RESULTS / name}`]({RESULTS / name}), {result['date'][:10]}, "
        f"{cpu['cpu_model']} ({cpu['cpus']} CPUs; {flags})"
    )


def scan_table() -> list[str]:
    result = _load("scan_engines.json")
    names = {
        "torch": "`--engine torch --precision fp32`",
        "onnx": "`--engine onnx --precision fp32`",
        "auto": "default: int8 bulk, fp32 evidence",
    }
    lines = [
        f"Whole scans, classic oracle: {result['arch']}, {result['weights']}, {result['data']}, "
        f"medians of {result['runs']} runs; {_source('scan_engines.json', result)}.",
        "",
        "| scan | wall time | vs PyTorch | findings |",
        "| --- | --- | --- | --- |",
    ]
    for variant, seconds in result["median_seconds"].items():
        compared = result["against_torch"].get(variant)
        same = "—" if compared is None else ("same" if compared["same_findings"] else "**differ**")
        ratio = seconds / result["median_seconds"]["torch"]
        lines.append(f"| {names.get(variant, variant)} | {seconds:.1f} s | {ratio:.2f}× | {same} |")
    bars = result.get("bars")
    if bars:
        tower = result["tower_batch32"]["onnx-int8"]
        lines += [
            "",
            f"The int8 image tower ran {tower['speedup_vs_torch']:.2f}× PyTorch at batch 32 in the same run "
            f"({tower['images_per_second']:.0f} img/s). Issue 14's bars: PyTorch ÷ default "
            f"{bars['scan_speedup']:.2f}× (bar {bars['scan_speedup_bar']:.2f}×, "
            f"{'met' if bars['scan_speedup'] >= bars['scan_speedup_bar'] else 'not met'}); default "
            f"{bars['auto_seconds']:.1f} s against a busy-engine bound of {bars['busy_bar_seconds']:.1f} s "
            f"({'met' if bars['auto_seconds'] <= bars['busy_bar_seconds'] else 'not met'}).",
        ]
    return lines


def sam_table() -> list[str]:
    result = _load("scan_sam.json")
    parity = result["mask_parity"]
    seconds = result["seconds"]
    oracle = result["oracle_median_seconds"]
    return [
        f"Whole scans, `--oracle sam`: SAM {result['sam']}, CLIP {result['clip']}, {result['data']}, "
        f"oracle on {result['oracle_images']} images; {_source('scan_sam.json', result)}.",
        "",
        "| scan | wall time | vs PyTorch oracle | SAM per image (median) | findings |",
        "| --- | --- | --- | --- | --- |",
        f"| `--engine torch` (PyTorch SAM) | {seconds['torch']:.1f} s | 1.00× | "
        f"{oracle['torch']:.1f} s | — |",
        f"| default (SAM on ONNX Runtime) | {seconds['onnx']:.1f} s | "
        f"{seconds['torch'] / seconds['onnx']:.2f}× faster | {oracle['onnx']:.1f} s | "
        f"{'same' if result['same_findings'] else '**differ**'} |",
        "",
        f"Masks against PyTorch SAM on {parity['images']} images, {parity['prompts']} prompts: mean mask IoU "
        f"{parity['mean_mask_iou']:.4f}, {parity['engine_segments']} segments after tidying against "
        f"{parity['torch_segments']}.",
    ]


def tower_table() -> list[str]:
    result = _load("engines.json")
    lines = [
        f"The image tower alone ({result['arch']}, {result['image_size']} px, medians of {result['repeats']} "
        f"calls, all engines in one run); {_source('engines.json', result)}.",
        "",
        "| engine | batch | images/s | vs PyTorch | p50 ms | p95 ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["throughput"]:
        lines.append(
            f"| {row['engine']} | {row['batch']} | {row['images_per_second']:.1f} | "
            f"{row['speedup_vs_torch']:.2f}× | {row.get('p50_ms', float('nan')):.1f} | "
            f"{row.get('p95_ms', float('nan')):.1f} |"
        )
    if result.get("per_image"):
        lines += [
            "",
            "One image at a time (the scan's per-image work): the oracle, and Algorithm 1 whole.",
            "",
            "| engine | oracle | oracle p50 / p95 ms | Algorithm 1 p50 / p95 ms | scorings per image |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in result["per_image"]:
            lines.append(
                f"| {row['engine']} | {row['oracle']} | "
                f"{row['oracle_p50_ms']:.0f} / {row['oracle_p95_ms']:.0f} | "
                f"{row['check_p50_ms']:.0f} / {row['check_p95_ms']:.0f} | {row['scorings']} |"
            )
    return lines


def speed_block() -> str:
    parts = [scan_table(), sam_table(), tower_table()]
    return "\n".join([START, *[line for part in parts for line in [*part, ""]], END])


def rewritten(readme: str) -> str:
    """`readme` with the block between the markers replaced by `speed_block()`."""
    if START not in readme or END not in readme:
        raise SystemExit(f"{README} has no speed-table markers ({START} ... {END})")
    before, rest = readme.split(START, 1)
    return before + speed_block() + rest.split(END, 1)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    current = README.read_text()
    wanted = rewritten(current)
    if args.check:
        if wanted != current:
            raise SystemExit(
                "README's speed tables differ from benchmarks/results: run python -m benchmarks.readme"
            )
        return
    README.write_text(wanted)
    print(f"rewrote the speed tables in {README}", file=sys.stderr)


if __name__ == "__main__":
    main()
