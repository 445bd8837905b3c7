"""What every benchmark result records: the command, the machine, the date; and box IoU."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path


def machine() -> dict[str, object]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def write_result(out: Path, name: str, body: dict[str, object]) -> None:
    """Write `body` as benchmark `name`'s JSON result, stamped with command, machine and date."""
    record = {
        "benchmark": name,
        "command": "python -m benchmarks." + name + " " + " ".join(sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        **body,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two normalized boxes [x0, y0, x1, y1]."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def random_checkpoint(arch: str, folder: Path, seed: int = 0) -> Path:
    """A random-init model of `arch` (torch.manual_seed(seed)) saved as safetensors in `folder`."""
    import torch

    from auditor.models import build_model, resolve_arch, save_checkpoint

    torch.manual_seed(seed)
    path = folder / f"{arch}-random-seed{seed}.safetensors"
    save_checkpoint(build_model(resolve_arch(arch)), path)
    return path


def scene_folder(dest: Path, per_class: int, size: int, seed: int = 11) -> Path:
    """Zoo scenes rendered at `size` px as an ImageFolder (per_class of each zoo class)."""
    from PIL import Image

    from auditor.zoo.scenes import balanced_labels, render_scenes

    for index, scene in enumerate(render_scenes(balanced_labels(per_class), seed=seed, size=size)):
        (dest / scene.label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(dest / scene.label / f"{index:05d}.png")
    return dest


def fp32_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    """This machine's fp32 matrix-multiply rate through PyTorch (GFLOP/s): the ceiling for any engine."""
    import time

    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9
