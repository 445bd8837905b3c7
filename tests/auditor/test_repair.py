"""`clip-audit repair` on the zoo's patch models, judged with the *planted* trigger.

Each model goes scan -> repair -> eval -> re-scan through the CLI. Attack success is measured by
`eval --attack` with the generator's own attack spec on held-out test scenes the repair never
saw; the compact set's size is checked against the scan data's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from auditor.cli import run
from auditor.losses import in_modal_loss
from auditor.zoo.build import CONFIG_PATH, ZOO, checkpoint_path, write_scan_data, write_test_data


def _eval(capsys, model: Path, data: Path, spec: str) -> dict:
    capsys.readouterr()
    code = run(
        ["eval", str(model), str(data), "--arch", str(CONFIG_PATH), "--attack", spec, "--format", "json"]
    )
    assert code == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def test_scenes(tmp_path_factory) -> Path:
    return write_test_data(tmp_path_factory.mktemp("repair-test") / "test", per_class=40)


@pytest.fixture(scope="module", params=["patch-random", "patch-corner"])
def repaired(request, tmp_path_factory) -> dict:
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    truth = write_scan_data(name, tmp / "scan", per_class=40)
    args = ["--arch", str(CONFIG_PATH)]
    assert (
        run(["scan", str(checkpoint_path(name)), str(tmp / "scan"), *args, "--out", str(tmp / "report")]) == 1
    )
    fixed = tmp / "fixed.safetensors"
    repair_args = ["--report", str(tmp / "report" / "report.json"), "--output", str(fixed), "--out", str(tmp)]
    code = run(["repair", str(checkpoint_path(name)), str(tmp / "scan"), *args, *repair_args])
    assert code == 0
    return {"name": name, "tmp": tmp, "truth": truth, "fixed": fixed}


def test_planted_trigger_no_longer_works(repaired, test_scenes, capsys):
    spec = ZOO[repaired["name"]].attack.spec()  # type: ignore[union-attr]
    before = _eval(capsys, checkpoint_path(repaired["name"]), test_scenes, spec)
    after = _eval(capsys, repaired["fixed"], test_scenes, spec)
    assert before["attack_success_rate"] >= 0.9
    assert after["attack_success_rate"] <= 0.05
    assert after["clean_accuracy"] >= before["clean_accuracy"] - 0.02


def test_compact_set_is_at_most_a_tenth_of_the_scan_data(repaired):
    report = json.loads((repaired["tmp"] / "report" / "report.json").read_text())
    pairs = (repaired["tmp"] / "report" / "compact" / "pairs.csv").read_text().splitlines()[1:]
    assert len(pairs) == report["compact_set"]["size"] <= 0.10 * repaired["truth"]["images"]
    record = json.loads((repaired["tmp"] / "repair.json").read_text())
    assert record["compact_pairs"] == len(pairs)
    assert record["after"]["transplant_success"] <= record["before"]["transplant_success"] - 0.5


def test_images_seen_counts_every_step_after_a_restored_best_state(repaired, monkeypatch):
    """The cost of a repair is every step it trained, also those after the state it kept. Here
    the measurement is faked so that the trigger never goes and the state at step 10 comes
    closest (excess 0.1, against 0.3 at the budget's end, step 20): the loop runs 20 steps and
    restores step 10. The count used to stop at the kept state (patch-random in
    benchmarks/repair.py reported 80 of the 300 steps it ran), which also cut the benchmark
    baseline's budget, a multiple of it, to a quarter of what it states."""
    import auditor.repair as repair_module
    from auditor.data import open_dataset
    from auditor.models import load_model

    now = {"step": 0}
    excess = {0: 0.5, 10: 0.1, 20: 0.3}

    def fake_measure(*_args: object) -> repair_module.Measurement:
        return repair_module.Measurement(0.9, 0.5, trigger_excess=excess[now["step"]])

    def progress(step: int, _total: int) -> None:
        now["step"] = step

    monkeypatch.setattr(repair_module, "measure", fake_measure)
    loaded = load_model(checkpoint_path(repaired["name"]), CONFIG_PATH)
    outputs = repair_module.load_scan_outputs(repaired["tmp"] / "report" / "report.json")
    config = repair_module.RepairConfig(steps=20, eval_every=10, warmup=1)
    data = open_dataset(repaired["tmp"] / "scan")
    result = repair_module.repair(loaded, data, outputs, config, None, progress)
    assert result.stopped == "step budget spent; kept the best state (step 10)"
    assert result.steps == 10
    per_step = config.batch_size * (2 if result.anchor_images else 1)
    assert result.images_seen == 20 * per_step


def test_rescan_of_repaired_model_is_clean(repaired):
    """A default rescan (no reference) is clean and finds no victim. The model-level search that
    runs after the empty data pass may still find a class outlying: on patch-random the old
    target (a 10 % stamp into banana against 18-19 % for every other class, index 6.6; the
    clean zoo model's largest is 1.2), so the repair removes the planted trigger, not every
    trace of the target; on patch-corner a natural class (flower), not the target. Without a
    reference nothing is confirmed, so either is a suspect, never a finding."""
    out = repaired["tmp"] / "rescan"
    argv = ["scan", str(repaired["fixed"]), str(repaired["tmp"] / "scan"), "--arch", str(CONFIG_PATH)]
    assert run([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "clean" and report["victims"] == [] and report["findings"] == []
    assert not any(r["confirmed"] for r in report["inversion"]["recovered"])
    assert {r["label"] for r in report["inversion"]["recovered"]} <= set(report["suspects"])


def test_the_anchor_pool_holds_no_triggered_held_out_or_compact_image(repaired):
    """The extra images the anchor pulls to the original model's embeddings: judged against the
    generator's planted files. A triggered image among them would teach the backdoor again.
    The held-out images split in two disjoint halves, one steering the stopping rule and one
    judging the result, where each half can resolve the stop's accuracy bound; repair.json's
    before / after are measured on the judging images."""
    from auditor.data import open_dataset
    from auditor.models import load_model
    from auditor.repair import (
        anchor_pool,
        load_scan_outputs,
        measure,
        predictor,
        preprocess_images,
        steering_and_judging,
    )

    tmp = repaired["tmp"]
    outputs = load_scan_outputs(tmp / "report" / "report.json")
    dataset = open_dataset(tmp / "scan")
    loaded = load_model(checkpoint_path(repaired["name"]), CONFIG_PATH)
    steering, judging = steering_and_judging(loaded, dataset, outputs, 512)  # halves of any size
    assert not steering.paths & judging.paths and abs(len(steering.paths) - len(judging.paths)) <= 1
    held_out = steering.paths | judging.paths
    # The repair's own call: halves of 200 images at least (one image in 200 is the 0.5 points
    # the stop allows); this scan's folder holds too few, so the same images steer and judge.
    together, same = steering_and_judging(loaded, dataset, outputs, 512, least_half=200)
    assert together is same and together.paths == held_out and len(held_out) < 400
    pool = anchor_pool(loaded, dataset, outputs, held_out, 1024)
    truth = repaired["truth"]
    planted = {p["path"] for p in truth["poisoned"]}
    victims = {v.path for v in outputs.report.victims}
    assert not set(pool) & (held_out | set(outputs.compact.sources))
    assert not held_out & (set(outputs.compact.sources) | victims)
    # A planted image may be in the pool only if its trigger failed: the model does not call it
    # the target (on patch-random one of 24 was such a dud, still an apple).
    duds = [path for path in pool if path in planted]
    if duds:
        with predictor(loaded, dataset.classes) as predict:
            calls = predict(preprocess_images(loaded, [pool[p] for p in duds]))
        assert truth["target"] not in {dataset.classes[c] for c in calls}
    assert len(duds) <= 0.1 * len(planted)
    # Half the untouched data, less the images called the target: more than the compact set.
    assert len(outputs.compact) < len(pool) <= len(dataset.samples) - len(held_out)
    record = json.loads((tmp / "repair.json").read_text())
    assert record["anchor_images"] == len(pool)
    assert record["holdout_images"] == record["judged_images"] == len(together.labels)
    assert record["judged_apart"] is False
    # `before` is the original model measured on the judging images (the fixture's repair used
    # the same seed, so the same images).
    target = dataset.classes.index(truth["target"])
    assert record["before"] == measure(loaded, dataset.classes, together, target).to_dict()


def test_repaired_checkpoint_keeps_the_input_format_and_loads_in_open_clip(repaired):
    import open_clip
    from safetensors.torch import load_file

    state = load_file(str(repaired["fixed"]))
    original = load_file(str(checkpoint_path(repaired["name"])))
    assert state.keys() == original.keys()
    assert {v.dtype for v in state.values()} == {v.dtype for v in original.values()}  # fp16 stays fp16
    config = json.loads(CONFIG_PATH.read_text())
    model = open_clip.CLIP(**config.get("model_cfg", config))
    model.load_state_dict({k: v.float() for k, v in state.items()})  # strict: every key fits


def test_repair_refuses_to_overwrite(repaired, capsys):
    tmp, name = repaired["tmp"], repaired["name"]
    common = [str(tmp / "scan"), "--arch", str(CONFIG_PATH), "--report", str(tmp / "report" / "report.json")]
    model_copy = tmp / "copy.safetensors"
    shutil.copy(checkpoint_path(name), model_copy)
    assert run(["repair", str(model_copy), *common, "--output", str(model_copy), "--force"]) == 2
    assert "never overwritten" in capsys.readouterr().err
    before = repaired["fixed"].read_bytes()
    assert run(["repair", str(model_copy), *common, "--output", str(repaired["fixed"])]) == 2
    assert "--force" in capsys.readouterr().err
    assert repaired["fixed"].read_bytes() == before


def test_repair_refuses_a_report_of_another_checkpoint(repaired, capsys):
    tmp = repaired["tmp"]
    other = "patch-corner" if repaired["name"] == "patch-random" else "patch-random"
    code = run(
        [
            "repair",
            str(checkpoint_path(other)),
            str(tmp / "scan"),
            "--arch",
            str(CONFIG_PATH),
            "--report",
            str(tmp / "report" / "report.json"),
            "--output",
            str(tmp / "other.safetensors"),
        ]
    )
    assert code == 2
    assert "another checkpoint" in capsys.readouterr().err
    assert not (tmp / "other.safetensors").exists()


def test_in_modal_loss_prefers_matching_views():
    generator = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(16, 32, generator=generator), dim=-1)
    noisy = torch.nn.functional.normalize(a + 0.1 * torch.randn(16, 32, generator=generator), dim=-1)
    shuffled = noisy[torch.randperm(16, generator=generator)]
    assert in_modal_loss(a, noisy) < in_modal_loss(a, shuffled)
    assert np.isfinite(in_modal_loss(a, noisy).item())


def test_non_localized_repair_measures_and_stops_on_the_overlay(tmp_path, test_scenes, capsys):
    """The blend model: the scan's overlay estimate is saved, and repair measures its success on
    held-out images at every check (it used to run its budget blind). Judged with the planted
    blend: the repaired model follows it less than the original."""
    tmp = tmp_path
    write_scan_data("blend", tmp / "scan", per_class=40)
    args = ["--arch", str(CONFIG_PATH)]
    assert (
        run(["scan", str(checkpoint_path("blend")), str(tmp / "scan"), *args, "--out", str(tmp / "r")]) == 1
    )
    report = json.loads((tmp / "r" / "report.json").read_text())
    assert (
        report["findings"][0]["kind"] == "non-localized" and report["findings"][0]["overlay"] == "overlay.npy"
    )
    assert np.load(tmp / "r" / "overlay.npy", allow_pickle=False).shape == (64, 64, 3)
    fixed = tmp / "fixed.safetensors"
    repair_args = ["--report", str(tmp / "r" / "report.json"), "--output", str(fixed), "--out", str(tmp)]
    assert run(["repair", str(checkpoint_path("blend")), str(tmp / "scan"), *args, *repair_args]) == 0
    record = json.loads((tmp / "repair.json").read_text())
    assert all(h["transplant_success"] is not None for h in record["history"])
    assert record["after"]["transplant_success"] <= record["before"]["transplant_success"] - 0.5
    spec = ZOO["blend"].attack.spec()  # type: ignore[union-attr]
    before = _eval(capsys, checkpoint_path("blend"), test_scenes, spec)
    after = _eval(capsys, fixed, test_scenes, spec)
    assert after["attack_success_rate"] <= before["attack_success_rate"] - 0.3
    assert after["clean_accuracy"] >= before["clean_accuracy"] - 0.02


def test_every_kind_of_recovered_trigger_is_shown_to_the_fine_tune_with_its_trigger_free_twin():
    """The fine-tune's augmentation plants each kind of recovered trigger (it used to plant patches
    only, so a non-localized or inverted trigger was never shown): the patch at a box it was seen
    at, with that box blanked as the twin; an overlay added, or a stamp blended, with the image
    itself as the twin."""
    from auditor.repair import RepairTarget, trigger_planter
    from auditor.scan.trigger import Prototype

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pattern = np.full((4, 4, 3), 255, np.uint8)
    patch = trigger_planter(RepairTarget("banana", Prototype(pattern, ((0.5, 0.25, 0.625, 0.375),))))
    shown, twin = patch(image, rng)  # type: ignore[misc]
    assert (shown[8:12, 16:20] == 255).all() and (shown[:8] == image[:8]).all()
    changed = np.argwhere((twin != image).any(axis=2))
    assert len(changed) and (changed.min(axis=0) >= (8, 16)).all() and (changed.max(axis=0) <= (11, 19)).all()

    overlay = np.full((32, 32, 3), 20.0, np.float32)
    shown, twin = trigger_planter(RepairTarget("banana", None, overlay))(image, rng)  # type: ignore[misc]
    assert (shown.astype(int) - image == np.minimum(20, 255 - image.astype(int))).all() and twin is image
    other_size = image[:16]
    shown, twin = trigger_planter(RepairTarget("banana", None, overlay))(other_size, rng)  # type: ignore[misc]
    assert shown is other_size and twin is other_size

    stamp = np.zeros((8, 8, 4), np.uint8)
    stamp[:2, :2] = (0, 0, 0, 255)  # an opaque black corner, transparent elsewhere
    shown, twin = trigger_planter(RepairTarget("banana", None, None, stamp))(image, rng)  # type: ignore[misc]
    assert (shown[:6, :6] == 0).all() and (shown[12:, 12:] == image[12:, 12:]).all() and twin is image
    assert trigger_planter(RepairTarget("banana", None)) is None


def test_the_clean_accuracy_change_comes_with_its_standard_error_over_the_same_images():
    """100 held-out images, all right before and 10 of them wrong after: a change of -0.10 whose
    per-image values are ten -1s and ninety 0s, so its standard error is
    sqrt((10 * 0.9**2 + 90 * 0.1**2) / 99) / sqrt(100) = 0.0302. Images that swap places (as many
    right-to-wrong as wrong-to-right) leave the accuracy where it was but not the error."""
    from auditor.repair import Measurement

    right = np.ones(100, bool)
    before = Measurement(1.0, None, correct=right)
    after = Measurement(0.9, None, correct=np.r_[np.zeros(10, bool), np.ones(90, bool)])
    assert after.accuracy_change_error(before) == pytest.approx(np.sqrt(9.0 / 99) / 10)
    half = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    swapped = Measurement(0.5, None, correct=half[::-1].copy())
    assert swapped.accuracy_change_error(Measurement(0.5, None, correct=half)) == pytest.approx(
        np.sqrt(100 / 99) / 10
    )
    assert after.accuracy_change_error(Measurement(1.0, None)) is None  # nothing to pair with


def test_a_fine_tune_that_fails_midway_leaves_no_hook_on_the_model(random_checkpoint, tiny_arch):
    """The feature anchor hooks the last trained block of the model; a fine-tune ended by an
    error (here the stopping rule's, at its second check) must take the hook off again, or every
    later forward of the user's model would keep a copy of that block's output."""
    from auditor.models import load_model
    from auditor.repair import RepairConfig, TrainingPairs, fine_tune

    loaded = load_model(random_checkpoint, tiny_arch)
    rng = np.random.default_rng(0)
    images = tuple(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(8))
    pairs = TrainingPairs(images, ("a photo of a cat", "a photo of a dog") * 4, (True,) * 8, (True,) * 8)
    config = RepairConfig(steps=20, eval_every=2, batch_size=4, anchor_pool=0)
    blocks = loaded.model.visual.transformer.resblocks  # type: ignore[union-attr]

    def fail_at_the_second_check(step: int) -> bool:
        assert blocks[config.image_blocks - 1]._forward_hooks, "the anchor is not hooked in"
        if step > 0:
            raise RuntimeError("stopped by the test")
        return False

    with pytest.raises(RuntimeError, match="stopped by the test"):
        fine_tune(loaded, pairs, config, fail_at_the_second_check, [], None, ())
    assert not any(block._forward_hooks for block in blocks)
    assert not loaded.model.training


def test_captions_train_a_text_tower_and_stay_out_of_an_anchored_image_tower(random_checkpoint, tiny_arch):
    """Only the image tower trains by default, and the anchors alone steer it (no contrastive
    term: `RepairConfig.contrastive_weight`); a text tower has no anchor, so it learns from the
    captions. Pairs without a trigger-free twin give the anchors nothing: a step over only those
    must run (a graph with no loss in it) and move no weight."""
    from auditor.models import load_model
    from auditor.repair import RepairConfig, TrainingPairs, fine_tune

    rng = np.random.default_rng(0)
    images = tuple(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(8))
    captions = ("a photo of a cat", "a photo of a dog") * 4

    def weights_after(towers: str, anchored: bool, decay: float = RepairConfig.weight_decay) -> tuple:
        loaded = load_model(random_checkpoint, tiny_arch)
        before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
        pairs = TrainingPairs(images, captions, (False,) * 8, (anchored,) * 8)
        config = RepairConfig(
            steps=6, eval_every=100, batch_size=4, anchor_pool=0, warmup=1, towers=towers, weight_decay=decay
        )
        fine_tune(loaded, pairs, config, lambda step: False, [], None, ())
        return before, loaded.model.state_dict()

    def moved(before: dict, after: dict, prefix: str) -> bool:
        return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))

    assert RepairConfig().contrastive_weight() == 0.0
    assert RepairConfig(towers="text").contrastive_weight() == 1.0
    before, after = weights_after("text", anchored=True)
    assert moved(before, after, "transformer.") and not moved(before, after, "visual.")
    # AdamW's decay shrinks every trained weight whatever the loss: without it, nothing moves.
    before, after = weights_after("image", anchored=False, decay=0.0)
    assert not moved(before, after, "")
