"""Oracles: the classic one isolates planted triggers; SAM and FastSAM are wired and guarded."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from auditor.cli import run
from auditor.errors import CheckpointError
from auditor.oracle.classic import ClassicOracle
from auditor.zoo.build import CONFIG_PATH, ZOO, checkpoint_path
from auditor.zoo.scenes import balanced_labels, render_scenes
from tests.helpers import box_iou, save_png


@pytest.mark.parametrize("name", ["patch-random", "patch-corner"])
def test_classic_oracle_isolates_planted_triggers(name):
    attack = ZOO[name].attack
    assert attack is not None
    oracle = ClassicOracle()
    hits = []
    for i, scene in enumerate(render_scenes(balanced_labels(3), seed=42)):
        image, box = attack.trigger.apply(scene.image, np.random.default_rng(i))
        hits.append(max(box_iou(s.box, box) for s in oracle.segments(image)) >= 0.5)
    assert np.mean(hits) >= 0.8


def test_sam_type_from_shapes():
    import torch

    from auditor.oracle.sam import sam_type

    for width, kind in ((768, "vit_b"), (1024, "vit_l"), (1280, "vit_h")):
        assert sam_type({"image_encoder.patch_embed.proj.weight": torch.zeros(width, 3, 16, 16)}) == kind
    with pytest.raises(CheckpointError, match="not a SAM checkpoint"):
        sam_type({"visual.conv1.weight": torch.zeros(64, 3, 8, 8)})


@pytest.fixture()
def tiny_scan_data(tmp_path):
    for i, scene in enumerate(render_scenes(balanced_labels(1, ["dog", "banana"]), seed=3)):
        save_png(tmp_path / "data" / scene.label / f"{i}.png", scene.image)
    return tmp_path / "data"


@pytest.mark.slow
def test_sam_oracle_runs_end_to_end_with_random_weights(tmp_path, tiny_scan_data):
    # SAM's ViT-B encoder sees 1024x1024 whatever the input: ~25 s per image on a 2-core CPU.
    pytest.importorskip("segment_anything")
    import torch
    from safetensors.torch import save_file
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"](checkpoint=None)
    save_file(
        {k: v.contiguous() for k, v in sam.state_dict().items()}, str(tmp_path / "sam_vit_b.safetensors")
    )
    del sam
    out = tmp_path / "out"
    code = run(
        [
            "scan",
            str(checkpoint_path("clean")),
            str(tiny_scan_data),
            "--arch",
            str(CONFIG_PATH),
            "--oracle",
            "sam",
            "--oracle-checkpoint",
            str(tmp_path / "sam_vit_b.safetensors"),
            "--per-class",
            "2",
            "--out",
            str(out),
            "--format",
            "json",
        ]
    )
    report = json.loads((out / "report.json").read_text())
    assert code in (0, 1)
    assert report["cost"]["oracle_images"] == 2
    assert report["tool"]["oracle"] == "sam on onnx"  # the default engine runs SAM's graphs too


def test_oracle_checkpoint_required_and_fastsam_absent(tmp_path, tiny_scan_data, capsys, monkeypatch):
    base = ["scan", str(checkpoint_path("clean")), str(tiny_scan_data), "--arch", str(CONFIG_PATH)]
    assert run([*base, "--oracle", "sam"]) == 2
    assert "--oracle-checkpoint" in capsys.readouterr().err
    weights = tmp_path / "FastSAM-s.pt"
    weights.write_bytes(b"not a weight file")
    fastsam = [
        *base,
        "--oracle",
        "fastsam",
        "--oracle-checkpoint",
        str(weights),
        "--engine-dir",
        str(tmp_path),
    ]
    if importlib.util.find_spec("ultralytics") is not None:  # a file ultralytics cannot load: exit 2
        assert run(fastsam) == 2
        assert "not a FastSAM weight file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # `import ultralytics` fails: exit 3
    assert run(fastsam) == 3
    assert "pip install ultralytics" in capsys.readouterr().err
