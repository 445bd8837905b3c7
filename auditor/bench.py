"""Image-tower throughput of one checkpoint on several engines, measured side by side in one run.

Each engine gets the same seeded float32 pixels; for every batch size the engines take turns, and
a measurement is the median wall time of `repeats` calls after one warm-up. PyTorch eager is
always measured: speedups are against it, in the same run. Every engine is also checked against
PyTorch (`auditor.runtime.check_engines`, reported, not enforced: a benchmark shows the numbers).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from auditor.errors import InputError
from auditor.models import LoadedModel
from auditor.runtime import Checks, Probe, build_engines, check_engines
from auditor.scoring import torch_runners
from engines.runners import Runner

# Engine name -> (runtime, precision); "torch" is PyTorch eager.
BENCH_ENGINES: dict[str, tuple[str, str]] = {
    "torch": ("torch", "fp32"),
    "onnx": ("onnx", "fp32"),
    "onnx-int8": ("onnx", "int8"),
    "onnx-fp16": ("onnx", "fp16"),
    "tensorrt": ("tensorrt", "fp32"),
    "tensorrt-fp16": ("tensorrt", "fp16"),
}


@dataclass(frozen=True)
class Throughput:
    engine: str
    provider: str
    batch: int
    median_seconds: float
    images_per_second: float
    speedup_vs_torch: float


@dataclass(frozen=True)
class BenchResult:
    arch: str
    image_size: int
    repeats: int
    throughput: tuple[Throughput, ...]
    checks: dict[str, Checks]

    def to_dict(self) -> dict[str, object]:
        return {
            "arch": self.arch,
            "image_size": self.image_size,
            "repeats": self.repeats,
            "throughput": [asdict(t) for t in self.throughput],
            "checks": {name: c.to_dict() for name, c in self.checks.items()},
        }


def parse_engines(names: str) -> list[str]:
    """'torch,onnx,onnx-int8' -> names, torch first (the baseline is always measured)."""
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in BENCH_ENGINES]
    if unknown:
        raise InputError(f"unknown engine(s) {unknown}", hint="choose from " + ", ".join(BENCH_ENGINES))
    return ["torch", *[n for n in dict.fromkeys(chosen) if n != "torch"]]


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench(
    loaded: LoadedModel,
    engines: Sequence[str],
    batches: Sequence[int],
    probe: Probe,
    repeats: int = 7,
    engine_dir: Path | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> BenchResult:
    """Measure `engines` (names from BENCH_ENGINES) at each batch size; see the module docstring."""
    tick = progress or (lambda _stage, _n, _total: None)
    pairs: dict[str, tuple[Runner, Runner]] = {}
    checks: dict[str, Checks] = {}
    for name in engines:
        runtime, precision = BENCH_ENGINES[name]
        if runtime == "torch":
            pairs[name] = torch_runners(loaded)
        else:
            pairs[name] = build_engines(loaded, runtime, precision, engine_dir).runners()
        tick("building engines", 1, len(engines))
    try:
        for image, text in pairs.values():
            image.activate()
            text.activate()
        for name, pair in pairs.items():
            if name != "torch":
                checks[name] = check_engines(loaded, pair, BENCH_ENGINES[name][1], probe, enforce=False)
        rows = _measure(loaded, pairs, batches, repeats, tick)
    finally:
        for image, text in pairs.values():
            image.deactivate()
            text.deactivate()
    return BenchResult(loaded.arch.name, loaded.arch.image_size, repeats, tuple(rows), checks)


def _measure(
    loaded: LoadedModel,
    pairs: dict[str, tuple[Runner, Runner]],
    batches: Sequence[int],
    repeats: int,
    tick: Callable[[str, int, int | None], None],
) -> list[Throughput]:
    size = loaded.arch.image_size
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        feeds = {"pixels": rng.standard_normal((batch, 3, size, size)).astype(np.float32)}
        seconds = {
            name: median_seconds(partial(image.infer, feeds), repeats) for name, (image, _) in pairs.items()
        }
        for name, (image, _text) in pairs.items():
            rows.append(
                Throughput(
                    engine=name,
                    provider=image.provider,
                    batch=batch,
                    median_seconds=round(seconds[name], 5),
                    images_per_second=round(batch / seconds[name], 2),
                    speedup_vs_torch=round(seconds["torch"] / seconds[name], 3),
                )
            )
        tick("measuring", 1, len(batches))
    return rows
