"""`clip-audit eval`: clean accuracy and, with --attack, attack success rate."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from auditor.cli.console import advance, show_provider, state
from auditor.cli.options import (
    arch_option,
    attack_option,
    batch_size_option,
    classes_option,
    data_argument,
    engine_dir_option,
    engine_option,
    model_argument,
    precision_option,
    seed_option,
    table_or_json_option,
)
from auditor.evaluate import EvalResult


@click.command("eval")
@model_argument
@data_argument
@arch_option
@classes_option
@attack_option("Trigger to measure, e.g. patch:size=0.12,pattern=checker,pos=random,target=banana")
@table_or_json_option
@engine_option
@engine_dir_option
@precision_option(
    "Image-tower precision for --engine onnx / tensorrt: int8 (ONNX Runtime, CPU) and fp16 (GPU) "
    "are used only if they agree with PyTorch fp32 on >= 99 % of a sample of DATA (else exit 3); "
    "auto: the fastest of them that passes that check, else fp32.",
    auto=True,
)
@batch_size_option
@seed_option
def eval_command(
    model: Path,
    data: Path,
    arch: str | None,
    classes: Path | None,
    attack_spec: str | None,
    fmt: str,
    engine: str,
    engine_dir: Path | None,
    precision: str,
    batch_size: int,
    seed: int,
) -> int:
    """Measure clean accuracy of MODEL on DATA (labels taken as truth) and attack success."""
    from auditor.attacks import parse_attack
    from auditor.data import open_dataset
    from auditor.evaluate import evaluate
    from auditor.models import load_model
    from auditor.runtime import make_runners, resolve_engine

    attack = parse_attack(attack_spec) if attack_spec else None
    dataset = open_dataset(data, classes)
    loaded = load_model(model, arch)
    if precision not in ("fp32", "auto") and resolve_engine(engine) == "torch":
        raise click.UsageError(f"--precision {precision} needs --engine onnx or tensorrt")
    runners = make_runners(loaded, dataset, engine, engine_dir, precision, notify=state.info)
    show_provider(runners[0])
    passes = 2 if attack else 1
    with state.progress("evaluating", total=len(dataset.samples) * passes) as bar:
        result = evaluate(
            loaded,
            dataset,
            attack,
            batch_size=batch_size,
            seed=seed,
            progress=lambda n: advance(bar, n),
            runners=runners,
        )
    if fmt == "json":
        click.echo(json.dumps({"model": str(model), "data": str(data), **result.to_dict()}, indent=2))
    else:
        state.console.print(eval_table(str(model), result))
    for skipped in result.skipped:
        state.debug(f"skipped {skipped.path}: {skipped.reason}")
    if result.skipped:
        state.info(f"[yellow]{len(result.skipped)} file(s) skipped[/yellow] (-v lists them)")
    return 0


def eval_table(model_name: str, result: EvalResult) -> Table:
    table = Table(title=f"eval: {model_name}")
    table.add_column("images", justify="right")
    table.add_column("clean accuracy", justify="right")
    table.add_column("attack")
    table.add_column("attack success", justify="right")
    table.add_row(
        str(result.images),
        f"{result.clean_accuracy:.3f}",
        result.attack or "-",
        "-" if result.attack_success_rate is None else f"{result.attack_success_rate:.3f}",
    )
    return table
