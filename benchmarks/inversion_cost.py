"""What the model-level search costs per step, and what the default search would cost in full.

`python -m benchmarks.inversion_cost [--steps 3] [--out benchmarks/results/inversion_cost.json]`

Times a few steps of `auditor.inversion.search.search_triggers` (12 classes, the default batch)
on matrix-sized tiny ViT and ModifiedResNet towers and on a random-weight ViT-B-32 at 224 px,
and projects the full default search (`InversionConfig.rounds` rounds of `SearchConfig.steps`
steps, on the audited model and once more with a reference) from the median step. The passes
are counted, so the figure can be projected to another machine from its own forward + backward
throughput.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLASSES = 12


def time_steps(arch_name: str, steps: int) -> dict[str, object]:
    import numpy as np
    import torch

    from auditor.inversion.audit import InversionConfig
    from auditor.inversion.search import DifferentiableModel, PassCounter, SearchConfig, search_triggers
    from auditor.models import LoadedModel, build_model, make_preprocess, make_tokenizer, resolve_arch

    arch = resolve_arch(arch_name)
    torch.manual_seed(0)
    model = build_model(arch)
    loaded = LoadedModel(model, make_preprocess(arch), make_tokenizer(arch), arch)
    dim = int(model.text_projection.shape[1])  # type: ignore[union-attr]
    weights = np.random.default_rng(0).standard_normal((CLASSES, dim)).astype(np.float32)
    weights /= np.linalg.norm(weights, axis=1, keepdims=True)
    differentiable = DifferentiableModel(loaded, weights)
    size = arch.image_size
    pixels = torch.rand(64, 3, size, size)
    predicted = differentiable.predict(pixels)
    config, rounds = SearchConfig(), InversionConfig().rounds
    times: list[float] = []
    counter = PassCounter()
    last = time.perf_counter()

    def on_step() -> None:
        nonlocal last
        now = time.perf_counter()
        times.append(now - last)
        last = now

    search_triggers(
        differentiable,
        pixels,
        predicted,
        list(range(CLASSES)),
        SearchConfig(steps=steps),
        None,
        counter,
        on_step,
    )
    step = statistics.median(times)
    return {
        "arch": arch_name,
        "image_size": size,
        "classes": CLASSES,
        "batch_per_class": config.batch,
        "steps_timed": steps,
        "median_step_seconds": round(step, 3),
        "passes_per_step": counter.backward // steps,
        "default_steps": config.steps,
        "default_rounds": rounds,
        "projected_search_seconds": round(step * config.steps * rounds, 1),
        "projected_with_reference_seconds": round(2 * step * config.steps * rounds, 1),
    }


def main() -> None:
    from benchmarks.common import write_result

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/inversion_cost.json"))
    args = parser.parse_args()
    from benchmarks import matrix

    folder = matrix.cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tiny = [str(matrix.arch_path(row, folder)) for row in matrix.ROWS[:3:2]]  # a 64-px ViT and ResNet
    runs = [time_steps(arch, max(args.steps, 5)) for arch in tiny] + [time_steps("ViT-B-32", args.steps)]
    for run in runs:
        print(run, flush=True)
    write_result(args.out, "inversion_cost", {"runs": runs})


if __name__ == "__main__":
    main()
