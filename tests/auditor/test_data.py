"""Data layouts (ImageFolder, CSV, flat + --classes) and skipped bad files."""

from __future__ import annotations

import numpy as np
import pytest

from auditor.data import iter_batches, open_dataset
from auditor.errors import DataError
from tests.helpers import save_png, solid_image


def _identity_preprocess(image):
    import torch

    return torch.from_numpy(np.asarray(image.resize((8, 8)), np.float32)).permute(2, 0, 1)


def _read_all(dataset):
    return [i for batch in iter_batches(dataset, _identity_preprocess, batch_size=3) for i in batch.indices]


def test_imagefolder_labels_underscores_and_order(tmp_path):
    for n, label in enumerate(["traffic_light", "dog", "traffic_light"]):
        save_png(tmp_path / label / f"{n}.png", solid_image(n))
    save_png(tmp_path / "dog" / "nested" / "deep.png", solid_image(9))

    dataset = open_dataset(tmp_path)

    assert dataset.layout == "imagefolder"
    assert dataset.classes == ["dog", "traffic light"]
    assert [(s.path, s.label) for s in dataset.samples] == [
        ("dog/1.png", "dog"),
        ("dog/nested/deep.png", "dog"),
        ("traffic_light/0.png", "traffic light"),
        ("traffic_light/2.png", "traffic light"),
    ]
    assert _read_all(dataset) == [0, 1, 2, 3]


def test_csv_with_labels_paths_relative_to_csv(tmp_path):
    save_png(tmp_path / "img" / "a.png", solid_image(1))
    save_png(tmp_path / "img" / "b.png", solid_image(2))
    csv_path = tmp_path / "meta" / "data.csv"
    csv_path.parent.mkdir()
    csv_path.write_text('image,label\n../img/b.png,cat\n"../img/a.png","hot dog"\n../img/missing.png,cat\n')

    dataset = open_dataset(csv_path)

    assert dataset.layout == "csv"
    assert dataset.classes == ["cat", "hot dog"]
    assert [(s.path, s.label) for s in dataset.samples] == [
        ("../img/a.png", "hot dog"),
        ("../img/b.png", "cat"),
    ]
    assert [(s.path, s.reason) for s in dataset.skipped] == [
        ("../img/missing.png", "file named in the CSV does not exist")
    ]
    assert _read_all(dataset) == [0, 1]


def test_csv_with_captions_needs_and_uses_classes(tmp_path):
    save_png(tmp_path / "a.png", solid_image(1))
    save_png(tmp_path / "b.png", solid_image(2))
    (tmp_path / "data.csv").write_text("image,caption\na.png,a photo of a hot dog.\nb.png,my dog on grass\n")
    with pytest.raises(DataError, match="no labels"):
        open_dataset(tmp_path / "data.csv")
    classes = tmp_path / "classes.txt"
    classes.write_text("dog\nhot dog\ncat\n")

    dataset = open_dataset(tmp_path / "data.csv", classes)

    assert dataset.classes == ["dog", "hot dog", "cat"]
    assert [s.label for s in dataset.samples] == ["hot dog", "dog"]


def test_flat_folder_needs_classes(tmp_path):
    save_png(tmp_path / "x.png", solid_image(1))
    save_png(tmp_path / "y.jpg", solid_image(2))
    with pytest.raises(DataError, match="flat folder") as caught:
        open_dataset(tmp_path)
    assert "--classes" in str(caught.value.hint)
    classes = tmp_path.parent / "classes.txt"
    classes.write_text("cat\n\ndog\ncat\n")

    dataset = open_dataset(tmp_path, classes)

    assert dataset.layout == "flat"
    assert dataset.classes == ["cat", "dog"]
    assert [(s.path, s.label) for s in dataset.samples] == [("x.png", None), ("y.jpg", None)]


def test_bad_files_are_skipped_with_reasons(tmp_path):
    good = [save_png(tmp_path / "cat" / f"good{i}.png", solid_image(i)) for i in range(2)]
    (tmp_path / "cat" / "empty.png").write_bytes(b"")
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "text.jpg").write_text("this is not an image")
    full = save_png(tmp_path / "dog" / "truncated.png", solid_image(5, size=64)).read_bytes()
    (tmp_path / "dog" / "truncated.png").write_bytes(full[: len(full) // 2])
    (tmp_path / "dog" / "notes.txt").write_text("hello")
    save_png(tmp_path / "dog" / "ok.png", solid_image(7))

    dataset = open_dataset(tmp_path)
    read = _read_all(dataset)

    assert [dataset.samples[i].path for i in read] == ["cat/good0.png", "cat/good1.png", "dog/ok.png"]
    reasons = {s.path: s.reason for s in dataset.skipped}
    assert set(reasons) == {"cat/empty.png", "dog/text.jpg", "dog/truncated.png", "dog/notes.txt"}
    assert "not a readable image" in reasons["cat/empty.png"]
    assert "not a readable image" in reasons["dog/text.jpg"]
    assert "truncated" in reasons["dog/truncated.png"]
    assert reasons["dog/notes.txt"] == "not an image file extension"
    assert len(good) == 2


def test_odd_modes_decode_to_rgb(tmp_path):
    from PIL import Image

    Image.new("CMYK", (10, 10), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((10, 10), 40000, np.uint16)).save(tmp_path / "deep.png")
    palette = Image.new("P", (10, 10), 0)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    (tmp_path.parent / "c.txt").write_text("a\nb\n")

    dataset = open_dataset(tmp_path, tmp_path.parent / "c.txt")

    assert _read_all(dataset) == [0, 1, 2]
    assert dataset.skipped == []


def test_empty_data_and_single_class_are_errors(tmp_path):
    (tmp_path / "empty" / "dog").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        open_dataset(tmp_path / "empty")
    save_png(tmp_path / "one" / "dog" / "a.png", solid_image(1))
    with pytest.raises(DataError, match="vocabulary of 1 class") as caught:
        open_dataset(tmp_path / "one")
    assert "at least two class names" in str(caught.value.hint)
    with pytest.raises(DataError, match="not found"):
        open_dataset(tmp_path / "nowhere")
