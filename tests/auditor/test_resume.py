"""Resumable scans: a scan SIGKILLed part-way and rerun scores only what is missing and writes the
report an uninterrupted scan writes; changed data invalidates the cache instead of mixing in.

The cached work is counted from the cache files themselves (each records the image scorings it
stands for), so "only what is missing" is checked as an equation: rerun + cached = uninterrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from auditor.cli import run
from auditor.scan.cache import CACHE_DIR
from auditor.zoo.build import CONFIG_PATH, checkpoint_path

MODEL = str(checkpoint_path("patch-random"))


def _args(data: Path, out: Path) -> list[str]:
    return ["scan", MODEL, str(data), "--arch", str(CONFIG_PATH), "--engine", "torch", "--out", str(out)]


def _scan(data: Path, out: Path) -> dict:
    assert run(["-q", *_args(data, out), "--format", "json"]) == 1
    return json.loads((out / "report.json").read_text())


def _without_cost(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "cost"}


def _cached_scorings(out: Path) -> int:
    total = 0
    for path in (out / CACHE_DIR).glob("*.npz"):
        with np.load(path, allow_pickle=False) as archive:
            total += int(archive["images_scored"])
    return total


@pytest.fixture(scope="module")
def uninterrupted(patch_random_scan, tmp_path_factory) -> dict:
    data, _ = patch_random_scan
    return _scan(data, tmp_path_factory.mktemp("full") / "out")


def test_killed_scan_resumes_with_only_the_missing_work(patch_random_scan, uninterrupted, tmp_path):
    data, truth = patch_random_scan
    out = tmp_path / "out"
    command = [sys.executable, "-c", "from auditor.cli import main; main()", "-q", *_args(data, out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    try:  # kill once stage 0 is cached and a few chunks of oracle checks are done
        deadline = time.monotonic() + 240
        while len(list((out / CACHE_DIR).glob("checks-*.npz"))) < 3:
            assert process.poll() is None, "the scan finished before it could be killed"
            assert time.monotonic() < deadline, "the scan cached nothing in time"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        process.kill()
    assert not (out / "report.json").exists()
    cached = _cached_scorings(out)
    assert cached > 0

    resumed = _scan(data, out)

    assert resumed["cost"]["images_scored"] + cached == uninterrupted["cost"]["images_scored"]
    assert _without_cost(resumed) == _without_cost(uninterrupted)
    assert resumed["cost"]["oracle_images"] == uninterrupted["cost"]["oracle_images"]
    assert resumed["target_labels"] == [truth["target"]]


def test_changed_data_invalidates_the_cache(patch_random_scan, uninterrupted, tmp_path):
    data, _ = patch_random_scan
    changed = tmp_path / "data"
    shutil.copytree(data, changed)
    first, second = sorted(changed.glob("dog/*.png"))[:2]
    shutil.copyfile(second, first)  # one image's bytes differ, nothing else
    out = tmp_path / "out"
    _scan(data, out)  # a cache for the original data
    fresh = _scan(changed, tmp_path / "fresh")

    rerun = _scan(changed, out)

    assert rerun["cost"]["images_scored"] == fresh["cost"]["images_scored"]
    assert _without_cost(rerun) == _without_cost(fresh)
    key = json.loads((out / CACHE_DIR / "key.json").read_text())
    assert key == json.loads((tmp_path / "fresh" / CACHE_DIR / "key.json").read_text())


def test_a_damaged_cache_entry_is_recomputed(patch_random_scan, uninterrupted, tmp_path):
    data, _ = patch_random_scan
    out = tmp_path / "out"
    _scan(data, out)
    victim = sorted((out / CACHE_DIR).glob("scores-*.npz"))[0]
    with np.load(victim, allow_pickle=False) as archive:
        batch = int(archive["images_scored"])
    victim.write_bytes(victim.read_bytes()[:100])  # torn by something outside the tool

    rerun = _scan(data, out)

    assert _without_cost(rerun) == _without_cost(uninterrupted)
    confirmation = uninterrupted["cost"]["images_scored"] - _cached_scorings(out)  # never cached
    assert rerun["cost"]["images_scored"] == confirmation + batch
