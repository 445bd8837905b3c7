"""`clip-audit repair`: fine-tune the backdoor away on the scan's compact set; before/after table."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from auditor.cli.console import state
from auditor.cli.options import (
    arch_option,
    attack_option,
    classes_option,
    data_argument,
    model_argument,
    out_option,
    seed_option,
)
from auditor.repair import TOWERS, RepairConfig, RepairResult

new_path = click.Path(path_type=Path)


@click.command("repair")
@model_argument
@data_argument
@arch_option
@classes_option
@click.option(
    "--report",
    "report_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    envvar="CLIP_AUDIT_REPORT",
    show_envvar=True,
    help="The report.json of `scan --out DIR` (its compact/ and trigger.png are read beside it).",
)
@click.option(
    "--output",
    type=new_path,
    required=True,
    help="Where the repaired checkpoint goes (never MODEL itself): a file in MODEL's format for a state "
    "dict; an open_clip folder for an OpenAI archive or a Hugging Face / open_clip checkpoint.",
)
@click.option("--force", is_flag=True, help="Overwrite --output if it exists.")
@click.option(
    "--steps", type=click.IntRange(1, 100_000), default=300, help="Step budget (early stop ends sooner)."
)
@click.option(
    "--epochs",
    type=click.FloatRange(0.1, 1000),
    default=None,
    help="Budget in passes over the compact set instead of --steps.",
)
@click.option(
    "--lr", type=click.FloatRange(1e-8, 1.0), default=RepairConfig.lr, help="AdamW peak learning rate."
)
@click.option("--towers", type=click.Choice(TOWERS), default="image", help="Which towers train.")
@click.option(
    "--image-blocks",
    type=click.IntRange(0, 1000),
    default=2,
    help="Of the image tower, train only the stem / patch embedding and the first N blocks "
    "(ViT) or residual stages (ResNet) (0: all).",
)
@click.option(
    "--in-modal", type=click.FloatRange(0, 100), default=0.0, help="Weight of CleanCLIP's in-modal term."
)
@attack_option("A trigger you know, measured before and after (it never steers the fine-tune).")
@out_option("Write DIR/repair.json (the before/after numbers and their history).")
@click.option("--batch-size", type=click.IntRange(2, 4096), default=32, help="Pairs per fine-tuning step.")
@seed_option
def repair_command(
    model: Path,
    data: Path,
    arch: str | None,
    classes: Path | None,
    report_path: Path,
    output: Path,
    force: bool,
    steps: int,
    epochs: float | None,
    lr: float,
    towers: str,
    image_blocks: int,
    in_modal: float,
    attack_spec: str | None,
    out: Path | None,
    batch_size: int,
    seed: int,
) -> int:
    """Remove the backdoor that `scan` found in MODEL; write the repaired checkpoint to --output."""
    from auditor.attacks import parse_attack
    from auditor.data import open_dataset
    from auditor.errors import InputError
    from auditor.files import atomic_write
    from auditor.models import load_model, save_checkpoint, save_open_clip_folder
    from auditor.repair import load_scan_outputs, repair

    _check_output(model, output, force)
    attack = parse_attack(attack_spec) if attack_spec else None
    outputs = load_scan_outputs(report_path)
    dataset = open_dataset(data, classes)
    loaded = load_model(model, arch)
    if outputs.report.model.sha256 and outputs.report.model.sha256 != loaded.sha256:
        raise InputError(
            f"{report_path} was written for another checkpoint (sha256 {outputs.report.model.sha256[:12]}…)",
            hint="repair the model the report describes, or scan this one first",
        )
    if epochs is not None:
        steps = max(1, round(epochs * len(outputs.compact) / batch_size))
    config = RepairConfig(
        steps=steps,
        batch_size=min(batch_size, len(outputs.compact)),
        lr=lr,
        towers=towers,
        image_blocks=image_blocks or None,
        in_modal=in_modal,
        seed=seed,
    )
    with state.progress("repairing", total=steps) as bar:
        task = bar.task_ids[0]
        result = repair(
            loaded,
            dataset,
            outputs,
            config,
            attack,
            progress=lambda done, total: bar.update(task, completed=done),
        )
    if loaded.source_format in ("safetensors", "torch"):
        save_checkpoint(
            loaded.model,
            output,
            checkpoint_format=loaded.checkpoint_format,
            wrapped=loaded.wrapped_state_dict,
            prefix=loaded.key_prefix,
            half=loaded.half_precision,
        )
    else:  # clip-audit reads these layouts but writes open_clip's, which carries its arch too
        save_open_clip_folder(loaded.model, loaded.arch, output, half=loaded.half_precision)
        state.info(
            f"{model} is a {loaded.source_format}; the repaired model is written as an open_clip folder "
            f"(open_clip_config.json + open_clip_model.safetensors) at {output}"
        )
    state.console.print(before_after_table(result))
    state.info(f"{result.stopped}; wrote {output}")
    if out is not None:
        record = {"model": str(model), "output": str(output), "report": str(report_path), **result.to_dict()}
        atomic_write(out / "repair.json", json.dumps(record, indent=2).encode())
        state.info(f"wrote {out / 'repair.json'}")
    return 0


def _check_output(model: Path, output: Path, force: bool) -> None:
    from auditor.errors import InputError

    if output.exists() and output.resolve() == model.resolve():
        raise InputError(f"--output {output} is the input checkpoint; the original is never overwritten")
    if output.exists() and not force:
        raise InputError(f"{output} exists", hint="pass --force to overwrite it, or choose another --output")
    if output.is_dir() and not model.is_dir() and not force:
        raise InputError(f"--output {output} is a folder; give a file name")


def before_after_table(result: RepairResult) -> Table:
    """Rich table: clean accuracy and attack success before and after, and what it cost."""

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    steered = "" if result.judged_apart else ", which also steered the stop"
    table = Table(title=f"repair: before / after ({result.judged_images} held-out images{steered})")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    error = result.after.accuracy_change_error(result.before)
    change = result.after.clean_accuracy - result.before.clean_accuracy
    # The change is measured on a few hundred images: its standard error says how far to trust it.
    spread = "" if error is None else f" ({100 * change:+.1f} ± {100 * error:.1f} points)"
    table.add_row(
        "clean accuracy", rate(result.before.clean_accuracy), rate(result.after.clean_accuracy) + spread
    )
    table.add_row(
        "attack success, recovered trigger",
        rate(result.before.transplant_success),
        rate(result.after.transplant_success),
    )
    if result.before.attack_success is not None:
        table.add_row(
            "attack success, known trigger",
            rate(result.before.attack_success),
            rate(result.after.attack_success),
        )
    table.add_row("steps", "", str(result.steps))
    pool = f", anchor on {result.anchor_images} more data images" if result.anchor_images else ""
    table.add_row("images seen", "", f"{result.images_seen} ({result.compact_pairs} compact pairs{pool})")
    table.add_row("wall time", "", f"{result.seconds:.1f} s")
    return table
