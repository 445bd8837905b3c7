"""`--executor ray`: a scan's bulk work as Ray Data stages, on a local or remote Ray cluster.

Each call of `RayExecutor.fill` is one Ray Data pipeline:

    from_items(units) -> map_batches(_UnitWorker actors, one unit per call) -> rows back to the driver

An actor opens the model, its engine session and the oracle once (`auditor.scan.worker`), then
computes units. The driver writes each result into the scan cache as it arrives and feeds the
progress bar, so a driver killed mid-scan resumes from the cache like a local scan, and the
driver itself runs the cheap stages that decide the report. Actors are restartable and their
calls retried: a killed actor's unit runs again on a fresh one, with the same result, since a
unit's result depends on nothing but the unit.

The files a worker opens (model, data, engine cache, oracle weights) must be at the same paths
on every node: the same machine, or a shared file system.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from auditor.errors import EnvironmentProblem, missing_extra
from auditor.scan.executor import Unit
from auditor.scan.worker import WorkerSetup, compute_unit, open_worker

if TYPE_CHECKING:
    from auditor.scan.cache import ScanCache

# The share of a CPU each actor reserves. Below 1 so that Ray Data's own small tasks (splitting
# the item list into blocks) still find a free slot on a fully used node; each actor still runs
# its engine on one thread (Ray sets OMP_NUM_THREADS from the reservation, rounded up).
ACTOR_CPUS = 0.9


def connect(address: str | None = None) -> int:
    """Join the Ray cluster at `address` (None: start a local one on this machine's CPUs).

    Returns the cluster's CPU count. Exit 3 without the `ray` extra, or if no cluster answers.
    """
    try:
        import ray
    except ImportError as exc:
        raise missing_extra("ray", "ray") from exc
    if not ray.is_initialized():
        _quiet_ray()  # before init: its own set-up warnings go to the same loggers
        # Ray's C++ core logs a line per actor pool whose constructor arguments sit in the object
        # store (Ray Data always puts them there; the driver, their owner, outlives the pool).
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        try:
            with _stderr_silenced():  # the core's start-up lines (log level, token auth) are noise here
                if address:
                    ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
                else:
                    ray.init(
                        num_cpus=os.cpu_count() or 1,
                        include_dashboard=False,
                        log_to_driver=False,
                        logging_level=logging.ERROR,
                    )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise EnvironmentProblem(f"cannot join the Ray cluster at {address or 'local'}: {exc}") from exc
    return int(ray.cluster_resources().get("CPU", 1))


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null for the duration (C++ code writes there directly)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _quiet_ray() -> None:
    """Ray Data's own progress bars and per-dataset log lines would interleave with the Rich bar."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


class RayExecutor:
    """Computes units on `actors` Ray actors (default: one per CPU of the cluster).

    `gpus`: GPUs each actor reserves (1 for an engine on a GPU: ONNX Runtime CUDA or TensorRT).
    """

    def __init__(
        self,
        setup: WorkerSetup,
        actors: int | None = None,
        address: str | None = None,
        gpus: float = 0,
        notify: Callable[[str], None] | None = None,
    ):

        cpus = connect(address)
        self.actors = max(1, actors or int(cpus / ACTOR_CPUS))
        self.gpus = gpus
        self.setup = setup.without_skips()
        self.notify = notify or (lambda line: None)

    def fill(self, units: Sequence[Unit], cache: ScanCache, advance: Callable[[int], None]) -> int:
        if not units:
            return 0
        import ray.data

        by_name = {unit.name: unit for unit in units}
        items = ray.data.from_items(
            [{"unit": unit.to_bytes()} for unit in units], override_num_blocks=len(units)
        )
        # Ray Data's actors are restartable and their calls retried by default: a dead actor is
        # replaced and the unit it held runs again.
        results = items.map_batches(
            _UnitWorker,
            fn_constructor_args=(self.setup,),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(self.actors, len(units))),
            num_cpus=ACTOR_CPUS,
            num_gpus=self.gpus or None,
        )
        scored, started, arrivals = 0, time.perf_counter(), []
        try:
            for row in results.iter_rows():
                name = str(row["name"])
                cache.put(name, bytes(row["content"]))
                scored += int(row["images_scored"])
                advance(len(by_name[name].indices))
                arrivals.append((time.perf_counter() - started, len(by_name[name].indices)))
        except Exception as exc:  # a worker's own error arrives wrapped: raise what it raised
            raise _cause(exc) from None
        self.notify(_timing_line(units[0].kind, len(units), min(self.actors, len(units)), arrivals))
        return scored


class _UnitWorker:
    """One Ray actor: opens the scan's context once, then computes one unit per call."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.ctx = open_worker(setup)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names, contents, scored = [], [], []
        for packed in batch["unit"]:
            unit = Unit.from_bytes(bytes(packed))
            content, images = compute_unit(self.ctx, unit)
            names.append(unit.name)
            contents.append(content)
            scored.append(images)
        return {
            "name": np.array(names),
            "content": np.array(contents, dtype=object),
            "images_scored": np.array(scored, np.int64),
        }


def _timing_line(kind: str, units: int, actors: int, arrivals: list[tuple[float, int]]) -> str:
    """What a stage cost on Ray: start-up (until the first result) apart from the steady rate."""
    first = arrivals[0][0]
    line = f"ray: {units} {kind} units on {actors} actors, first result after {first:.1f} s"
    if len(arrivals) > 1 and arrivals[-1][0] > first:
        rate = sum(n for _, n in arrivals[1:]) / (arrivals[-1][0] - first)
        line += f", then {rate:.1f} images/s over {arrivals[-1][0] - first:.1f} s"
    return line


def _cause(exc: BaseException) -> BaseException:
    """The exception a Ray worker raised, unwrapped from Ray's task-error wrappers."""
    seen = exc
    while True:
        inner = getattr(seen, "cause", None) or seen.__cause__
        if inner is None or inner is seen:
            return seen
        seen = inner
