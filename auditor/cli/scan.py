"""`clip-audit scan`: find the backdoor trigger, target and victim labels, and victim samples."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import click
from rich.table import Table

from auditor.cli.console import show_provider, state
from auditor.cli.options import (
    arch_option,
    batch_size_option,
    classes_option,
    data_argument,
    engine_dir_option,
    engine_option,
    existing_file,
    model_argument,
    oracle_checkpoint_option,
    out_option,
    precision_option,
    seed_option,
)
from auditor.report import SEVERITIES, Report, failure_summary

EXIT_FINDINGS = 1
# The report is written, but some images (or steps) could not be checked: a "clean" there is
# not a clean bill of health. Not 4, which means no report at all; not 0, which a pipeline
# would read as a pass. Findings (1) still take precedence: a confirmed backdoor stands.
EXIT_INCOMPLETE = 5


@click.command("scan")
@model_argument
@data_argument
@arch_option
@classes_option
@click.option(
    "--oracle",
    type=click.Choice(["classic", "sam", "fastsam"]),
    default="classic",
    envvar="CLIP_AUDIT_ORACLE",
    show_envvar=True,
    help="Segmentation oracle.",
)
@oracle_checkpoint_option("Weights for --oracle sam / fastsam (a file you provide).")
@click.option(
    "--oracle-points",
    type=click.IntRange(1, 64),
    default=16,
    envvar="CLIP_AUDIT_ORACLE_POINTS",
    show_envvar=True,
    help="--oracle sam: prompt points per image side.",
)
@click.option(
    "--reference",
    type=existing_file,
    default=None,
    envvar="CLIP_AUDIT_REFERENCE",
    show_envvar=True,
    help="A clean model you trust (same --arch) to label the oracle's objects.",
)
@engine_option
@engine_dir_option
@precision_option(
    "Image-tower precision of the bulk scoring (stage 0, the oracle's crops and ablations) for "
    "--engine onnx / tensorrt: int8 (ONNX Runtime, CPU) and fp16 (GPU) are used only if they agree "
    "with PyTorch fp32 on >= 99 % of a sample of DATA (else exit 3); auto: the fastest of them that "
    "passes that check, else fp32. The steps that decide the report always run in fp32.",
    auto=True,
    default="auto",
)
@out_option("Write report.json, trigger.png, victims.csv and compact/ here.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "markdown", "html", "sarif"]),
    default="table",
    envvar="CLIP_AUDIT_FORMAT",
    show_envvar=True,
    help="table: summary on stderr; json/markdown/sarif: on stdout; html: DIR/report.html (needs --out).",
)
@click.option(
    "--fail-on",
    type=click.Choice(["low", "medium", "high"]),
    default="low",
    envvar="CLIP_AUDIT_FAIL_ON",
    show_envvar=True,
    help="Exit 1 when a backdoor of at least this severity is found.",
)
@click.option(
    "--per-class",
    type=click.IntRange(1, 10_000),
    default=32,
    envvar="CLIP_AUDIT_PER_CLASS",
    show_envvar=True,
    help="Images per predicted class the oracle checks first.",
)
@click.option(
    "--retry-failed",
    is_flag=True,
    envvar="CLIP_AUDIT_RETRY_FAILED",
    show_envvar=True,
    help="On a resumed scan, check again the images that failed last time (default: keep their failure).",
)
@click.option(
    "--inversion",
    type=click.Choice(["auto", "always", "never"]),
    default="auto",
    envvar="CLIP_AUDIT_INVERSION",
    show_envvar=True,
    help="Model-level trigger search on clean images: auto runs it when the data pass confirms nothing.",
)
@click.option(
    "--inversion-budget",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    envvar="CLIP_AUDIT_INVERSION_BUDGET",
    show_envvar=True,
    help="Seconds the model-level search may take (default: as long as the data pass took).",
)
@click.option(
    "--inversion-data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    envvar="CLIP_AUDIT_INVERSION_DATA",
    show_envvar=True,
    help="Clean images for the model-level search (default: DATA's images that are not victims).",
)
@click.option(
    "--executor",
    "executor_name",
    type=click.Choice(["local", "ray"]),
    default="local",
    envvar="CLIP_AUDIT_EXECUTOR",
    show_envvar=True,
    help="Where stage 0 and the oracle checks run: this process, or actors of a Ray cluster "
    "(needs clip-audit[ray]; the same report either way).",
)
@click.option(
    "--ray-address",
    default=None,
    envvar=["CLIP_AUDIT_RAY_ADDRESS", "RAY_ADDRESS"],
    show_envvar=True,
    help="--executor ray: the cluster to join (HOST:PORT or 'auto'); default: a new local one.",
)
@click.option(
    "--ray-actors",
    type=click.IntRange(1, 100_000),
    default=None,
    envvar="CLIP_AUDIT_RAY_ACTORS",
    show_envvar=True,
    help="--executor ray: how many actors (each with its own engine session); default: one per CPU.",
)
@batch_size_option
@seed_option
def scan_command(
    model: Path,
    data: Path,
    arch: str | None,
    classes: Path | None,
    oracle: str,
    oracle_checkpoint: Path | None,
    oracle_points: int,
    reference: Path | None,
    engine: str,
    engine_dir: Path | None,
    precision: str,
    out: Path | None,
    fmt: str,
    fail_on: str,
    per_class: int,
    retry_failed: bool,
    inversion: str,
    inversion_budget: float | None,
    inversion_data: Path | None,
    executor_name: str,
    ray_address: str | None,
    ray_actors: int | None,
    batch_size: int,
    seed: int,
) -> int:
    """Audit MODEL on DATA: exit 1 if a backdoor is found (see --fail-on), 5 if the scan is
    incomplete (some images could not be checked; the report lists them), else 0."""
    from auditor.data import first_image, open_dataset, open_image_folder
    from auditor.models import load_model, sha256_file
    from auditor.oracle import make_oracle
    from auditor.report import FORMATS
    from auditor.runtime import evidence_runner, make_runners, resolve_engine
    from auditor.scan import ScanConfig, scan
    from auditor.scan.cache import open_scan_cache

    if fmt == "html" and out is None:
        raise click.UsageError("--format html writes DIR/report.html: pass --out DIR")
    if executor_name == "ray":
        require_ray()
    dataset = open_dataset(data, classes)
    clean_images = open_image_folder(inversion_data, dataset.classes) if inversion_data else None
    loaded = load_model(model, arch)
    reference_model = load_model(reference, arch) if reference else None
    runtime = resolve_engine(engine)
    probe = first_image(dataset) if oracle != "classic" and runtime != "torch" else None
    the_oracle = make_oracle(oracle, oracle_checkpoint, oracle_points, runtime, engine_dir, probe)
    config = ScanConfig(per_class=per_class, seed=seed, batch_size=batch_size)
    if precision not in ("fp32", "auto") and runtime == "torch":
        raise click.UsageError(f"--precision {precision} needs --engine onnx or tensorrt")
    runners = make_runners(loaded, dataset, engine, engine_dir, precision, notify=state.info)
    show_provider(runners[0])
    evidence = evidence_runner(loaded, dataset, runners[0], engine, engine_dir)
    cache_settings = {
        "oracle": [oracle, oracle_points, sha256_file(oracle_checkpoint) if oracle_checkpoint else None],
        "reference": reference_model.sha256 if reference_model else None,
        "engine": [runtime, precision],
    }
    with contextlib.ExitStack() as stack:
        cache = None
        if out is not None:
            cache = open_scan_cache(out, loaded=loaded, dataset=dataset, config=config, **cache_settings)
            if any(cache.folder.glob("*.npz")):
                state.info(f"resuming: {cache.images_scored()} image scorings found in {cache.folder}")
        executor = None
        if executor_name == "ray":
            from auditor.scan.ray_executor import RayExecutor
            from auditor.scan.worker import WorkerSetup

            if cache is None:  # the workers' results travel through a cache: a temporary one
                scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="clip-audit-")))
                cache = open_scan_cache(
                    scratch, loaded=loaded, dataset=dataset, config=config, **cache_settings
                )
            setup = WorkerSetup(
                model, arch, dataset, config, runtime, runners[0].precision, engine_dir,
                oracle, oracle_checkpoint, oracle_points, reference,
            )  # fmt: skip
            on_gpu = any(name in runners[0].provider.lower() for name in ("cuda", "tensorrt"))
            executor = RayExecutor(setup, ray_actors, ray_address, 1 if on_gpu else 0, notify=state.info)
            state.info(f"--executor ray: {executor.actors} actors")
        with state.stage_progress() as tick:
            result = scan(
                loaded,
                dataset,
                the_oracle,
                config,
                progress=tick,
                reference=reference_model,
                runners=runners,
                cache=cache,
                retry_failed=retry_failed,
                evidence=evidence,
                inversion=inversion,
                inversion_budget=inversion_budget,
                inversion_data=clean_images,
                executor=executor,
            )
    report = result.report
    if report.incomplete:
        state.warn(f"incomplete scan: {failure_summary(report)}")
    if out is not None:
        from auditor.scan.writers import write_outputs

        write_outputs(result, out, fmt, dataset)
        state.info(f"wrote {out}/report.json" + (f" and {out}/report.html" if fmt == "html" else ""))
    if fmt == "table":
        state.console.print(summary_table(report))
    elif fmt != "html":
        click.echo(FORMATS[fmt](report), nl=False)
    return exit_code_for(report, fail_on)


def require_ray() -> None:
    """Exit 3 with the install line when the `ray` extra is missing (before any slow work)."""
    import importlib.util

    from auditor.errors import missing_extra

    if importlib.util.find_spec("ray") is None:
        raise missing_extra("ray", "ray")


def exit_code_for(report: Report, fail_on: str) -> int:
    """1 when a backdoor of at least `fail_on` severity was found, else 5 if incomplete, else 0."""
    found = report.verdict == "backdoor" and SEVERITIES.index(report.severity) >= SEVERITIES.index(fail_on)
    if found:
        return EXIT_FINDINGS
    return EXIT_INCOMPLETE if report.incomplete else 0


def summary_table(report: Report) -> Table:
    table = Table(
        title=f"clip-audit scan: [bold]{report.verdict}[/bold] (severity {report.severity})",
        show_header=False,
    )
    table.add_column(style="bold")
    table.add_column()
    rate = report.trigger.transplant_success_rate
    rows = [
        ("target labels", ", ".join(report.target_labels) or "—"),
        ("victim labels", ", ".join(report.victim_labels) or "—"),
        (
            "trigger",
            f"{report.trigger.kind}, transplant success {rate:.2f}"
            if report.trigger.kind and rate is not None
            else report.trigger.kind or "—",
        ),
        ("victim samples", str(len(report.victims))),
        ("evidence", report.trigger.evidence),
        (
            "cost",
            f"{report.cost.images_scored} images scored, oracle on {report.cost.oracle_images} of "
            f"{report.data.images}; " + ", ".join(f"{k} {v:.1f}s" for k, v in report.cost.seconds.items()),
        ),
    ]
    if report.data.skipped:
        rows.append(("skipped files", str(len(report.data.skipped))))
    if report.incomplete:
        rows.append(("incomplete", failure_summary(report)))
    for name, value in rows:
        table.add_row(name, value)
    return table
