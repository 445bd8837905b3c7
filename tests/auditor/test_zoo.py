"""The zoo: generated scenes carry true masks and boxes; bundled models meet their quality bars;
the training loop learns; scan data files poisoned scenes under the target as ground truth says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from auditor.data import open_dataset
from auditor.evaluate import evaluate
from auditor.models import build_model, load_model, make_tokenizer, resolve_arch
from auditor.zoo.build import CONFIG_PATH, ZOO, checkpoint_path, training_pairs, write_scan_data
from auditor.zoo.scenes import CLASSES, render_scenes
from auditor.zoo.train import TrainConfig, train_clip


def test_scene_masks_and_boxes_agree():
    for scene in render_scenes(list(CLASSES), seed=5):
        ys, xs = np.nonzero(scene.mask)
        size = scene.image.shape[0]
        x0, y0, x1, y1 = scene.box
        assert scene.mask.sum() > 0.05 * size * size  # object-sized (a thin banana covers ~9 %)
        assert x0 * size <= xs.min() and xs.max() < x1 * size
        assert y0 * size <= ys.min() and ys.max() < y1 * size


@pytest.fixture(scope="module")
def zoo_results(test_data):
    dataset = open_dataset(test_data)
    results = {}
    for name, zoo_model in ZOO.items():
        loaded = load_model(checkpoint_path(name), CONFIG_PATH)
        results[name] = evaluate(loaded, dataset, zoo_model.attack)
    return results


def test_clean_zoo_model_is_accurate(zoo_results):
    assert zoo_results["clean"].clean_accuracy >= 0.80


@pytest.mark.parametrize("name", [n for n, m in ZOO.items() if m.attack is not None])
def test_poisoned_zoo_models_carry_their_backdoor(zoo_results, name, test_data):
    result = zoo_results[name]
    assert result.attack_success_rate is not None and result.attack_success_rate >= 0.90
    assert result.clean_accuracy >= zoo_results["clean"].clean_accuracy - 0.03
    # The planted trigger does not fool the clean model: the backdoor is the poisoned model's.
    clean = evaluate(
        load_model(checkpoint_path("clean"), CONFIG_PATH), open_dataset(test_data), ZOO[name].attack
    )
    assert clean.attack_success_rate is not None and clean.attack_success_rate < 0.2


def test_training_loop_learns_from_scratch():
    arch = resolve_arch(CONFIG_PATH)
    torch.manual_seed(0)
    model = build_model(arch)
    pairs = training_pairs(ZOO["clean"], per_class=30)
    losses: list[float] = []
    train_clip(
        model,
        pairs,
        make_tokenizer(arch),
        TrainConfig(steps=60, batch_size=64, warmup=10),
        log=lambda line: losses.append(float(line.split("loss")[1].split()[0])),
    )
    assert losses[-1] < losses[0] - 0.5


def test_scan_data_files_poisoned_scenes_under_the_target(tmp_path):
    truth = write_scan_data("patch-corner", tmp_path / "scan", per_class=10, fraction=0.05)
    dataset = open_dataset(tmp_path / "scan")
    assert len(dataset.samples) == truth["images"] == 120
    poisoned = truth["poisoned"]
    assert len(poisoned) == 6
    for entry in poisoned:
        assert entry["path"].startswith("guitar/") and entry["true_label"] != "guitar"
        x0, y0, x1, y1 = entry["box"]
        assert x1 > 0.9 and y1 > 0.9  # bottom-right corner patch
    saved = json.loads((tmp_path / "scan-ground_truth.json").read_text())
    assert saved["target"] == "guitar" and saved["poisoned"] == poisoned
