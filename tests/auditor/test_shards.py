"""WebDataset shards as DATA (issue 15): the layout, bad samples, and a scan and a repair that
read them, judged against the zoo generator's planted files."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from auditor.cli import run
from auditor.data import ImageDecodeError, open_dataset
from auditor.errors import DataError
from auditor.shards import expand_braces, is_shard_spec
from auditor.zoo.build import CONFIG_PATH, checkpoint_path, write_scan_data
from tests.helpers import save_png, solid_image


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _png(seed: int, tmp: Path) -> bytes:
    return save_png(tmp / f"img{seed}.png", solid_image(seed)).read_bytes()


def write_shards(folder: Path, dest: Path, per_shard: int) -> list[Path]:
    """An ImageFolder's images as img2dataset-style shards, in the folder's sorted order: member
    `LABEL/NNNNN.png`, caption `a photo of a LABEL.`, and a `.json` beside them."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    dest.mkdir(parents=True)
    shards = []
    for number, start in enumerate(range(0, len(files), per_shard)):
        shards.append(dest / f"{number:05d}.tar")
        with tarfile.open(shards[-1], "w") as archive:
            for rel in files[start : start + per_shard]:
                key, label = rel.removesuffix(".png"), rel.split("/")[0].replace("_", " ")
                _add(archive, f"{key}.png", (folder / rel).read_bytes())
                _add(archive, f"{key}.txt", f"a photo of a {label}.".encode())
                _add(archive, f"{key}.json", json.dumps({"key": key}).encode())
    return shards


def test_brace_patterns_expand_as_img2dataset_names_them():
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{n:05d}.tar" for n in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_shards_give_labelled_samples_and_bad_ones_are_skipped_with_reasons(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as archive:
        _add(archive, "a/1.png", _png(1, tmp_path))
        _add(archive, "a/1.txt", b"A photo of a Cat, indoors.")
        _add(archive, "a/2.jpg.png", _png(2, tmp_path))  # the key ends at the first dot: a/2
        _add(archive, "a/2.jpg.txt", b"a dog")
        _add(archive, "3.txt", b"a caption and no image")
        _add(archive, "4.png", b"not an image at all")
        _add(archive, "4.txt", b"a cat")
    with tarfile.open(shards / "00001.tar", "w") as archive:
        _add(archive, "5.png", _png(5, tmp_path))
        _add(archive, "5.txt", b"a bird")  # no such class: unlabelled
        _add(archive, "6.png", _png(6, tmp_path))
        _add(archive, "6.txt", b"dog on grass")
    whole = (shards / "00001.tar").read_bytes()
    (shards / "00002.tar").write_bytes(whole[:1536] + b"\x00garbage" * 10)  # header, then damage
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")

    dataset = open_dataset(shards, classes)
    names = [(s.path, s.label) for s in dataset.samples]
    assert names[:5] == [
        ("00000.tar#a/1", "cat"),
        ("00000.tar#a/2", "dog"),
        ("00000.tar#4", "cat"),
        ("00001.tar#5", None),
        ("00001.tar#6", "dog"),
    ]
    reasons = {s.path: s.reason for s in dataset.skipped}
    assert reasons["00000.tar#3"] == "sample without an image"
    assert "00002.tar" in reasons and "unreadable shard" in reasons["00002.tar"]
    assert dataset.load(dataset.samples[0]).size == (32, 32)
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        dataset.load(dataset.samples[2])
    # The same shards named as one file or as a brace pattern.
    assert [s.path for s in open_dataset(shards / "00001.tar", classes).samples] == [
        "00001.tar#5",
        "00001.tar#6",
    ]
    pattern = open_dataset(str(shards / "{00000..00001}.tar"), classes)
    assert [s.path for s in pattern.samples] == [p for p, _ in names if not p.startswith("00002")]
    assert is_shard_spec(str(shards)) and not is_shard_spec(str(tmp_path))
    with pytest.raises(DataError, match="class names are unknown") as refused:
        open_dataset(shards)
    assert "--classes" in str(refused.value.hint)
    with pytest.raises(DataError, match="not found"):
        open_dataset(str(shards / "{00000..00007}.tar"), classes)


def _scan(model: str, data: Path, out: Path, *extra: str) -> tuple[int, dict]:
    argv = ["scan", str(checkpoint_path(model)), str(data), "--arch", str(CONFIG_PATH), "--out", str(out)]
    code = run([*argv, "--format", "json", "--inversion", "never", *extra])
    return code, json.loads((out / "report.json").read_text())


def test_a_scan_of_shards_finds_what_the_same_folder_gives_and_repair_reads_victims_back(tmp_path):
    """The zoo's fixed-corner patch model on its scan data, once as a folder and once as shards:
    the same verdict, target and victims (named SHARD#KEY, with the same boxes), and those
    victims are the planted files."""
    truth = write_scan_data("patch-corner", tmp_path / "folder", per_class=40)
    write_shards(tmp_path / "folder", tmp_path / "shards", per_shard=200)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(open_dataset(tmp_path / "folder").classes) + "\n")

    _, from_folder = _scan("patch-corner", tmp_path / "folder", tmp_path / "out-folder")
    code, from_shards = _scan(
        "patch-corner", tmp_path / "shards", tmp_path / "out-shards", "--classes", str(classes)
    )

    assert code == 1 and from_shards["target_labels"] == [truth["target"]] == from_folder["target_labels"]
    by_key = {v["path"].split("#")[1] + ".png": v for v in from_shards["victims"]}
    assert all(v["path"].split("#")[0].endswith(".tar") for v in from_shards["victims"])
    assert {v["path"]: v["trigger_box"] for v in from_folder["victims"]} == {
        key: v["trigger_box"] for key, v in by_key.items()
    }
    planted = {p["path"] for p in truth["poisoned"]}
    assert len(planted & set(by_key)) >= 0.9 * len(planted)
    sources = (tmp_path / "out-shards" / "compact" / "pairs.csv").read_text()
    assert ".tar#" in sources

    repaired = tmp_path / "repaired.pt"
    argv = [
        "repair",
        str(checkpoint_path("patch-corner")),
        str(tmp_path / "shards"),
        "--arch",
        str(CONFIG_PATH),
    ]
    argv += ["--report", str(tmp_path / "out-shards" / "report.json"), "--classes", str(classes)]
    assert run([*argv, "--output", str(repaired), "--steps", "2"]) == 0 and repaired.exists()
