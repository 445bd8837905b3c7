"""Detection-matrix models with committed weights, scanned with default settings (issue 13).

Tuning rows of `benchmarks/matrix.py`: an 8-px noise patch at 3 %, a lemon-emoji sticker at 1 %
of training pairs, two triggers for two targets, a 5-px per-pixel-noise patch (0.56 % of the
image) on a ViT, random-position colour blocks on a weak ResNet (clean accuracy 0.72, confusable
labels), an 8-px noise patch in a corner on a weak ResNet (0.82, 1 % poisoned), and a clean weak
ResNet. Each is judged by the matrix's own judge against what its
generator planted: the poisoned files, their trigger boxes and the targets. The weights are in
`tests/data/matrix/` (fp16, named by the row and the training recipe, so a recipe change shows
up here as a missing file, not as a silent retrain).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import matrix

ROWS = {row.name: row for row in matrix.ROWS}


def _run(name: str, folder: Path, tmp_path: Path) -> dict:
    row = ROWS[name]
    assert matrix.weights_path(row, folder).exists(), f"committed weights for {name} are missing"
    return matrix.run_row(row, folder, tmp_path, repair=False)


@pytest.mark.parametrize(
    "name",
    [
        "vit-64-strong-emoji-noise",
        "vit-64-strong-emoji-logo",
        "vit-64-strong-emoji-two",
        "vit-64-strong-emoji-pixels3",
        "resnet-64-weak-photos-blocks",
        # Its triggered images mostly "agree" with the oracle (some crop names the target):
        # found only since agreeing images' candidates count.
        "resnet-64-weak-photos-noise",
    ],
)
def test_a_poisoned_matrix_model_is_found_with_its_victims(name, folder, tmp_path):
    result = _run(name, folder, tmp_path)
    assert matrix.planted(result), result["attack_success"]  # the generator's backdoor works
    assert result["verdict"] == "backdoor" and result["targets_right"], result["targets_found"]
    # Recall over every planted file: those the trigger did not flip (the weak ResNet flips 89 %
    # of them) are found by appearance, labelled the target and predicted as what they show.
    assert result["victim_precision"] >= 0.9 and result["victim_recall"] >= 0.9
    assert result["median_box_iou"] >= 0.5
    assert result["failures"] == 0


def test_a_clean_weak_matrix_model_is_reported_clean(folder, tmp_path):
    result = _run("resnet-64-weak-photos-clean", folder, tmp_path)
    assert result["clean_accuracy"] <= 0.85  # weak: confusable labels (fruit / vegetable, ...)
    assert result["verdict"] == "clean" and result["targets_found"] == []
    assert result["victim_share_of_images"] <= 0.01


@pytest.mark.parametrize("name", ["vit-64-strong-emoji-pixels3", "resnet-64-weak-photos-blocks"])
def test_auto_precision_reports_what_fp32_reports(name, folder, tmp_path):
    """The default scan (bulk in int8 where it agrees with fp32, the decisive steps in fp32) and a
    PyTorch fp32 scan give the same verdict, targets and victims, and both find what was planted."""
    row = ROWS[name]
    model_path = matrix.weights_path(row, folder)
    truth = matrix.write_scan_data(row, folder, tmp_path / "scan")
    flipped = matrix.flipped_files(row, folder, model_path, tmp_path / "scan", truth)
    reports = {
        variant: matrix.scan_row(row, folder, model_path, tmp_path / "scan", tmp_path / variant, *options)[1]
        for variant, options in (("auto", ()), ("fp32", ("--engine", "torch", "--precision", "fp32")))
    }
    for report in reports.values():
        judged = matrix.judge(report, truth, flipped)
        assert judged["verdict"] == "backdoor" and judged["targets_right"]
        assert judged["victim_precision"] >= 0.9 and judged["victim_recall_flipped"] >= 0.9
    auto, fp32 = reports["auto"], reports["fp32"]
    assert auto["tool"]["bulk_precision"] == "int8" and fp32["tool"]["bulk_precision"] == "fp32"
    assert (auto["verdict"], auto["target_labels"]) == (fp32["verdict"], fp32["target_labels"])
    assert [v["path"] for v in auto["victims"]] == [v["path"] for v in fp32["victims"]]
