"""`clip-audit bench`: image-tower throughput and latency per engine and batch size, and the per-image
check one image at a time, against PyTorch eager."""

from __future__ import annotations

import json
from collections.abc import Callable
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
    out_option,
    probe_data_option,
    table_or_json_option,
)

if TYPE_CHECKING:
    import numpy as np

    from auditor.data import Dataset
    from auditor.oracle import Oracle


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
@click.option(
    "--oracle",
    type=click.Choice(["classic", "sam", "fastsam", "none"]),
    default="classic",
    envvar="CLIP_AUDIT_ORACLE",
    show_envvar=True,
    help="Also time the oracle and the whole per-image check (Algorithm 1), one image at a time.",
)
@oracle_checkpoint_option("Weights for --oracle sam / fastsam (a file you provide).")
@click.option(
    "--oracle-images",
    type=click.IntRange(1, 1000),
    default=4,
    envvar="CLIP_AUDIT_ORACLE_IMAGES",
    show_envvar=True,
    help="Images the per-image timings run on (from --data, else zoo scenes at the model's size).",
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
    oracle: str,
    oracle_checkpoint: Path | None,
    oracle_images: int,
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
    images = _latency_images(dataset, oracle_images, loaded.arch.image_size)
    oracle_for = None if oracle == "none" else _oracles(oracle, oracle_checkpoint, engine_dir, images[0])
    with state.stage_progress() as tick:
        result = bench(
            loaded,
            names,
            batches,
            probe,
            repeats,
            engine_dir,
            progress=tick,
            images=images,
            oracle_for=oracle_for,
        )
    body = json.dumps({"model": str(model), **result.to_dict()}, indent=2) + "\n"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "bench.json", body.encode())
        state.info(f"wrote {out}/bench.json")
    if fmt == "json":
        click.echo(body, nl=False)
    else:
        state.console.print(bench_table(result.to_dict()))
        if result.per_image:
            state.console.print(per_image_table(result.to_dict()))
    return 0


def _latency_images(dataset: Dataset | None, count: int, size: int) -> list[np.ndarray]:
    """`count` decodable images spread over DATA, else zoo scenes rendered at `size` px."""
    from auditor.data import ImageDecodeError, pil_to_array
    from auditor.zoo.scenes import balanced_labels, render_scenes

    images = []
    for sample in dataset.samples[:: max(1, len(dataset.samples) // count)] if dataset else []:
        try:
            images.append(pil_to_array(dataset.load(sample)))  # type: ignore[union-attr]
        except ImageDecodeError:
            continue
        if len(images) == count:
            return images
    return images or [s.image for s in render_scenes(balanced_labels(1)[:count], seed=0, size=size)]


def _oracles(
    kind: str, checkpoint: Path | None, engine_dir: Path | None, probe_image: np.ndarray
) -> Callable[[str], Oracle]:
    """runtime -> the oracle that runs there, each made once (SAM's engines are built and checked)."""
    from functools import cache

    from auditor.oracle import make_oracle

    @cache
    def oracle_for(runtime: str) -> Oracle:
        return make_oracle(kind, checkpoint, runtime=runtime, engine_dir=engine_dir, probe_image=probe_image)

    oracle_for("torch")  # bad oracle options fail here, before anything is measured
    return oracle_for


def bench_table(result: dict[str, object]) -> Table:
    table = Table(title=f"clip-audit bench: {result['arch']} image tower, {result['image_size']} px")
    numeric = ("batch", "images/s", "vs torch", "p50 ms", "p95 ms")
    for column in ("engine", "provider", "batch", "images/s", "vs torch", "p50 ms", "p95 ms", "parity"):
        table.add_column(column, justify="right" if column in numeric else "left")
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
            f"{row['p50_ms']:.1f}",
            f"{row['p95_ms']:.1f}",
            parity,
        )
    return table


def per_image_table(result: dict[str, object]) -> Table:
    table = Table(title="per image, one at a time: the oracle, and Algorithm 1 whole (oracle + scorings)")
    for column in (
        "engine",
        "oracle",
        "images",
        "oracle p50 ms",
        "oracle p95 ms",
        "check p50 ms",
        "check p95 ms",
    ):
        table.add_column(column, justify="left" if column in ("engine", "oracle") else "right")
    table.add_column("scorings / image", justify="right")
    for row in result["per_image"]:  # type: ignore[attr-defined]
        values = (row["oracle_p50_ms"], row["oracle_p95_ms"], row["check_p50_ms"], row["check_p95_ms"])
        table.add_row(
            row["engine"],
            row["oracle"],
            str(row["images"]),
            *(f"{v:.0f}" for v in values),
            str(row["scorings"]),
        )
    return table
