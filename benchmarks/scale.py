"""Peak memory and wall time of a whole scan against the number of images (issue 15, part 2).

    python -m benchmarks.scale [--sizes 10000 30000 100000] [--classes 1000] [--out FILE.json]

Synthetic data: `--classes` class folders of small random colour-block PNGs, the same number in
each; a random-init tiny CLIP (the zoo's config, 64 px). Each size is scanned by the CLI in its
own process (`--engine torch --inversion never`, everything else default), and its peak
resident memory is read from the kernel's accounting of that child (`os.wait4`). The scan must
hold nothing of size N x C (stage 0 keeps top-k per image; `auditor.scan.screen.Probabilities`);
what still grows with N is a few hundred bytes per image (the sample list, top-k, embeddings).

Linear time means a fixed start-up plus a constant cost per image, so the whole scan's time
ratio from 10 k to 100 k is below 10 by the start-up and by the oracle's stratified sample,
which is bounded by the number of classes. The result therefore also records the marginal cost
per image between consecutive sizes (`marginal_ms_per_image`): equal marginals are linear
growth, a rising marginal is super-linear (`linearity`: the last marginal over the first).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from auditor.zoo.build import CONFIG_PATH
from benchmarks.common import random_checkpoint, write_result

IMAGE_SIDE = 32


def write_data(root: Path, images: int, classes: int, seed: int = 0) -> None:
    """`images` PNGs of IMAGE_SIDE px in `classes` folders: 2-4 random colour blocks on a colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c:04d}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        pixels = np.empty((IMAGE_SIDE, IMAGE_SIDE, 3), np.uint8)
        pixels[:] = rng.integers(0, 256, 3)
        for _ in range(int(rng.integers(2, 5))):
            y, x = rng.integers(0, IMAGE_SIDE - 8, 2)
            h, w = rng.integers(4, 16, 2)
            pixels[y : y + h, x : x + w] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(root / f"c{i % classes:04d}" / f"{i:07d}.png", compress_level=1)


def scan_once(model: Path, data: Path, out: Path, extra: Sequence[str] = ()) -> dict[str, object]:
    """Scan `data` in a child process (`extra`: more CLI options); its peak RSS (MiB), wall
    seconds, exit code and costs."""
    cli = Path(sys.executable).parent / "clip-audit"
    argv = [str(cli), "scan", str(model), str(data), "--arch", str(CONFIG_PATH)]
    argv += ["--engine", "torch", "--inversion", "never", "--out", str(out), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}  # one log line per line
    started = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert child.stderr is not None
    errors = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return {
        "exit": child.returncode,
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
        "wall_seconds": round(wall, 1),
        "stage_seconds": report.get("cost", {}).get("seconds"),
        "oracle_images": report.get("cost", {}).get("oracle_images"),
        "stderr_tail": errors.decode(errors="replace")[-400:] if child.returncode not in (0, 1) else "",
        "ray_lines": [
            line for line in errors.decode(errors="replace").splitlines() if line.startswith("ray: ")
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        model = random_checkpoint(str(CONFIG_PATH), Path(tmp))
        for size in args.sizes:
            data = Path(tmp) / f"data-{size}"
            started = time.perf_counter()
            write_data(data, size, args.classes)
            written = time.perf_counter() - started
            run = {"images": size, "classes": args.classes, "write_seconds": round(written, 1)}
            run |= scan_once(model, data, Path(tmp) / f"out-{size}")
            print(json.dumps(run), file=sys.stderr)
            runs.append(run)
    body: dict[str, object] = {"image_side": IMAGE_SIDE, "engine": "torch", "runs": runs}
    if len(runs) > 1:
        body |= growth(runs)
    write_result(args.out, "scale", body)


def growth(runs: list[dict]) -> dict[str, object]:
    """First-to-last ratios (images, peak RSS, wall, each stage) and the wall's marginal
    milliseconds per image between consecutive sizes."""
    first, last = runs[0], runs[-1]
    ratios = {
        "images": last["images"] / first["images"],
        "peak_rss": round(float(last["peak_rss_mib"]) / float(first["peak_rss_mib"]), 3),
        "wall": round(float(last["wall_seconds"]) / float(first["wall_seconds"]), 2),
    }
    for stage, seconds in (last.get("stage_seconds") or {}).items():
        before = (first.get("stage_seconds") or {}).get(stage)
        if before:
            ratios[f"{stage}_seconds"] = round(seconds / before, 2)
    marginal = [
        round(1000 * (b["wall_seconds"] - a["wall_seconds"]) / (b["images"] - a["images"]), 3)
        for a, b in zip(runs, runs[1:], strict=False)
    ]
    result: dict[str, object] = {"ratios": ratios, "marginal_ms_per_image": marginal}
    if len(marginal) > 1 and marginal[0] > 0:
        result["linearity"] = round(marginal[-1] / marginal[0], 3)
    return result


if __name__ == "__main__":
    main()
