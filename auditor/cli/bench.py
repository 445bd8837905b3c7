"""`clip-audit bench`: image-tower throughput per engine and batch size, against PyTorch eager."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from auditor.cli.console import state
from auditor.cli.options import (
    arch_option,
    classes_option,
    engine_dir_option,
    model_argument,
    out_option,
    probe_data_option,
    table_or_json_option,
)


def _batches(_ctx: click.Context, _param: click.Parameter, value: str) -> list[int]:
    try:
        batches = [int(b) for b in value.split(",") if b.strip()]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of batch sizes") from None
    if not batches or min(batches) < 1:
        raise click.BadParameter("batch sizes must be positive integers")
    return batches


@click.command("bench")
@model_argument
@arch_option
@click.option(
    "--engines",
    default="torch,onnx,onnx-int8",
    envvar="CLIP_AUDIT_ENGINES",
    show_envvar=True,
    help="Comma-separated: torch, onnx, onnx-int8, onnx-fp16, tensorrt, tensorrt-fp16 "
    "(torch is always measured: it is the baseline).",
)
@click.option(
    "--batch",
    "batches",
    default="1,32",
    callback=_batches,
    envvar="CLIP_AUDIT_BATCH",
    show_envvar=True,
    help="Comma-separated batch sizes.",
)
@click.option(
    "--repeats",
    type=click.IntRange(1, 1000),
    default=7,
    envvar="CLIP_AUDIT_REPEATS",
    show_envvar=True,
    help="Timed calls per engine and batch size (the median is reported).",
)
@probe_data_option("Images to check the engines on (top-1 agreement); noise when left out.")
@classes_option
@engine_dir_option
@out_option("Also write the result as DIR/bench.json.")
@table_or_json_option
def bench_command(
    model: Path,
    arch: str | None,
    engines: str,
    batches: list[int],
    repeats: int,
    data: Path | None,
    classes: Path | None,
    engine_dir: Path | None,
    out: Path | None,
    fmt: str,
) -> int:
    """Measure images/s of MODEL's image tower on each engine, side by side in one run."""
    from auditor.bench import bench, parse_engines
    from auditor.data import open_dataset
    from auditor.files import atomic_write
    from auditor.models import load_model
    from auditor.runtime import make_probe

    names = parse_engines(engines)
    dataset = open_dataset(data, classes) if data is not None else None
    loaded = load_model(model, arch)
    probe = make_probe(loaded, dataset)
    with state.stage_progress() as tick:
        result = bench(loaded, names, batches, probe, repeats, engine_dir, progress=tick)
    body = json.dumps({"model": str(model), **result.to_dict()}, indent=2) + "\n"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "bench.json", body.encode())
        state.info(f"wrote {out}/bench.json")
    if fmt == "json":
        click.echo(body, nl=False)
    else:
        state.console.print(bench_table(result.to_dict()))
    return 0


def bench_table(result: dict[str, object]) -> Table:
    table = Table(title=f"clip-audit bench: {result['arch']} image tower, {result['image_size']} px")
    for column in ("engine", "provider", "batch", "images/s", "vs torch", "parity"):
        table.add_column(column, justify="right" if column in ("batch", "images/s", "vs torch") else "left")
    checks: dict[str, dict[str, float | None]] = result["checks"]  # type: ignore[assignment]
    for row in result["throughput"]:  # type: ignore[attr-defined]
        check = checks.get(row["engine"])
        parity = "reference"
        if check:
            parity = f"cos {check['image_min_cosine']:.5f}"
            if check.get("top1_agreement") is not None:
                parity += f", top-1 {check['top1_agreement']:.1%}"
        table.add_row(
            row["engine"],
            row["provider"],
            str(row["batch"]),
            f"{row['images_per_second']:.1f}",
            f"{row['speedup_vs_torch']:.2f}x",
            parity,
        )
    return table
