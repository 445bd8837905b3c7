"""`clip-audit export`: build the engines scans use, check them against PyTorch, cache them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from auditor.cli.console import state
from auditor.cli.options import (
    arch_option,
    classes_option,
    engine_dir_option,
    model_argument,
    oracle_checkpoint_option,
    precision_option,
    probe_data_option,
    table_or_json_option,
)

if TYPE_CHECKING:
    from auditor.data import Dataset
    from auditor.runtime import Engines


@click.command("export")
@model_argument
@arch_option
@click.option(
    "--what",
    type=click.Choice(["clip", "oracle", "all"]),
    default="clip",
    envvar="CLIP_AUDIT_WHAT",
    show_envvar=True,
    help="clip: the image and text towers; oracle: SAM's encoder and decoder (--oracle-checkpoint).",
)
@precision_option(
    "For the image tower (text stays fp32). fp16 runs on GPU providers only; int8 is an "
    "ONNX Runtime CPU engine. Both need --data."
)
@click.option(
    "--engine",
    type=click.Choice(["onnx", "tensorrt"]),
    default="onnx",
    envvar="CLIP_AUDIT_ENGINE",
    show_envvar=True,
    help="ONNX graphs for ONNX Runtime, or TensorRT engines (the [gpu] extra and a CUDA GPU).",
)
@engine_dir_option
@probe_data_option("Images to check the engines on (any DATA layout scan accepts); noise when left out.")
@classes_option
@oracle_checkpoint_option("SAM weights (sam_vit_b/l/h) for --what oracle / all.")
@table_or_json_option
def export_command(
    model: Path,
    arch: str | None,
    what: str,
    precision: str,
    engine: str,
    engine_dir: Path | None,
    data: Path | None,
    classes: Path | None,
    oracle_checkpoint: Path | None,
    fmt: str,
) -> int:
    """Export MODEL's towers (and SAM) to engines, check them against PyTorch, and cache them.

    A failed check is exit 3 with the measured numbers; nothing unchecked is left in the cache
    for scans to use (they check again on their own data).
    """
    from auditor.data import open_dataset
    from auditor.models import load_model
    from auditor.runtime import AGREEMENT_IMAGES, build_engines, check_engines, make_probe

    if what != "clip" and oracle_checkpoint is None:
        raise click.UsageError(f"--what {what} needs --oracle-checkpoint (SAM weights you provide)")
    if what != "clip" and (engine, precision) != ("onnx", "fp32"):
        raise click.UsageError("SAM is exported as ONNX fp32 only: drop --engine / --precision")
    if precision != "fp32" and data is None:
        raise click.UsageError(f"{precision} engines are checked by top-1 agreement on images: pass --data")
    dataset = open_dataset(data, classes) if data is not None else None
    rows: list[dict[str, object]] = []
    if what in ("clip", "all"):
        loaded = load_model(model, arch)
        with state.progress(f"exporting {engine} {precision}", total=None):
            engines = build_engines(loaded, engine, precision, engine_dir)
            runners = engines.runners()
            with runners[0], runners[1]:
                probe = make_probe(loaded, dataset, AGREEMENT_IMAGES)
                checks = check_engines(loaded, runners, precision, probe).to_dict()
                providers = {"image": runners[0].provider, "text": runners[1].provider}
        for name in engines.files:
            rows.append(_row(name, engines, _own(checks, name), providers[name]))
    if what in ("oracle", "all") and oracle_checkpoint is not None:
        rows += _export_sam(oracle_checkpoint, dataset, engine_dir)
    if fmt == "json":
        click.echo(json.dumps({"model": str(model), "engines": rows}, indent=2))
    else:
        state.console.print(export_table(rows))
    return 0


def _row(name: str, engines: Engines, checks: Mapping[str, object], provider: str) -> dict[str, object]:
    from auditor.runtime import TOWERS, tower_precision

    path = engines.files[name]
    return {
        "part": name,
        "runtime": engines.runtime,
        "precision": tower_precision(name, engines.precision) if name in TOWERS else engines.precision,
        "provider": provider,
        "path": str(path),
        "bytes": path.stat().st_size,
        "cache_hit": engines.cache_hit,
        "checks": checks,
    }


def _export_sam(
    checkpoint: Path, dataset: Dataset | None, engine_dir: Path | None
) -> list[dict[str, object]]:
    from auditor.data import first_image
    from auditor.models import sha256_file
    from auditor.oracle.sam import load_sam
    from auditor.oracle.sam_engine import build_sam_engines, check_sam_engines, stored_mask_parity

    sam, kind = load_sam(checkpoint)
    image = first_image(dataset)
    probes = [image] if image is not None else None
    with state.progress(f"exporting SAM {kind} (and checking its masks against PyTorch)", total=None):
        engines = build_sam_engines(sam, kind, sha256_file(checkpoint), engine_dir, probes)
        checks, provider = check_sam_engines(sam, engines, image)
    masks = stored_mask_parity(engines)
    numbers = {
        **checks,
        "decoder_mean_mask_iou": masks.mean_mask_iou,
        "decoder_segments": masks.engine_segments,
    }
    numbers["decoder_torch_segments"] = masks.torch_segments
    return [_row(name, engines, _own(numbers, name), provider) for name in ("encoder", "decoder")]


def _own(checks: Mapping[str, object], part: str) -> dict[str, object]:
    """The numbers measured on `part`; zero-shot agreement (of the tower pair) goes with the image."""
    own = {k: v for k, v in checks.items() if k.startswith(part)}
    if part == "image" and checks.get("top1_agreement") is not None:
        own["top1_agreement"] = checks["top1_agreement"]
    return own


def _number(name: str, value: float) -> str:
    if "diff" in name:
        return f"max diff {value:.1e}"
    if "cosine" in name:
        return f"cos {value:.5f}"
    if "mask_iou" in name:
        return f"mask IoU {value:.4f}"
    if name.endswith("torch_segments"):
        return f"PyTorch {value}"
    if name.endswith("segments"):
        return f"segments {value}"
    return f"top-1 {value:.1%}"


def export_table(rows: list[dict[str, object]]) -> Table:
    table = Table(title="clip-audit export")
    for column in ("part", "engine", "provider", "file", "MB", "cached", "check"):
        table.add_column(column)
    for row in rows:
        checks: dict[str, float] = row["checks"]  # type: ignore[assignment]
        summary = ", ".join(
            _number(k, v) for k, v in checks.items() if isinstance(v, (int, float)) and k != "probe_images"
        )
        table.add_row(
            str(row["part"]),
            f"{row['runtime']} {row['precision']}",
            str(row["provider"]),
            Path(str(row["path"])).name,
            f"{int(row['bytes']) / 1e6:.1f}",  # type: ignore[call-overload]
            "yes" if row["cache_hit"] else "built",
            summary,
        )
    return table
