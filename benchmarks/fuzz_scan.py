"""Fuzz `clip-audit scan`: random-init models and hostile-but-valid data, every run judged.

`python -m benchmarks.fuzz_scan --scans 500 [--vitb32 6] [--sam 6] [--out FILE]`

Each case draws a model (a random-init tiny ViT or ModifiedResNet at 32-224 px, a seed, an fp32
or fp16 checkpoint in safetensors or torch format; ViT-B-32 with `--vitb32`), a data set (noise,
constant colour, one label, two images, 1x1 and extreme aspect ratios, grey / RGBA / palette /
16-bit PNGs, 1,000 labels, zoo scenes, mixed sizes), an oracle (classic; random-init SAM with
`--sam`) and an engine (torch, ONNX fp32, ONNX int8; the ViT-B-32 cases also the defaults),
then runs the real CLI in-process. The ViT-B-32 cases are the scan that once died with exit 4:
a random-init ViT-B-32 on 256 noise images at 224 px in 4 label folders.

A case passes when the scan exits 0 or 1 and writes a report that reads back through
`Report.from_dict`, or exits 2 with one error line where the data is truly unusable (a single
class and no vocabulary). Anything else (3, 4, 5, a traceback, a missing report) is a failure,
recorded with its seed so that `--only SEED` replays it. The tests run a slice of these cases.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOWERS = ("vit", "resnet")
VIT_SIZES = (32, 48, 64, 96, 128, 224)
RESNET_SIZES = (32, 64, 96, 128, 224)  # ModifiedResNet's attention pool needs a multiple of 32
ENGINES = ("torch", "onnx", "onnx-int8")
CHECKPOINTS = ("safetensors-fp32", "safetensors-fp16", "torch-fp32", "torch-fp16")
DATA_KINDS = (
    "noise",
    "constant",
    "single-label",
    "one-class",
    "two-images",
    "tiny-images",
    "extreme-aspect",
    "png-modes",
    "1000-labels",
    "scenes",
    "mixed-sizes",
)
UNUSABLE = {"one-class"}  # exit 2 is the right answer here (a zero-shot audit needs two names)


@dataclass(frozen=True)
class FuzzCase:
    seed: int
    tower: str  # "vit" | "resnet" | "ViT-B-32"
    image_size: int
    checkpoint: str
    data: str
    oracle: str  # "classic" | "sam"
    engine: str  # "torch" | "onnx" | "onnx-int8" | "default" (no engine options)

    @property
    def name(self) -> str:
        model = f"{self.tower}{self.image_size}-{self.checkpoint}"
        return f"{self.seed:04d}-{model}-{self.data}-{self.oracle}-{self.engine}"


def draw_cases(
    count: int, seed: int = 0, vitb32: int = 0, sam: int = 0, max_size: int = 224
) -> list[FuzzCase]:
    """`count` tiny-model cases cycling through data kinds and engines, plus the ViT-B-32 and SAM ones.

    `max_size` caps the tiny models' input size (the tests' quick slice uses 64).
    """
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        tower = TOWERS[int(rng.integers(len(TOWERS)))]
        sizes = [s for s in (VIT_SIZES if tower == "vit" else RESNET_SIZES) if s <= max_size]
        cases.append(
            FuzzCase(
                seed=seed * 100_000 + i,
                tower=tower,
                image_size=int(sizes[int(rng.integers(len(sizes)))]),
                checkpoint=CHECKPOINTS[int(rng.integers(len(CHECKPOINTS)))],
                data=DATA_KINDS[i % len(DATA_KINDS)],
                oracle="classic",
                engine=ENGINES[(i // len(DATA_KINDS)) % len(ENGINES)],
            )
        )
    for i in range(vitb32):  # the reported crash: 256 noise images at 224 px, torch and the defaults
        engine = ("torch", "default", "onnx-int8", "onnx")[i % 4]
        case = FuzzCase(
            seed * 100_000 + 90_000 + i, "ViT-B-32", 224, "torch-fp32", "noise", "classic", engine
        )
        cases.append(case)
    for i in range(sam):
        data = ("two-images", "png-modes", "tiny-images")[i % 3]
        case = FuzzCase(
            seed * 100_000 + 80_000 + i, TOWERS[i % 2], 64, "safetensors-fp32", data, "sam", "torch"
        )
        cases.append(case)
    return cases


# --- models -------------------------------------------------------------------------------------
def tiny_config(tower: str, size: int) -> dict[str, object]:
    """An open_clip config for a small random model of `tower` at `size` px."""
    text = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
    if tower == "vit":
        vision: dict[str, object] = {"image_size": size, "patch_size": 8 if size <= 64 else 16, "width": 64}
        vision.update(layers=2, head_width=32)
    else:
        vision = {"image_size": size, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16}
    return {"embed_dim": 64, "vision_cfg": vision, "text_cfg": text}


def make_model(case: FuzzCase, folder: Path) -> tuple[Path, str]:
    """(checkpoint path, --arch value) for the case's random-init model."""
    import torch

    from auditor.models import build_model, resolve_arch, save_checkpoint

    if case.tower == "ViT-B-32":
        arch = "ViT-B-32"
    else:
        config = folder / f"{case.tower}-{case.image_size}.json"
        config.write_text(json.dumps(tiny_config(case.tower, case.image_size)))
        arch = str(config)
    torch.manual_seed(case.seed)
    model = build_model(resolve_arch(arch))
    fmt, precision = case.checkpoint.split("-")
    path = folder / ("model.safetensors" if fmt == "safetensors" else "model.pt")
    save_checkpoint(model, path, checkpoint_format=fmt, half=precision == "fp16", wrapped=fmt == "torch")
    return path, arch


# --- data ---------------------------------------------------------------------------------------
def make_data(case: FuzzCase, folder: Path) -> tuple[Path, list[str]]:
    """(DATA path, extra CLI args) for the case's data kind, written under `folder`."""
    from PIL import Image

    rng = np.random.default_rng(case.seed)
    root = folder / "data"
    labels = ["dog", "cat", "car", "boat"]

    def save(label: str | None, name: str, image: Image.Image) -> None:
        target = root / label if label else root
        target.mkdir(parents=True, exist_ok=True)
        image.save(target / name)

    def noise(height: int, width: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))

    size, extra = case.image_size, []
    if case.data == "noise":
        for i in range(24 if case.tower != "ViT-B-32" else 256):
            save(labels[i % 4], f"{i:03d}.png", noise(size, size))
    elif case.data == "constant":
        for i in range(12):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            save(labels[i % 3], f"{i:03d}.png", Image.new("RGB", (size, size), colour))
    elif case.data in ("single-label", "one-class"):
        for i in range(8):
            save("dog", f"{i:03d}.png", noise(size, size))
        if case.data == "single-label":  # one label in the data, a vocabulary beside it
            extra = ["--classes", str(_classes(folder, labels))]
    elif case.data == "two-images":
        save("dog", "a.png", noise(size, size))
        save("cat", "b.png", noise(size, size))
    elif case.data == "tiny-images":
        for i, (h, w) in enumerate([(1, 1), (2, 2), (1, 3), (3, 1), (2, 5), (4, 4)]):
            save(labels[i % 2], f"{i}.png", noise(h, w))
    elif case.data == "extreme-aspect":
        for i, (h, w) in enumerate([(1, 300), (300, 1), (2, 400), (400, 3), (8, 256), (256, 8)]):
            save(labels[i % 2], f"{i}.png", noise(h, w))
    elif case.data == "png-modes":
        base = np.asarray(noise(size, size))
        grey = base[..., 0]
        modes = {
            "L": Image.fromarray(grey),
            "LA": Image.fromarray(np.dstack([grey, grey]), "LA"),
            "RGBA": Image.fromarray(np.dstack([base, grey])),
            "P": Image.fromarray(base).quantize(16),
            "I16": Image.fromarray(grey.astype(np.uint16) * 257),
            "1": Image.fromarray(grey > 127),
        }
        for i, (mode, image) in enumerate(modes.items()):
            save(labels[i % 3], f"{mode}.png", image)
    elif case.data == "1000-labels":
        for i in range(16):
            save(None, f"{i:03d}.png", noise(size, size))
        extra = ["--classes", str(_classes(folder, [f"class {k:04d}" for k in range(1000)]))]
    elif case.data == "scenes":
        from auditor.zoo.scenes import balanced_labels, render_scenes

        for i, scene in enumerate(render_scenes(balanced_labels(2), seed=case.seed, size=size)):
            save(scene.label, f"{i:03d}.png", Image.fromarray(scene.image))
    elif case.data == "mixed-sizes":
        for i in range(10):
            save(labels[i % 2], f"{i}.png", noise(int(rng.integers(8, 300)), int(rng.integers(8, 300))))
    else:
        raise ValueError(f"unknown data kind {case.data}")
    return root, extra


def _classes(folder: Path, names: list[str]) -> Path:
    path = folder / "classes.txt"
    path.write_text("\n".join(names) + "\n")
    return path


def random_sam(folder: Path, seed: int) -> Path:
    """A random-init SAM ViT-B saved as safetensors (the oracle's weight file)."""
    import torch
    from safetensors.torch import save_file
    from segment_anything import sam_model_registry

    path = folder / "sam_vit_b.safetensors"
    if not path.exists():
        torch.manual_seed(seed)
        sam = sam_model_registry["vit_b"](checkpoint=None)
        save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(path))
    return path


# --- running ------------------------------------------------------------------------------------
def run_case(case: FuzzCase, workdir: Path, sam_weights: Path | None = None) -> dict[str, object]:
    """Run one case through the CLI in this process; returns what happened and whether it passed."""
    from auditor.cli import run
    from auditor.report import Report

    workdir.mkdir(parents=True, exist_ok=True)
    model, arch = make_model(case, workdir)
    data, extra = make_data(case, workdir)
    out = workdir / "out"
    argv = ["scan", str(model), str(data), "--arch", arch, "--out", str(out), "--format", "json", *extra]
    if case.engine == "torch":
        argv += ["--engine", "torch"]
    elif case.engine != "default":
        # int8 through `auto`: on a random model int8 may fail the agreement check on DATA, and
        # then the scan must fall back to fp32 (an explicit --precision int8 refuses, exit 3).
        argv += ["--engine", "onnx", "--precision", "auto" if case.engine == "onnx-int8" else "fp32"]
    if case.oracle == "sam":
        assert sam_weights is not None
        argv += ["--oracle", "sam", "--oracle-checkpoint", str(sam_weights), "--oracle-points", "4"]
        argv += ["--per-class", "1"]
    stderr = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = run(argv)
    seconds = time.perf_counter() - started
    errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error:")]
    precision = next((line for line in stderr.getvalue().splitlines() if "--precision auto" in line), None)
    report_ok, verdict = False, None
    if (out / "report.json").exists():
        raw = json.loads((out / "report.json").read_text())
        report_ok = Report.from_dict(raw).to_dict() == raw
        verdict = raw["verdict"]
    if case.data in UNUSABLE:
        passed = code == 2 and len(errors) == 1 and "Traceback" not in stderr.getvalue()
    else:
        passed = code in (0, 1) and report_ok
    return {
        **asdict(case),
        "exit": code,
        "passed": passed,
        "verdict": verdict,
        "seconds": round(seconds, 2),
        "error": errors[0] if errors else None,
        "precision_note": precision,
    }


def run_cases(cases: list[FuzzCase], root: Path, progress: bool = True) -> list[dict[str, object]]:
    import shutil

    sam_weights = random_sam(root, 0) if any(c.oracle == "sam" for c in cases) else None
    results = []
    for n, case in enumerate(cases, 1):
        workdir = root / case.name
        result = run_case(case, workdir, sam_weights)
        shutil.rmtree(workdir, ignore_errors=True)
        results.append(result)
        if progress:
            mark = "ok  " if result["passed"] else "FAIL"
            line = f"[{n}/{len(cases)}] {mark} exit {result['exit']} {result['seconds']:6.1f}s {case.name}"
            print(line + (f"  {result['error']}" if result["error"] else ""), flush=True)
    return results


def summarize(results: list[dict[str, object]]) -> dict[str, object]:
    def count(key: str) -> dict[str, int]:
        return dict(sorted(Counter(str(r[key]) for r in results).items()))

    return {
        "scans": len(results),
        "passed": sum(bool(r["passed"]) for r in results),
        "internal_errors": sum(r["exit"] == 4 for r in results),
        "exit_codes": count("exit"),
        "by_tower": count("tower"),
        "by_engine": count("engine"),
        "by_data": count("data"),
        "by_oracle": count("oracle"),
        "by_checkpoint": count("checkpoint"),
        "failures": [r for r in results if not r["passed"]],
    }


def main() -> None:
    import tempfile

    from benchmarks.common import write_result

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=500, help="tiny-model cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vitb32", type=int, default=0, help="extra ViT-B-32 cases (about a minute each)")
    parser.add_argument("--sam", type=int, default=0, help="extra random-SAM cases (a few minutes each)")
    parser.add_argument("--only", type=int, nargs="*", help="replay these case seeds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fuzz_scan.json"))
    args = parser.parse_args()
    cases = draw_cases(args.scans, args.seed, args.vitb32, args.sam)
    if args.only:
        cases = [c for c in cases if c.seed in set(args.only)]
    os.environ.setdefault("CLIP_AUDIT_ENGINE_DIR", tempfile.mkdtemp(prefix="fuzz-engines-"))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuzz-scan-") as tmp:
        results = run_cases(cases, Path(tmp))
    body = {
        "what": "every scan exits 0/1 with a valid report, or 2 with one error line on unusable data",
        "wall_seconds": round(time.perf_counter() - started, 1),
        "summary": summarize(results),
        "cases": results,
    }
    write_result(args.out, "fuzz_scan", body)


if __name__ == "__main__":
    main()
