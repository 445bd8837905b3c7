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
        "cpu_model": _cpuinfo("model name"),
        "cpu_flags": cpu_flags(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


# The flags that change what a CPU engine can do (int8 gains depend on VNNI / AMX).
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")


def cpu_flags() -> list[str]:
    """Which of SPEED_FLAGS this CPU has (empty where /proc/cpuinfo is not there)."""
    flags = set((_cpuinfo("flags") or "").split())
    return [f for f in SPEED_FLAGS if f in flags]


def _cpuinfo(field: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


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
    path = folder / f"{Path(arch).stem}-random-seed{seed}.safetensors"  # arch may be a config path
    save_checkpoint(build_model(resolve_arch(arch)), path)
    return path


def scene_folder(
    dest: Path, per_class: int, size: int, seed: int = 11, classes: list[str] | None = None
) -> Path:
    """Zoo scenes rendered at `size` px as an ImageFolder (per_class of each zoo class, or of `classes`)."""
    from PIL import Image

    from auditor.zoo.scenes import balanced_labels, render_scenes

    for index, scene in enumerate(render_scenes(balanced_labels(per_class, classes), seed=seed, size=size)):
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
