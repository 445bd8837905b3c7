"""One image's failure does not end a scan: it is recorded, the rest is judged against ground truth.

An oracle that raises on one planted poisoned image stands in for any unexpected per-image bug.
The scan must still write its report, list that image under `failures` (once, though later
oracle passes would pick it again), find the backdoor from the other poisoned images (and still
name the failed one, by matching the trigger), keep the failure on a resumed scan, and check the
image again only with `--retry-failed`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from auditor.cli import run
from auditor.oracle.classic import ClassicOracle
from auditor.zoo.build import CONFIG_PATH, checkpoint_path, write_scan_data
from tests.helpers import box_iou


class FailsOnOneImage(ClassicOracle):
    """The classic oracle, except that it raises on the first of `poisoned` images it is shown."""

    def __init__(self, poisoned: dict[str, np.ndarray], fail_on: str | None = None) -> None:
        super().__init__()
        self.poisoned = poisoned
        self.fail_on = fail_on  # None: pick the first poisoned image shown
        self.shown: list[str] = []

    def segments(self, image):
        path = next((p for p, pixels in self.poisoned.items() if np.array_equal(pixels, image)), None)
        if path is not None:
            self.shown.append(path)
            if self.fail_on is None:
                self.fail_on = path
            if path == self.fail_on:
                raise RuntimeError(f"injected failure on {path}")
        return super().segments(image)


def _pixels(root: Path, truth: dict) -> dict[str, np.ndarray]:
    from PIL import Image

    return {p["path"]: np.asarray(Image.open(root / p["path"]).convert("RGB")) for p in truth["poisoned"]}


def _scan(
    data: Path, out: Path, oracle, monkeypatch, *extra: str, model: str = "patch-random"
) -> tuple[int, dict]:
    monkeypatch.setattr("auditor.oracle.make_oracle", lambda *args, **kwargs: oracle)
    argv = ["scan", str(checkpoint_path(model)), str(data), "--arch", str(CONFIG_PATH), "--out", str(out)]
    code = run([*argv, "--format", "json", *extra])
    return code, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def poisoned_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures") / "scan"
    truth = write_scan_data("patch-random", root, per_class=40)
    return root, truth, _pixels(root, truth)


def test_a_failing_image_is_recorded_and_the_findings_still_match_ground_truth(
    poisoned_data, tmp_path, monkeypatch
):
    root, truth, pixels = poisoned_data
    oracle = FailsOnOneImage(pixels)
    code, report = _scan(root, tmp_path / "out", oracle, monkeypatch)
    failed = oracle.fail_on
    assert failed is not None, "the oracle was never shown a poisoned image"
    assert code == 1, "a confirmed backdoor is still a finding"
    assert report["failures"] == [
        {
            "path": failed,
            "stage": "oracle",
            "error": "RuntimeError",
            "message": f"injected failure on {failed}",
        }
    ]
    assert report["target_labels"] == [truth["target"]]
    planted = {p["path"]: p["box"] for p in truth["poisoned"]}
    found = {v["path"]: v["trigger_box"] for v in report["victims"]}
    # The oracle's segments never judged the failed image, but victims are found by matching the
    # confirmed trigger (Algorithm 2 and the appearance test), which needs no segments: a planted
    # pair is still named.
    assert failed in found
    hits = set(planted) & set(found)
    assert len(hits) / len(found) >= 0.9 and len(hits) / len(planted) >= 0.9
    assert np.median([box_iou(planted[p], found[p]) for p in hits]) >= 0.5

    # Resumed: the failure is kept from the cache, the image is not checked again.
    again = FailsOnOneImage(pixels, fail_on=failed)
    code_again, report_again = _scan(root, tmp_path / "out", again, monkeypatch)
    assert again.shown == [] and code_again == 1
    assert report_again["failures"] == report["failures"]
    assert report_again["victims"] == report["victims"]

    # --retry-failed with a healthy oracle: the image is checked, and the report is the one a
    # scan that never failed gives.
    healthy = FailsOnOneImage(pixels, fail_on="none of them")
    code_retry, report_retry = _scan(root, tmp_path / "out", healthy, monkeypatch, "--retry-failed")
    assert failed in healthy.shown and len(healthy.shown) < len(oracle.shown)  # its chunk only
    never_failed = FailsOnOneImage(pixels, fail_on="none of them")
    code_fresh, report_fresh = _scan(root, tmp_path / "fresh", never_failed, monkeypatch)
    assert code_retry == code_fresh == 1 and report_retry["failures"] == []
    assert {k: v for k, v in report_retry.items() if k != "cost"} == {
        k: v for k, v in report_fresh.items() if k != "cost"
    }


def test_an_incomplete_clean_scan_exits_5_not_0(tmp_path, monkeypatch):
    root = tmp_path / "scan"
    write_scan_data("clean", root, per_class=8)
    first = sorted(root.glob("*/*.png"))[0]
    from PIL import Image

    oracle = FailsOnOneImage({str(first.relative_to(root)): np.asarray(Image.open(first).convert("RGB"))})
    code, report = _scan(root, tmp_path / "out", oracle, monkeypatch, model="clean")
    assert report["verdict"] == "clean"
    assert [f["path"] for f in report["failures"]] == [oracle.fail_on]
    assert code == 5
