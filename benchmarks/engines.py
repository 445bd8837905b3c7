"""Image-tower throughput of ViT-B-32 (random weights) on PyTorch eager, ONNX Runtime fp32 and
ONNX Runtime int8, measured side by side in one run, with parity numbers.

    python -m benchmarks.engines [--batches 1,32] [--repeats 7] [--out benchmarks/results/engines.json]

Each engine runs the same float32 inputs (random pixels, seeded); a measurement is the median
wall time of `repeats` runs after one warm-up. Parity: fp32 max abs diff and min cosine against
PyTorch; int8 cosine against fp32 and top-1 agreement of zero-shot logits over 100 random
"class" directions (random weights have no classes of their own).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from auditor.models import build_model, resolve_arch
from benchmarks.common import write_result
from engines import OnnxRuntimeRunner, TorchRunner
from engines.export import export_onnx, quantize_int8, tower
from engines.validate import parity, top1_agreement


def median_seconds(run, repeats: int) -> float:  # type: ignore[no-untyped-def]
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engines.json"))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    arch = resolve_arch(args.arch)
    model = build_model(arch)
    size = arch.image_size
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(
            tower(model, "image"), torch.zeros(2, 3, size, size), Path(tmp) / "image.onnx", "pixels"
        )
        int8 = quantize_int8(fp32, Path(tmp) / "image-int8.onnx")
        engines = {
            "torch": TorchRunner(model.encode_image, input_name="pixels"),
            "onnx": OnnxRuntimeRunner(str(fp32), ("CPUExecutionProvider",)),
            "onnx-int8": OnnxRuntimeRunner(str(int8), ("CPUExecutionProvider",)),
        }
        results: dict[str, dict[str, object]] = {name: {} for name in engines}
        outputs: dict[str, np.ndarray] = {}
        for name, runner in engines.items():
            runner.activate()
            results[name]["provider"] = runner.provider
        for batch in batches:
            pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
            for name, runner in engines.items():
                seconds = median_seconds(lambda r=runner, p=pixels: r.infer({"pixels": p}), args.repeats)
                results[name][f"batch_{batch}"] = {
                    "median_seconds": round(seconds, 4),
                    "images_per_second": round(batch / seconds, 2),
                }
                print(name, batch, f"{batch / seconds:.1f} img/s", file=sys.stderr)
        check = rng.standard_normal((64, 3, size, size)).astype(np.float32)
        for name, runner in engines.items():
            outputs[name] = runner.infer({"pixels": check})["embeddings"]
            runner.deactivate()
    for batch in batches:
        base = results["torch"][f"batch_{batch}"]["images_per_second"]  # type: ignore[index]
        for name in engines:
            entry = results[name][f"batch_{batch}"]
            entry["speedup_vs_torch"] = round(entry["images_per_second"] / base, 2)  # type: ignore[index,operator]
    directions = rng.standard_normal((100, outputs["torch"].shape[1])).astype(np.float32)
    fp32_parity = parity(outputs["torch"], outputs["onnx"])
    int8_parity = parity(outputs["onnx"], outputs["onnx-int8"])
    body = {
        "arch": args.arch,
        "weights": "random init (torch.manual_seed(0))",
        "image_size": size,
        "repeats": args.repeats,
        "engines": results,
        "parity": {
            "onnx_fp32_vs_torch": {
                "max_abs_diff": fp32_parity.max_abs_diff,
                "min_cosine": fp32_parity.min_cosine,
            },
            "onnx_int8_vs_fp32": {
                "max_abs_diff": int8_parity.max_abs_diff,
                "min_cosine": int8_parity.min_cosine,
                "top1_agreement_100_random_classes": top1_agreement(
                    outputs["onnx"] @ directions.T, outputs["onnx-int8"] @ directions.T
                ),
            },
        },
    }
    write_result(args.out, "engines", body)


if __name__ == "__main__":
    main()
