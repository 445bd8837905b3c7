"""End to end: `clip-audit scan --oracle sam` with SAM on ONNX Runtime against the PyTorch oracle.

    python -m benchmarks.scan_sam [--classes dog,banana,car] [--per-class 2] [--parity-images 2]
                                  [--out benchmarks/results/scan_sam.json]

SAM is a random-init ViT-B (torch.manual_seed(0), saved as safetensors: no weights are
downloaded); the audited CLIP is the zoo's clean model, so that SAM is nearly all of the time.
The data are zoo scenes at 224 px. One untimed engine scan first builds SAM's graphs into a fresh
engine cache (`engine_build_seconds`: export, and the mask check against PyTorch SAM); then one
`--engine onnx` and one `--engine torch` scan are timed, each a fresh process with a fresh
`--out`, and their reports compared field by field (per-stage seconds left out).

Parity on masks, the numbers the scan's own check uses (`auditor.oracle.sam_engine.mask_parity`,
the generator's filters off so that every prompt's three masks are compared, at the scan's prompt
grid) is measured on `--parity-images` of the scenes, with the oracle's per-image latency on each
side: random weights give few masks that pass SAM's own quality filters, so the scans' segments
alone would compare next to nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import scene_folder, write_result
from benchmarks.scan_engines import FINDINGS, differences, scan_seconds, victims

POINTS_PER_SIDE = 16  # the scan's default --oracle-points


def random_sam(folder: Path) -> Path:
    import torch
    from safetensors.torch import save_file
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    path = folder / "sam_vit_b-random-seed0.safetensors"
    state = sam_model_registry["vit_b"](checkpoint=None).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def oracle_side_by_side(checkpoint: Path, images: list, engine_dir: Path) -> dict[str, object]:  # type: ignore[type-arg]
    """Mask parity at the scan's prompt grid, and seconds per image of each oracle."""
    from auditor.oracle.sam import SamOracle
    from auditor.oracle.sam_engine import mask_parity

    engine, torch_oracle = (SamOracle(checkpoint, POINTS_PER_SIDE, r, engine_dir) for r in ("onnx", "torch"))
    seconds: dict[str, list[float]] = {"onnx": [], "torch": []}
    for image in images:
        for name, oracle in (("onnx", engine), ("torch", torch_oracle)):
            started = time.perf_counter()
            oracle.segments(image)
            seconds[name].append(time.perf_counter() - started)
    predictor = engine.generator.predictor
    parity = mask_parity(predictor.model, predictor.encoder, predictor.decoder, images, POINTS_PER_SIDE)
    return {
        "mask_parity": parity.__dict__ | {"passes": parity.passes()},
        "oracle_seconds_per_image": {k: [round(x, 2) for x in v] for k, v in seconds.items()},
        "oracle_median_seconds": {k: round(statistics.median(v), 2) for k, v in seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--classes", default="dog,banana,car")
    parser.add_argument("--per-class", type=int, default=2)
    parser.add_argument("--parity-images", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scan_sam.json"))
    args = parser.parse_args()
    from auditor.zoo.build import CONFIG_PATH, checkpoint_path

    model, arch = checkpoint_path("clean"), str(CONFIG_PATH)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sam = random_sam(folder)
        data = scene_folder(folder / "data", args.per_class, 224, classes=args.classes.split(","))
        engine_dir = folder / "engines"
        oracle = ["--oracle", "sam", "--oracle-checkpoint", str(sam), "--per-class", str(args.per_class)]
        build = scan_seconds(model, data, arch, "onnx", folder / "build", engine_dir, oracle)
        print(f"first engine scan (builds SAM's graphs): {build:.1f}s", file=sys.stderr)
        seconds = {}
        for variant in ("onnx", "torch"):
            seconds[variant] = scan_seconds(model, data, arch, variant, folder / variant, engine_dir, oracle)
            print(f"{variant}: {seconds[variant]:.1f}s", file=sys.stderr)
        reports = {v: json.loads((folder / v / "report.json").read_text()) for v in seconds}
        from auditor.data import load_image, open_dataset, pil_to_array

        dataset = open_dataset(data)
        images = [
            pil_to_array(load_image(dataset.absolute(s))) for s in dataset.samples[: args.parity_images]
        ]
        side_by_side = oracle_side_by_side(sam, images, engine_dir)
    diff = differences(reports["torch"], reports["onnx"])
    body = {
        "sam": "vit_b, random init (torch.manual_seed(0))",
        "clip": "zoo clean model (tiny-clip.json)",
        "data": f"{reports['torch']['data']['images']} zoo scenes at 224 px ({args.classes})",
        "oracle_images": reports["torch"]["cost"]["oracle_images"],
        "engine_build_seconds": round(build, 1),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "speedup_vs_torch_oracle": round(seconds["torch"] / seconds["onnx"], 2),
        "same_report": not diff,
        "same_findings": all(reports["onnx"][k] == reports["torch"][k] for k in FINDINGS)
        and victims(reports["onnx"]) == victims(reports["torch"]),
        "report_differences": diff[:20],
        "stage_seconds": {v: r["cost"]["seconds"] for v, r in reports.items()},
        **side_by_side,
    }
    write_result(args.out, "scan_sam", body)
    print(
        json.dumps({k: body[k] for k in ("seconds", "speedup_vs_torch_oracle", "mask_parity")}),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
