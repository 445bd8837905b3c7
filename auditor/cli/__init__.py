"""The `clip-audit` command line: a thin layer over the library.

`main()` owns the exit codes (DESIGN §2): 0 nothing found at or above --fail-on, 1 backdoor
found, 2 usage or input error, 3 environment error, 4 internal error, 5 scan incomplete (report
written, some images could not be checked), 130 interrupted.
Click's own errors (exit 1 by default) are mapped to 2, so 1 only ever means findings.
"""

from __future__ import annotations

import os
import sys

import click

from auditor import __version__
from auditor.cli.console import state

# The tool never touches the network (DESIGN §2); set before open_clip can be imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_ENVIRONMENT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, "--version", prog_name="clip-audit")
@click.option(
    "-v",
    "--verbose",
    count=True,
    envvar="CLIP_AUDIT_VERBOSE",
    show_envvar=True,
    help="More detail on stderr; -vv shows tracebacks of internal errors.",
)
@click.option(
    "-q", "--quiet", is_flag=True, envvar="CLIP_AUDIT_QUIET", show_envvar=True, help="Only errors on stderr."
)
def cli(verbose: int, quiet: bool) -> None:
    """Find, show and repair backdoors in CLIP checkpoints."""
    state.verbosity = -1 if quiet else verbose


def _register() -> None:
    from auditor.cli.bench import bench_command
    from auditor.cli.demo import demo
    from auditor.cli.eval import eval_command
    from auditor.cli.export import export_command
    from auditor.cli.repair import repair_command
    from auditor.cli.scan import scan_command

    cli.add_command(scan_command)
    cli.add_command(eval_command)
    cli.add_command(repair_command)
    cli.add_command(export_command)
    cli.add_command(bench_command)
    cli.add_command(demo)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI and map every outcome to a documented exit code."""
    sys.exit(run(argv))


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (never raises)."""
    from auditor.errors import AuditError
    from engines.errors import EngineError

    try:
        result = cli.main(args=argv, prog_name="clip-audit", standalone_mode=False)
        return result if isinstance(result, int) else EXIT_OK
    except click.exceptions.Exit as exc:  # --help, --version
        return EXIT_OK if exc.exit_code == 0 else EXIT_USAGE
    except click.exceptions.Abort:
        state.error("interrupted")
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        exc.show(file=sys.stderr)
        return EXIT_USAGE
    except AuditError as exc:
        state.error(str(exc), exc.hint)
        return exc.exit_code
    except EngineError as exc:
        state.error(str(exc), exc.hint)
        return EXIT_ENVIRONMENT
    except KeyboardInterrupt:
        state.error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a bare traceback
        state.internal_error(exc)
        return EXIT_INTERNAL
