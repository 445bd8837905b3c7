"""`clip-audit demo`: the embedded default — scan a bundled poisoned zoo model.

It writes scan data for the bundled `patch-random` model (held-out scenes, 5 % of them poisoned
and filed under the target label, exactly as a poisoned data set would be), scans it, prints
the findings, and compares them with the generator's ground truth.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from auditor.cli.console import state

DEMO_MODEL = "patch-random"


@click.command("demo")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar="CLIP_AUDIT_OUT",
    show_envvar=True,
    help="Keep the data and the scan's outputs here (default: a temporary folder).",
)
@click.option(
    "--per-class",
    type=click.IntRange(4, 1000),
    default=40,
    envvar="CLIP_AUDIT_DEMO_PER_CLASS",
    show_envvar=True,
    help="Held-out scenes generated per class.",
)
def demo(out: Path | None, per_class: int) -> int:
    """Scan a bundled poisoned model and its poisoned data; print the findings."""
    if out is None:
        with tempfile.TemporaryDirectory(prefix="clip-audit-demo-") as tmp:
            return _run(Path(tmp), per_class, keep=False)
    return _run(out, per_class, keep=True)


def _run(out: Path, per_class: int, keep: bool) -> int:
    from auditor.cli.scan import summary_table
    from auditor.data import open_dataset
    from auditor.models import load_model
    from auditor.oracle import make_oracle
    from auditor.outputs import write_outputs
    from auditor.scan import scan
    from auditor.zoo.build import CONFIG_PATH, ZOO, checkpoint_path, write_scan_data
    from auditor.zoo.scenes import require_font

    require_font()
    data = out / "scan-data"
    state.info(f"bundled model '{DEMO_MODEL}': {ZOO[DEMO_MODEL].description}")
    state.info(f"writing {per_class} held-out scenes per class, 5 % poisoned, to {data} …")
    truth = write_scan_data(DEMO_MODEL, data, per_class=per_class)
    loaded = load_model(checkpoint_path(DEMO_MODEL), CONFIG_PATH)
    with state.stage_progress() as tick:
        result = scan(loaded, open_dataset(data), make_oracle("classic"), progress=tick)
    write_outputs(result, out / "report", "html", data)
    state.console.print(summary_table(result.report))
    planted = {p["path"] for p in truth["poisoned"]}
    found = {v.path for v in result.report.victims}
    state.info(
        f"ground truth: target '{truth['target']}', {len(planted)} poisoned files; the scan named "
        f"{', '.join(result.report.target_labels) or 'no target'} and found {len(found & planted)} of them "
        f"({len(found - planted)} false alarms)."
    )
    state.info(
        f"report: {out / 'report' / 'report.html'} (and report.json, trigger.png, victims.csv, compact/)"
    )
    state.debug(json.dumps(result.report.cost.seconds))
    return 0
