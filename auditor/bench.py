"""Image-tower throughput of one checkpoint on several engines, measured side by side in one run.

Each engine gets the same seeded float32 pixels; for every batch size the engines take turns, and
a measurement is the median wall time of `repeats` calls after one warm-up. PyTorch eager is
always measured: speedups are against it, in the same run. Every engine is also checked against
PyTorch (`auditor.runtime.check_engines`, reported, not enforced: a benchmark shows the numbers).
Each row also carries p50 / p95 per call (at batch 1: the latency a pipeline sees). With an oracle,
`per_image_latency` times the scan's per-image work one image at a time on each engine: the
segmentation alone, and Algorithm 1 whole (`auditor.scan.check.check_images`).
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
from auditor.oracle import Oracle
from auditor.runtime import Checks, Probe, build_engines, check_engines
from auditor.scoring import ZeroShotScorer, torch_runners
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
    p50_ms: float  # per call of `batch` images (at batch 1: the latency a pipeline sees)
    p95_ms: float


@dataclass(frozen=True)
class ImageLatency:
    """One image at a time through the scan's per-image work, on one engine.

    `oracle`: the segmentation alone; `check`: Algorithm 1 whole (the oracle, then the crops and
    ablations scored on `engine`, `scorings` of them per image on average).
    """

    engine: str
    oracle: str
    images: int
    oracle_p50_ms: float
    oracle_p95_ms: float
    check_p50_ms: float
    check_p95_ms: float
    scorings: float


@dataclass(frozen=True)
class BenchResult:
    arch: str
    image_size: int
    repeats: int
    throughput: tuple[Throughput, ...]
    checks: dict[str, Checks]
    per_image: tuple[ImageLatency, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "arch": self.arch,
            "image_size": self.image_size,
            "repeats": self.repeats,
            "throughput": [asdict(t) for t in self.throughput],
            "per_image": [asdict(t) for t in self.per_image],
            "checks": {name: c.to_dict() for name, c in self.checks.items()},
        }


def parse_engines(names: str) -> list[str]:
    """'torch,onnx,onnx-int8' -> names, torch first (the baseline is always measured)."""
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in BENCH_ENGINES]
    if unknown:
        raise InputError(f"unknown engine(s) {unknown}", hint="choose from " + ", ".join(BENCH_ENGINES))
    return ["torch", *[n for n in dict.fromkeys(chosen) if n != "torch"]]


def call_seconds(run: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `run`, after one untimed warm-up call."""
    run()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    return statistics.median(call_seconds(run, repeats))


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    return round(float(np.percentile(seconds, q)) * 1000, 2)


def bench(
    loaded: LoadedModel,
    engines: Sequence[str],
    batches: Sequence[int],
    probe: Probe,
    repeats: int = 7,
    engine_dir: Path | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
    images: Sequence[np.ndarray] = (),
    oracle_for: Callable[[str], Oracle] | None = None,
) -> BenchResult:
    """Measure `engines` (names from BENCH_ENGINES) at each batch size; see the module docstring.

    With `oracle_for` (runtime "torch" / "onnx" / "tensorrt" -> the oracle that runs there),
    also time the per-image work on `images` (uint8 RGB) on each engine (`per_image_latency`).
    """
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
        per_image = (
            per_image_latency(loaded, pairs, oracle_for, images, probe.classes, tick) if oracle_for else []
        )
    finally:
        for image, text in pairs.values():
            image.deactivate()
            text.deactivate()
    return BenchResult(
        loaded.arch.name, loaded.arch.image_size, repeats, tuple(rows), checks, tuple(per_image)
    )


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
        calls = {
            name: call_seconds(partial(image.infer, feeds), repeats) for name, (image, _) in pairs.items()
        }
        seconds = {name: statistics.median(times) for name, times in calls.items()}
        for name, (image, _text) in pairs.items():
            rows.append(
                Throughput(
                    engine=name,
                    provider=image.provider,
                    batch=batch,
                    median_seconds=round(seconds[name], 5),
                    images_per_second=round(batch / seconds[name], 2),
                    speedup_vs_torch=round(seconds["torch"] / seconds[name], 3),
                    p50_ms=percentile_ms(calls[name], 50),
                    p95_ms=percentile_ms(calls[name], 95),
                )
            )
        tick("measuring", 1, len(batches))
    return rows


def per_image_latency(
    loaded: LoadedModel,
    pairs: dict[str, tuple[Runner, Runner]],
    oracle_for: Callable[[str], Oracle],
    images: Sequence[np.ndarray],
    classes: Sequence[str],
    tick: Callable[[str, int, int | None], None],
) -> list[ImageLatency]:
    """Each engine (active runners) in turn: every image's segmentation, then Algorithm 1 on it.

    The oracle runs where the engine's runtime says (SAM on ONNX Runtime beside an ONNX tower,
    on PyTorch beside PyTorch's); the classic oracle is the same code on every engine.
    """
    from auditor.scoring import make_scorer

    rows = []
    for name, (image_runner, text_runner) in pairs.items():
        scorer = make_scorer(loaded, classes, image_runner, text_runner)
        rows.append(_image_latency(name, loaded, scorer, oracle_for(BENCH_ENGINES[name][0]), images))
        tick("timing the per-image check", 1, len(pairs))
    return rows


def _image_latency(
    engine: str, loaded: LoadedModel, scorer: ZeroShotScorer, oracle: Oracle, images: Sequence[np.ndarray]
) -> ImageLatency:
    from auditor.scan.check import check_images

    scorings: list[int] = []

    def score(batch: list[np.ndarray]) -> np.ndarray:
        scorings.append(len(batch))
        return scorer.probabilities(batch, loaded.preprocess, 64)

    oracle.segments(images[0])  # warm-up, as for the tower
    segmenting, checking, per_check = [], [], []
    for image in images:
        probs = score([image])[0]
        started = time.perf_counter()
        oracle.segments(image)
        segmenting.append(time.perf_counter() - started)
        scorings.clear()
        started = time.perf_counter()
        check_images([(0, image, probs)], oracle, score)
        checking.append(time.perf_counter() - started)
        per_check.append(sum(scorings))
    return ImageLatency(
        engine=engine,
        oracle=f"{oracle.name} on {oracle.runtime}",
        images=len(images),
        oracle_p50_ms=percentile_ms(segmenting, 50),
        oracle_p95_ms=percentile_ms(segmenting, 95),
        check_p50_ms=percentile_ms(checking, 50),
        check_p95_ms=percentile_ms(checking, 95),
        scorings=round(statistics.mean(per_check), 1),
    )
