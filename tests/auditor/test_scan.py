"""`clip-audit scan` on the zoo, judged against the generator's ground truth.

Each scan runs through the CLI (exit code, --out files) on scan data written by
`write_scan_data`: poisoned files, their trigger boxes and the target come from the generator.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from auditor.cli import run
from auditor.report import Report, render_markdown, render_sarif
from auditor.zoo.build import CONFIG_PATH, checkpoint_path, write_scan_data
from tests.helpers import box_iou


def _scan(tmp: Path, name: str, per_class: int, *extra: str) -> tuple[int, dict, dict, Path]:
    truth = write_scan_data(name, tmp / "scan", per_class=per_class)
    out = tmp / "out"
    code = run(
        [
            "scan",
            str(checkpoint_path(name)),
            str(tmp / "scan"),
            "--arch",
            str(CONFIG_PATH),
            "--out",
            str(out),
            "--format",
            "json",
            *extra,
        ]
    )
    report = json.loads((out / "report.json").read_text())
    return code, report, truth, out


def _check_patch_findings(code: int, report: dict, truth: dict) -> None:
    assert code == 1
    assert report["verdict"] == "backdoor"
    assert report["target_labels"] == [truth["target"]]
    assert report["trigger"]["kind"] == "patch"
    assert report["trigger"]["transplant_success_rate"] >= 0.8
    planted = {p["path"]: p["box"] for p in truth["poisoned"]}
    found = {v["path"]: v["trigger_box"] for v in report["victims"]}
    hits = set(planted) & set(found)
    assert len(hits) / len(found) >= 0.9, "victim precision"
    assert len(hits) / len(planted) >= 0.9, "victim recall"
    assert np.median([box_iou(planted[p], found[p]) for p in hits]) >= 0.5


@pytest.fixture(scope="module")
def patch_random_scan(tmp_path_factory):
    # 120 per class: large enough for the efficiency bar (oracle on <= 40 % of the images).
    return _scan(tmp_path_factory.mktemp("patch-random"), "patch-random", per_class=120)


def test_patch_random_position(patch_random_scan):
    code, report, truth, _ = patch_random_scan
    _check_patch_findings(code, report, truth)


def test_oracle_runs_on_at_most_40_percent(patch_random_scan):
    _, report, truth, _ = patch_random_scan
    assert report["data"]["images"] == truth["images"] == 1440
    assert report["cost"]["oracle_images"] <= 0.4 * truth["images"]
    assert set(report["cost"]["seconds"]) == {"scoring", "oracle", "confirmation"}


def test_outputs_and_formats(patch_random_scan):
    _, report_dict, truth, out = patch_random_scan
    report = Report.from_dict(report_dict)
    assert report.to_dict() == report_dict
    assert (out / "trigger.png").stat().st_size > 0
    with (out / "victims.csv").open() as fh:
        assert {row["path"] for row in csv.DictReader(fh)} == {v.path for v in report.victims}
    with (out / "compact" / "pairs.csv").open() as fh:
        pairs = list(csv.DictReader(fh))
    assert report.compact_set is not None and len(pairs) == report.compact_set.size
    assert all((out / "compact" / p["image"]).is_file() for p in pairs)
    assert any(p["caption"] == f"a photo of a {truth['poisoned'][0]['true_label']}." for p in pairs)
    sarif = json.loads(render_sarif(report))
    assert sarif["version"] == "2.1.0"
    assert len(sarif["runs"][0]["results"]) == 1 + len(report.victims)
    assert "banana" in render_markdown(report)


def test_patch_fixed_corner(tmp_path):
    code, report, truth, _ = _scan(tmp_path, "patch-corner", 40, "--format", "html")
    _check_patch_findings(code, report, truth)
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("data:image/png;base64") >= 1 + min(60, len(report["victims"]))


def test_clean_model_is_clean(tmp_path):
    code, report, truth, _ = _scan(tmp_path, "clean", per_class=40)
    assert code == 0
    assert report["verdict"] == "clean" and report["severity"] == "none"
    assert len(report["victims"]) <= 0.01 * truth["images"]


def test_blend_is_not_reported_clean(tmp_path):
    code, report, truth, _ = _scan(tmp_path, "blend", per_class=40)
    assert report["verdict"] != "clean"
    assert code == 1


def test_fail_on_threshold_controls_exit_code(patch_random_scan):
    from dataclasses import replace

    from auditor.cli.scan import exit_code_for

    report = Report.from_dict(patch_random_scan[1])
    medium = replace(report, severity="medium")
    assert [exit_code_for(medium, level) for level in ("low", "medium", "high")] == [1, 1, 0]
    assert exit_code_for(replace(report, verdict="clean", severity="none"), "low") == 0


def test_reference_model_labels_the_objects(tmp_path):
    # A clean model the user trusts labels the oracle's objects; the findings stay right.
    code, report, truth, _ = _scan(tmp_path, "patch-corner", 40, "--reference", str(checkpoint_path("clean")))
    _check_patch_findings(code, report, truth)
    by_path = {p["path"]: p["true_label"] for p in truth["poisoned"]}
    labeled = [v for v in report["victims"] if v["path"] in by_path]
    assert np.mean([v["oracle_label"] == by_path[v["path"]] for v in labeled]) >= 0.9


@pytest.fixture(scope="module")
def engine_reports(tmp_path_factory, engine_cache) -> tuple[dict, dict]:
    """The patch-corner folder scanned with --engine torch and with --engine onnx (default
    precision: int8 bulk where it passes the agreement check, fp32 evidence)."""
    tmp_path = tmp_path_factory.mktemp("engines")
    truth = write_scan_data("patch-corner", tmp_path / "scan", per_class=20)
    reports = {}
    for engine in ("torch", "onnx"):
        out = tmp_path / engine
        model = str(checkpoint_path("patch-corner"))
        arguments = ["scan", model, str(tmp_path / "scan"), "--arch", str(CONFIG_PATH), "--engine", engine]
        assert run([*arguments, "--out", str(out), "--format", "json"]) == 1
        reports[engine] = json.loads((out / "report.json").read_text())
    assert list(engine_cache.glob("*/manifest.json")), "the ONNX engines were cached"
    return reports, truth


def test_onnx_and_torch_engines_give_the_same_findings(engine_reports):
    reports, truth = engine_reports
    for key in ("verdict", "target_labels"):
        assert reports["onnx"][key] == reports["torch"][key]
    assert [v["path"] for v in reports["onnx"]["victims"]] == [v["path"] for v in reports["torch"]["victims"]]
    assert reports["onnx"]["target_labels"] == [truth["target"]]


def test_onnx_and_torch_engines_name_the_same_victim_labels(engine_reports):
    reports, _ = engine_reports
    assert reports["onnx"]["victim_labels"] == reports["torch"]["victim_labels"]
