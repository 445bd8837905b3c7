"""FastSAM on ONNX Runtime against ultralytics' own predictor, on a random-init FastSAM-s.

The network is YOLOv8-s segmentation with one class (FastSAM-s's architecture), built from
ultralytics' own config with no downloaded weights. Two changes make its outputs worth
comparing: its batch-norm statistics are measured on a few zoo scenes (a random YOLO's
activations otherwise shrink to ~1e-9 by the head, where every confidence ties and every mask
logit is rounding noise), and its class bias is set so that 10-20 masks per scene pass
ultralytics' 0.25 confidence and NMS, as on a real image.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from auditor.cli import run
from auditor.zoo.build import CONFIG_PATH, checkpoint_path
from auditor.zoo.scenes import balanced_labels, render_scenes
from tests.helpers import save_png

if importlib.util.find_spec("ultralytics") is None:
    pytest.skip("ultralytics is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def random_fastsam(tmp_path_factory):
    import torch
    import yaml

    from auditor.oracle.fastsam_engine import import_ultralytics, letterbox

    YOLO = import_ultralytics().YOLO  # not `import ultralytics`: it patches PIL for the whole process
    from ultralytics.nn.tasks import yaml_model_load

    folder = tmp_path_factory.mktemp("fastsam")
    config = yaml_model_load("yolov8s-seg.yaml") | {"nc": 1}
    (folder / "yolov8s-fastsam.yaml").write_text(yaml.safe_dump(config))  # "yolov8s": its scale
    torch.manual_seed(0)
    model = YOLO(str(folder / "yolov8s-fastsam.yaml"), task="segment")
    network = model.model
    scenes = [s.image for s in render_scenes(balanced_labels(1), seed=5, size=224)]
    pixels = torch.cat([torch.from_numpy(letterbox(image)[0]) for image in scenes])
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 1.0  # the statistics of this one batch
    network.train()
    with torch.no_grad():
        network(pixels)
        for branch in network.model[-1].cv3:
            branch[-1].bias.fill_(-2.0)
    network.eval()
    path = folder / "FastSAM-s.pt"
    model.save(str(path))
    return path


@pytest.fixture(scope="module")
def scenes():
    images = [s.image for s in render_scenes(balanced_labels(1, ["dog", "banana", "car"]), seed=3, size=224)]
    from PIL import Image

    wide = np.asarray(Image.fromarray(images[0]).resize((300, 200)))  # letterboxed with padding
    return [*images, wide]


def test_engine_matches_ultralytics_predictor(random_fastsam, scenes, tmp_path):
    from auditor.oracle.fastsam_engine import build_fastsam_engine, stored_parity

    files = build_fastsam_engine(random_fastsam, "5" * 64, tmp_path, scenes)
    parity = stored_parity(files)  # measured before the graph entered the cache
    assert parity.images == 4 and parity.ultralytics_masks >= 10  # something real to compare
    assert parity.engine_masks == parity.ultralytics_masks
    assert parity.mean_mask_iou >= 0.95 and parity.max_box_diff <= 1.0


def test_oracle_on_onnx_gives_ultralytics_segments(random_fastsam, scenes, tmp_path):
    from auditor.oracle.fastsam import FastSamOracle

    engine = FastSamOracle(random_fastsam, "onnx", tmp_path, scenes[0])
    reference = FastSamOracle(random_fastsam, "torch")
    assert engine.runtime == "onnx" and reference.runtime == "torch"
    for image in scenes:
        ours, theirs = engine.segments(image), reference.segments(image)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            assert (a.mask & b.mask).sum() >= 0.95 * (a.mask | b.mask).sum()


def test_importing_ultralytics_leaves_pil_alone(random_fastsam, tmp_path):
    from PIL import Image, UnidentifiedImageError

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(UnidentifiedImageError):  # not a pip install of a HEIF plugin
        Image.open(broken)


def test_scan_on_the_fastsam_engine_needs_ultralytics_only_to_export(random_fastsam, tmp_path, monkeypatch):
    data = tmp_path / "data"
    for i, scene in enumerate(render_scenes(balanced_labels(1, ["dog", "banana"]), seed=3, size=128)):
        save_png(data / scene.label / f"{i}.png", scene.image)
    base = ["scan", str(checkpoint_path("clean")), str(data), "--arch", str(CONFIG_PATH), "--format", "json"]
    base += ["--oracle", "fastsam", "--oracle-checkpoint", str(random_fastsam), "--engine-dir", str(tmp_path)]
    assert run([*base, "--out", str(tmp_path / "first")]) in (0, 1)  # exports (ultralytics), then scans
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # gone: the cached graph is all a scan needs
    assert run([*base, "--out", str(tmp_path / "again")]) in (0, 1)
    for out in ("first", "again"):
        report = json.loads((tmp_path / out / "report.json").read_text())
        assert report["tool"]["oracle"] == "fastsam on onnx"
        assert report["cost"]["oracle_images"] == 2 and not report["failures"]
