"""Throughput of `--executor ray` with 1 and 2 actors beside a local scan, in one run (issue 15).

    python -m benchmarks.ray_scaling [--per-class 200] [--out benchmarks/results/ray_scaling.json]

Data: the patch-random zoo model's generated scan folder (12 classes, `--per-class` images
each, 64 px, its planted trigger on a share of them), so the oracle stage does the work it does
on a poisoned model. Each scan runs the CLI in its own process (`--engine torch --inversion
never`): locally, then on a local Ray cluster (`ray.init` on this machine's CPUs) with 1 and
2 actors. Recorded per scan: wall time, the report's stage seconds, stage 0 and oracle images
per second, peak RSS of the driver, and whether the report equals the local one apart from
`cost` (it must). Ray's actors start afresh for each stage (one Ray Data pipeline per stage):
that start-up is in the stage times, and it is why a small folder runs slower on Ray. The
executor's own per-stage lines separate it: seconds until each stage's first result, then the
images/s after it (`ray` in each Ray run), which is the throughput that scales with actors.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from auditor.zoo.build import checkpoint_path, write_scan_data
from benchmarks.common import write_result
from benchmarks.scale import scan_once

SETTINGS = {
    "local": [],
    "ray-1": ["--executor", "ray", "--ray-actors", "1"],
    "ray-2": ["--executor", "ray", "--ray-actors", "2"],
}


RAY_LINE = re.compile(
    r"ray: (\d+) (\w+) units on (\d+) actors, first result after ([\d.]+) s"
    r"(?:, then ([\d.]+) images/s over ([\d.]+) s)?"
)


def steady_state(lines: list[str]) -> dict[str, object]:
    """From the executor's per-stage lines: start-up seconds (until each stage's first result)
    and the images/s after it, per kind of unit, summed over the stages."""
    startup = 0.0
    images: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for line in lines:
        found = RAY_LINE.match(line)
        if not found:
            continue
        _, kind, _, first, rate, span = found.groups()
        startup += float(first)
        if rate and span:
            images[kind] = images.get(kind, 0.0) + float(rate) * float(span)
            seconds[kind] = seconds.get(kind, 0.0) + float(span)
    rates = {f"{kind}_images_per_s_after_startup": round(images[kind] / seconds[kind], 2) for kind in images}
    return {"stages": len(lines), "startup_seconds": round(startup, 1), **rates}


def _without_cost(out: Path) -> dict[str, object]:
    report = json.loads((out / "report.json").read_text())
    return {k: v for k, v in report.items() if k != "cost"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ray_scaling.json"))
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_scan_data("patch-random", data, per_class=args.per_class)
        images = sum(1 for p in data.rglob("*.png"))
        reports = {}
        for name, extra in SETTINGS.items():
            out = Path(tmp) / name
            run = scan_once(checkpoint_path("patch-random"), data, out, extra)
            seconds = run["stage_seconds"] or {}
            assert isinstance(seconds, dict)
            run["stage0_images_per_s"] = round(images / seconds["scoring"], 1) if seconds else None
            run["oracle_images_per_s"] = (
                round(float(run["oracle_images"]) / seconds["oracle"], 2) if seconds else None  # type: ignore[arg-type]
            )
            if name != "local":
                run["ray"] = steady_state(run.pop("ray_lines"))  # type: ignore[arg-type]
            else:
                run.pop("ray_lines")
            reports[name] = _without_cost(out)
            run["same_report_as_local"] = reports[name] == reports["local"]
            print(name, json.dumps(run), file=sys.stderr)
            runs[name] = run
    body: dict[str, object] = {"images": images, "engine": "torch", "runs": runs}
    steady = {name: runs[name]["ray"] for name in ("ray-1", "ray-2")}
    body["ratios"] = {
        "ray2_over_ray1_checks_after_startup": _ratio(steady, "checks_images_per_s_after_startup"),
        "ray2_over_ray1_scores_after_startup": _ratio(steady, "scores_images_per_s_after_startup"),
        "ray2_over_ray1_oracle_throughput": round(
            float(runs["ray-2"]["oracle_images_per_s"]) / float(runs["ray-1"]["oracle_images_per_s"]),
            2,  # type: ignore[arg-type]
        ),
        "ray2_over_ray1_stage0_throughput": round(
            float(runs["ray-2"]["stage0_images_per_s"]) / float(runs["ray-1"]["stage0_images_per_s"]),
            2,  # type: ignore[arg-type]
        ),
        "ray2_over_local_wall": round(
            float(runs["ray-2"]["wall_seconds"]) / float(runs["local"]["wall_seconds"]), 2
        ),  # type: ignore[arg-type]
    }
    write_result(args.out, "ray_scaling", body)


def _ratio(steady: dict[str, object], key: str) -> float | None:
    one, two = steady["ray-1"], steady["ray-2"]
    assert isinstance(one, dict) and isinstance(two, dict)
    return round(two[key] / one[key], 2) if key in one and key in two else None


if __name__ == "__main__":
    main()
