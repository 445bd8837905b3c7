"""`--executor ray`: the same scan on a local Ray cluster, with an actor killed mid-scan, and on a
two-node cluster on loopback, writes what the local scan writes, apart from `cost`.

Each scan runs the CLI in its own process, so that no Ray runtime outlives its test. The data is
the patch-random zoo model's generated folder: the local report's findings are checked against
the planted files first, so "the same report" is the same *correct* report.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from auditor.cli import run
from auditor.scan.cache import CACHE_DIR
from auditor.zoo.build import CONFIG_PATH, checkpoint_path

pytest.importorskip("ray", reason="the ray extra is not installed")

MODEL = str(checkpoint_path("patch-random"))
WORKER_TITLE = b"ray::MapWorker(MapBatches(_UnitWorker))"


def _scan(data: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-c", "from auditor.cli import main; main()", "-q", "scan", MODEL, str(data),
        "--arch", str(CONFIG_PATH), "--engine", "torch", "--out", str(out), "--format", "json", *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
    )


def _finish(process: subprocess.Popen[bytes], timeout: float = 600) -> None:
    _, err = process.communicate(timeout=timeout)
    assert process.returncode == 1, err.decode()[-2000:]


def _written(out: Path) -> dict[str, object]:
    """Every file the scan wrote (bytes; the report without `cost`), apart from its cache."""
    files: dict[str, object] = {}
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out)
        if path.is_file() and CACHE_DIR not in relative.parts:
            files[str(relative)] = path.read_bytes()
    report = json.loads(files.pop("report.json"))  # type: ignore[arg-type]
    files["report.json"] = {k: v for k, v in report.items() if k != "cost"}
    return files


@pytest.fixture(scope="module")
def local(patch_random_scan, tmp_path_factory) -> dict[str, object]:
    data, truth = patch_random_scan
    out = tmp_path_factory.mktemp("local") / "out"
    _finish(_scan(data, out))
    written = _written(out)
    report = written["report.json"]
    assert report["target_labels"] == [truth["target"]]  # type: ignore[index]
    planted = {p["path"] for p in truth["poisoned"]}
    assert report["victims"] and {v["path"] for v in report["victims"]} <= planted  # type: ignore[index]
    return written


def test_a_ray_scan_writes_what_a_local_scan_writes(patch_random_scan, local, tmp_path):
    data, _ = patch_random_scan
    out = tmp_path / "out"
    _finish(_scan(data, out, "--executor", "ray", "--ray-actors", "2"))
    assert _written(out) == local


def test_a_killed_ray_actor_changes_nothing(patch_random_scan, local, tmp_path):
    data, _ = patch_random_scan
    out = tmp_path / "out"
    process = _scan(data, out, "--executor", "ray", "--ray-actors", "2")
    killed: list[int] = []
    watcher = threading.Thread(target=_kill_one_worker_mid_oracle, args=(process, out, killed), daemon=True)
    watcher.start()
    _finish(process)
    watcher.join(timeout=30)
    assert killed, "no Ray actor was running while the oracle checks were"
    assert _written(out) == local


def _kill_one_worker_mid_oracle(process: subprocess.Popen[bytes], out: Path, killed: list[int]) -> None:
    """SIGKILL one unit worker once the first oracle chunk is cached (the sample has 15 chunks)."""
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if any((out / CACHE_DIR).glob("checks-*.npz")):
            workers = _worker_pids()
            if workers:
                os.kill(workers[0], signal.SIGKILL)
                killed.append(workers[0])
                return
        time.sleep(0.05)


def _worker_pids() -> list[int]:
    """Processes of this machine whose title is a scan's Ray Data unit worker."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(WORKER_TITLE):
                pids.append(int(entry.name))
        except OSError:
            continue
    return sorted(pids)


@pytest.fixture
def two_node_cluster():
    """A head and a second node on loopback, one CPU each (so two actors land one per node)."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"127.0.0.1:{port}"
    # Token authentication, as a real cluster would use: every node and the driver share one.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    try:
        head = [
            "--head",
            "--port",
            str(port),
            "--include-dashboard",
            "false",
            "--node-ip-address",
            "127.0.0.1",
        ]
        node = ["--address", address, "--node-ip-address", "127.0.0.1"]
        for role in (head, node):
            started = subprocess.run(
                [ray_cli, "start", *role, *common], capture_output=True, env=env, timeout=180
            )
            assert started.returncode == 0, started.stderr.decode()[-2000:]
        yield address, env
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_a_scan_on_a_two_node_cluster_writes_what_a_local_scan_writes(
    patch_random_scan, local, tmp_path, two_node_cluster
):
    data, _ = patch_random_scan
    address, env = two_node_cluster
    out = tmp_path / "out"
    _finish(_scan(data, out, "--executor", "ray", "--ray-address", address, env=env))
    assert _written(out) == local


def test_without_ray_the_executor_exits_3_with_the_install_line(
    patch_random_scan, tmp_path, monkeypatch, capsys
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    data, _ = patch_random_scan
    code = run(
        ["scan", MODEL, str(data), "--arch", str(CONFIG_PATH), "--executor", "ray", "--out", str(tmp_path)]
    )
    assert code == 3
    assert "pip install 'clip-audit[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()
