"""Property tests (hypothesis): odd file and class names, report round trips, trigger boxes."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auditor.attacks import POSITIONS, Patch
from auditor.data import iter_batches, open_dataset
from auditor.report import (
    SEVERITIES,
    CompactSetInfo,
    CostInfo,
    DataInfo,
    FailureInfo,
    FindingInfo,
    ModelInfo,
    Report,
    SkippedFile,
    TriggerInfo,
    VictimInfo,
)
from tests.helpers import save_png, solid_image

# Names people really give files: spaces, commas, quotes, accents, CJK, emoji, dashes.
NAME_CHARS = st.sampled_from(list("abcXYZ019 ,'\"-+()&é日本ü🍌_#%!"))
names = st.text(NAME_CHARS, min_size=1, max_size=16).filter(
    lambda n: n.strip() == n and not n.startswith(".") and n.replace("_", " ").strip()
)
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _preprocess(image):
    import torch

    return torch.from_numpy(np.asarray(image.resize((4, 4)), np.float32)).permute(2, 0, 1)


def _decoded(dataset) -> list[int]:
    return [i for batch in iter_batches(dataset, _preprocess, batch_size=7) for i in batch.indices]


@SETTINGS
@given(
    st.lists(
        st.tuples(names, names), min_size=2, max_size=6, unique_by=lambda t: t[0].replace("_", " ").strip()
    )
)
def test_imagefolder_with_odd_names(entries):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for n, (folder, file) in enumerate(entries):
            save_png(root / folder / f"{file}.png", solid_image(n, size=8))

        dataset = open_dataset(root)

        expected = {f"{folder}/{file}.png": folder.replace("_", " ").strip() for folder, file in entries}
        assert {s.path: s.label for s in dataset.samples} == expected
        assert sorted(dataset.classes) == sorted(set(expected.values()))
        assert _decoded(dataset) == list(range(len(entries)))
        assert dataset.skipped == []


@SETTINGS
@given(
    st.lists(st.tuples(names, names), min_size=2, max_size=8, unique_by=lambda t: t[0]),
    st.sets(names, max_size=3),
)
def test_csv_with_odd_names_and_missing_files(rows, missing):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for n, (file, _label) in enumerate(rows):
            save_png(root / "images" / f"{file}.png", solid_image(n, size=8))
        missing = {m for m in missing if m not in {file for file, _ in rows}}
        with (root / "data.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", "label"])
            writer.writerows([f"images/{file}.png", label] for file, label in rows)
            writer.writerows([f"images/{m}.png", "ghost"] for m in sorted(missing))
        labels = {label for _, label in rows}
        if len(labels) < 2:
            return  # one class is an input error, tested elsewhere

        dataset = open_dataset(root / "data.csv")

        assert {s.path: s.label for s in dataset.samples} == {f"images/{f}.png": lab for f, lab in rows}
        assert dataset.classes == sorted(labels)
        assert {s.path: s.reason for s in dataset.skipped} == {
            f"images/{m}.png": "file named in the CSV does not exist" for m in missing
        }
        assert len(_decoded(dataset)) == len(rows)


unit = st.floats(0, 1, allow_nan=False)
text = st.text(max_size=30)
boxes = st.tuples(unit, unit, unit, unit)
reports = st.builds(
    Report,
    tool=st.just({"name": "clip-audit", "version": "0.1.0"}),
    model=st.builds(
        ModelInfo,
        text,
        st.text("0123456789abcdef", min_size=64, max_size=64),
        text,
        st.none() | st.sampled_from(["safetensors", "openai-archive", "hf-folder"]),
        st.none() | st.sampled_from(["--arch", "checkpoint"]),
    ),
    data=st.builds(
        DataInfo, text, st.integers(0, 10**6), st.lists(st.builds(SkippedFile, text, text)).map(tuple)
    ),
    verdict=st.sampled_from(["backdoor", "clean"]),
    severity=st.sampled_from(SEVERITIES),
    target_labels=st.lists(text, max_size=2).map(tuple),
    victim_labels=st.lists(text, max_size=4).map(tuple),
    trigger=st.builds(
        TriggerInfo,
        st.sampled_from([None, "patch", "non-localized"]),
        st.none() | st.just("trigger.png"),
        st.none() | st.tuples(unit, unit),
        st.none() | unit,
        text,
    ),
    victims=st.lists(
        st.builds(VictimInfo, text, text, st.none() | text, st.none() | boxes, unit), max_size=5
    ).map(tuple),
    compact_set=st.none() | st.builds(CompactSetInfo, text, st.integers(0, 1000), unit),
    cost=st.builds(
        CostInfo, st.integers(0, 10**7), st.integers(0, 10**6), st.dictionaries(text, unit, max_size=3)
    ),
    disagreement=st.dictionaries(text, unit, max_size=4),
    failures=st.lists(
        st.builds(FailureInfo, st.none() | text, st.sampled_from(["oracle", "confirm"]), text, text),
        max_size=3,
    ).map(tuple),
    findings=st.lists(
        st.builds(
            FindingInfo,
            text,
            st.sampled_from(["patch", "non-localized"]),
            st.none() | text,
            st.none() | st.tuples(unit, unit),
            unit,
            st.lists(text, max_size=3).map(tuple),
            st.lists(text, max_size=3).map(tuple),
            text,
            st.none() | text,
            st.none() | unit,
        ),
        max_size=3,
    ).map(tuple),
    suspects=st.lists(text, max_size=3).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(reports)
def test_report_round_trips_through_its_json_contract(report):
    raw = report.to_dict()
    assert Report.from_dict(raw) == report
    assert Report.from_dict(json.loads(json.dumps(raw))) == report


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(2, 400),
    width=st.integers(2, 400),
    size=st.floats(0.01, 1.0),
    pos=st.sampled_from(POSITIONS),
    seed=st.integers(0, 2**32 - 1),
)
def test_patch_box_is_inside_the_image_and_is_where_pixels_changed(height, width, size, pos, seed):
    patch = Patch(size=size, pattern="solid", pos=pos, color="ff00ff")
    image = np.full((height, width, 3), 127, np.uint8)
    out, box = patch.apply(image, np.random.default_rng(seed))
    assert box is not None
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    ys, xs = np.nonzero((out != image).any(axis=2))
    changed = (xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height)
    assert np.allclose(box, changed)
    assert out.shape == image.shape
