"""Image-tower throughput of ViT-B-32 (random weights) on PyTorch eager, ONNX Runtime fp32 and
ONNX Runtime int8, measured side by side in one run by `clip-audit bench`'s library call, with
p50 / p95 latency per call, and the per-image work one image at a time on each engine: the
classic oracle and Algorithm 1 whole, on `--oracle-images` zoo scenes at the model's size.

    python -m benchmarks.engines [--arch ViT-B-32] [--batches 1,32] [--repeats 7] [--oracle-images 8]
                                 [--engines torch,onnx,onnx-int8] [--out benchmarks/results/engines.json]

Engines are checked on zoo scenes rendered at the model's input size: fp32 by max abs diff and
cosine against PyTorch, int8 by top-1 zero-shot agreement with PyTorch fp32 over the zoo's class
prompts (random weights have no classes of their own, so this measures how often int8 flips the
argmax). The result also records the machine's fp32 matmul rate, the ceiling for every engine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from auditor.bench import bench, parse_engines
from auditor.data import load_image, open_dataset, pil_to_array
from auditor.models import load_model
from auditor.oracle.classic import ClassicOracle
from auditor.runtime import AGREEMENT_IMAGES, make_probe
from benchmarks.common import fp32_peak_gflops, random_checkpoint, scene_folder, write_result

# ViT-B-32 image tower at 224 px (DESIGN §6).
GFLOP_PER_IMAGE = {"ViT-B-32": 8.73}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--engines", default="torch,onnx,onnx-int8")
    parser.add_argument("--oracle-images", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engines.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        loaded = load_model(random_checkpoint(args.arch, folder), args.arch)
        size = loaded.arch.image_size
        data = scene_folder(folder / "scenes", per_class=17, size=size)
        probe = make_probe(loaded, open_dataset(data), AGREEMENT_IMAGES)
        result = bench(
            loaded,
            parse_engines(args.engines),
            [int(b) for b in args.batches.split(",")],
            probe,
            args.repeats,
            engine_dir=folder / "engines",
            progress=lambda stage, _n, _t: print(stage, file=sys.stderr),
            images=[pil_to_array(load_image(p)) for p in sorted(data.rglob("*.png"))[: args.oracle_images]],
            oracle_for=lambda _runtime: ClassicOracle(),
        )
    peak = fp32_peak_gflops()
    body: dict[str, object] = {
        "weights": "random init (torch.manual_seed(0))",
        "probe": f"{len(probe.pixels)} zoo scenes rendered at {size} px, {len(probe.classes)} classes",
        **result.to_dict(),
        "machine_fp32_matmul_gflops": round(peak, 1),
    }
    if args.arch in GFLOP_PER_IMAGE:
        body["fp32_ceiling_images_per_second"] = round(peak / GFLOP_PER_IMAGE[args.arch], 1)
    write_result(args.out, "engines", body)
    for row in result.throughput:
        print(
            f"{row.engine:10s} batch {row.batch:3d} {row.images_per_second:7.1f} img/s "
            f"{row.speedup_vs_torch:.2f}x",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
