"""`clip-audit demo`: the embedded default — scan, repair and re-scan a bundled poisoned model.

It writes scan data for the bundled `patch-random` model (held-out scenes, 5 % of them poisoned
and filed under the target label, exactly as a poisoned data set would be), scans it, compares
the findings with the generator's ground truth, repairs the model on the scan's compact set,
scans the repaired checkpoint again, and ends with the before/after table.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from auditor.cli.console import state
from auditor.cli.options import out_option

DEMO_MODEL = "patch-random"


@click.command("demo")
@out_option("Keep the data, reports and repaired checkpoint here (default: a temporary folder).")
@click.option(
    "--per-class",
    type=click.IntRange(4, 1000),
    default=40,
    envvar="CLIP_AUDIT_DEMO_PER_CLASS",
    show_envvar=True,
    help="Held-out scenes generated per class.",
)
def demo(out: Path | None, per_class: int) -> int:
    """Scan a bundled poisoned model, repair it, re-scan it; print the findings and the table."""
    if out is None:
        with tempfile.TemporaryDirectory(prefix="clip-audit-demo-") as tmp:
            return _run(Path(tmp), per_class, keep=False)
    return _run(out, per_class, keep=True)


def _run(out: Path, per_class: int, keep: bool) -> int:
    from auditor.cli.repair import before_after_table
    from auditor.cli.scan import summary_table
    from auditor.data import open_dataset
    from auditor.models import load_model, save_checkpoint
    from auditor.oracle import make_oracle
    from auditor.repair import load_scan_outputs, repair
    from auditor.scan import scan
    from auditor.scan.writers import write_outputs
    from auditor.zoo.build import CONFIG_PATH, ZOO, checkpoint_path, write_scan_data
    from auditor.zoo.scenes import require_font

    require_font()
    data = out / "scan-data"
    state.info(f"bundled model '{DEMO_MODEL}': {ZOO[DEMO_MODEL].description}")
    state.info(f"writing {per_class} held-out scenes per class, 5 % poisoned, to {data} …")
    truth = write_scan_data(DEMO_MODEL, data, per_class=per_class)
    dataset = open_dataset(data)
    loaded = load_model(checkpoint_path(DEMO_MODEL), CONFIG_PATH)
    with state.stage_progress() as tick:
        result = scan(loaded, dataset, make_oracle("classic"), progress=tick)
    write_outputs(result, out / "report", "html", dataset)
    state.console.print(summary_table(result.report))
    planted = {p["path"] for p in truth["poisoned"]}
    found = {v.path for v in result.report.victims}
    state.info(
        f"ground truth: target '{truth['target']}', {len(planted)} poisoned files; the scan named "
        f"{', '.join(result.report.target_labels) or 'no target'} and found {len(found & planted)} of them "
        f"({len(found - planted)} false alarms)."
    )
    if result.report.verdict != "backdoor":
        return 0

    state.info("repairing on the scan's compact set …")
    with state.progress("repairing", total=None) as bar:
        task = bar.task_ids[0]
        repaired = repair(
            loaded,
            dataset,
            load_scan_outputs(out / "report" / "report.json"),
            attack=ZOO[DEMO_MODEL].attack,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    fixed = out / "repaired.safetensors"
    save_checkpoint(loaded.model, fixed, half=loaded.half_precision)
    with state.stage_progress() as tick:
        rescan = scan(load_model(fixed, CONFIG_PATH), dataset, make_oracle("classic"), progress=tick)
    write_outputs(rescan, out / "rescan", "html", dataset)
    state.info(f"re-scan of the repaired checkpoint: verdict [bold]{rescan.report.verdict}[/bold]")
    state.console.print(before_after_table(repaired))
    where = f"{out / 'report'} and {out / 'rescan'} (report.html, report.json, …)"
    state.info(f"reports: {where}" if keep else "pass --out DIR to keep the data, reports and checkpoint")
    state.debug(json.dumps(result.report.cost.seconds))
    return 0
