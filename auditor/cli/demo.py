"""`clip-audit demo`: the embedded default on the bundled zoo models.

For now it shows the backdoors: clean accuracy of each bundled model on freshly generated
held-out scenes, and attack success of each poisoned model's planted trigger, beside the same
trigger on the clean model (which it should not fool).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
from rich.table import Table

from auditor.cli.console import advance, state


@click.command("demo")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar="CLIP_AUDIT_OUT",
    show_envvar=True,
    help="Keep the generated data here (default: a temporary folder).",
)
@click.option(
    "--per-class",
    type=click.IntRange(2, 1000),
    default=40,
    envvar="CLIP_AUDIT_PER_CLASS",
    show_envvar=True,
    help="Held-out scenes generated per class.",
)
def demo(out: Path | None, per_class: int) -> int:
    """Show the bundled poisoned models' backdoors (clean accuracy, attack success)."""
    if out is None:
        with tempfile.TemporaryDirectory(prefix="clip-audit-demo-") as tmp:
            return _run(Path(tmp), per_class)
    return _run(out, per_class)


def _run(out: Path, per_class: int) -> int:
    from auditor.data import open_dataset
    from auditor.evaluate import evaluate
    from auditor.models import load_model
    from auditor.zoo.build import CONFIG_PATH, ZOO, checkpoint_path, write_test_data
    from auditor.zoo.scenes import require_font

    require_font()
    state.info(f"generating {per_class} held-out scenes per class in {out} …")
    dataset = open_dataset(write_test_data(out / "test-data", per_class=per_class))
    clean = load_model(checkpoint_path("clean"), CONFIG_PATH)
    poisoned = [m for m in ZOO.values() if m.attack is not None]
    table = Table(title="bundled zoo models: the backdoors clip-audit will look for")
    for column in (
        "model",
        "trigger → target",
        "clean accuracy",
        "attack success",
        "same trigger on clean model",
    ):
        table.add_column(column, justify="left" if column in ("model", "trigger → target") else "right")
    work = len(dataset.samples) * 3 * len(poisoned)
    with state.progress("evaluating zoo models", total=work) as bar:
        for zoo_model in poisoned:
            loaded = load_model(checkpoint_path(zoo_model.name), CONFIG_PATH)
            result = evaluate(loaded, dataset, zoo_model.attack, progress=lambda n: advance(bar, n))
            baseline = evaluate(clean, dataset, zoo_model.attack, progress=lambda n: advance(bar, n // 2))
            table.add_row(
                zoo_model.name,
                zoo_model.description,
                f"{result.clean_accuracy:.3f}",
                f"{result.attack_success_rate:.3f}",
                f"{baseline.attack_success_rate:.3f}",
            )
    state.console.print(table)
    state.info(
        f"clean model: clean accuracy {baseline.clean_accuracy:.3f}. "
        "Next: `clip-audit eval MODEL DATA --arch CONFIG --attack SPEC` on your own model."
    )
    return 0
