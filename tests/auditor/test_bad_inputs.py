"""Untrusted input through the command line: every case in docs/bad-inputs.md, run as written.

`CASES` builds each bad input and the command that meets it; the test runs the command and checks
the exit code, that stderr says what went wrong in one line and shows no traceback. A second test
reads the table in docs/bad-inputs.md and checks it lists exactly these cases with these exit
codes, so the document cannot drift from what the tool does. Bad *files inside* the data are
exercised by a full scan: they are skipped with their reasons and the findings on the rest still
match the generator's ground truth.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from auditor.cli import run
from auditor.zoo.build import CONFIG_PATH, checkpoint_path, write_scan_data
from tests.helpers import save_png, solid_image

DOC = Path(__file__).resolve().parents[2] / "docs" / "bad-inputs.md"
ARCH = ["--arch", str(CONFIG_PATH)]
GOOD_MODEL = str(checkpoint_path("patch-random"))


def _two_class_data(tmp: Path) -> Path:
    for n, label in enumerate(["cat", "dog", "cat", "dog"]):
        save_png(tmp / "data" / label / f"{n}.png", solid_image(n, size=64))
    return tmp / "data"


def _eval(model: str, data: Path, *extra: str) -> list[str]:
    return ["eval", model, str(data), *ARCH, *extra]


def _code_pickle(tmp: Path) -> list[str]:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'marker'}",))

    (tmp / "model.pt").write_bytes(pickle.dumps({"state_dict": Payload()}))
    return _eval(str(tmp / "model.pt"), _two_class_data(tmp))


def _random_bytes(tmp: Path) -> list[str]:
    (tmp / "model.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    return _eval(str(tmp / "model.bin"), _two_class_data(tmp))


def _truncated_safetensors(tmp: Path) -> list[str]:
    data = Path(GOOD_MODEL).read_bytes()
    (tmp / "model.safetensors").write_bytes(data[: len(data) // 3])
    return _eval(str(tmp / "model.safetensors"), _two_class_data(tmp))


def _wrong_arch(tmp: Path) -> list[str]:
    return ["eval", GOOD_MODEL, str(_two_class_data(tmp)), "--arch", "ViT-B-32"]


def _missing_model(tmp: Path) -> list[str]:
    return _eval(str(tmp / "nowhere.pt"), _two_class_data(tmp))


def _empty_data(tmp: Path) -> list[str]:
    (tmp / "data" / "cat").mkdir(parents=True)
    return _eval(GOOD_MODEL, tmp / "data")


def _one_class(tmp: Path) -> list[str]:
    save_png(tmp / "data" / "cat" / "a.png", solid_image(1))
    return _eval(GOOD_MODEL, tmp / "data")


def _flat_without_classes(tmp: Path) -> list[str]:
    save_png(tmp / "data" / "a.png", solid_image(1))
    save_png(tmp / "data" / "b.png", solid_image(2))
    return _eval(GOOD_MODEL, tmp / "data")


def _shards(tmp: Path) -> Path:
    """Two WebDataset shards of two captioned images each, in `tmp/shards`."""
    import io
    import tarfile

    (tmp / "shards").mkdir()
    for shard in range(2):
        with tarfile.open(tmp / "shards" / f"{shard:05d}.tar", "w") as archive:
            for n, label in enumerate(["cat", "dog"]):
                for name, data in [
                    (f"{n}.png", save_png(tmp / f"{shard}{n}.png", solid_image(n, size=64)).read_bytes()),
                    (f"{n}.txt", f"a {label}".encode()),
                ]:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return tmp / "shards"


def _shards_without_classes(tmp: Path) -> list[str]:
    return _eval(GOOD_MODEL, _shards(tmp))


def _missing_shard(tmp: Path) -> list[str]:
    (tmp / "classes.txt").write_text("cat\ndog\n")
    pattern = _shards(tmp) / "{00000..00002}.tar"  # 00002.tar is not there
    return _eval(GOOD_MODEL, pattern, "--classes", str(tmp / "classes.txt"))


def _csv_without_columns(tmp: Path) -> list[str]:
    (tmp / "data.csv").write_text("file,what\na.png,cat\n")
    return _eval(GOOD_MODEL, tmp / "data.csv")


def _bad_attack_spec(tmp: Path) -> list[str]:
    return _eval(GOOD_MODEL, _two_class_data(tmp), "--attack", "patch:size=7,target=cat")


def _sam_without_weights(tmp: Path) -> list[str]:
    return ["scan", GOOD_MODEL, str(_two_class_data(tmp)), *ARCH, "--oracle", "sam"]


def _not_sam_weights(tmp: Path) -> list[str]:
    pytest.importorskip("segment_anything")
    return [
        "scan",
        GOOD_MODEL,
        str(_two_class_data(tmp)),
        *ARCH,
        "--oracle",
        "sam",
        "--oracle-checkpoint",
        GOOD_MODEL,
    ]


def _fp16_on_cpu(tmp: Path) -> list[str]:
    return ["export", GOOD_MODEL, *ARCH, "--precision", "fp16", "--data", str(_two_class_data(tmp))]


def _tensorrt_absent(tmp: Path) -> list[str]:
    sys.modules["tensorrt"] = None  # type: ignore[assignment]  # undone by the test's finally
    return ["scan", GOOD_MODEL, str(_two_class_data(tmp)), *ARCH, "--engine", "tensorrt"]


def _corrupt_engine_cache(tmp: Path) -> list[str]:
    data = _two_class_data(tmp)
    engines = tmp / "engines"
    assert run(["-q", "export", GOOD_MODEL, *ARCH, "--engine-dir", str(engines)]) == 0
    image = next(engines.glob("*/image.onnx"))
    image.write_bytes(image.read_bytes()[:1000])  # torn: its hash no longer matches the manifest
    return _eval(GOOD_MODEL, data, "--engine", "onnx", "--engine-dir", str(engines))


def _repair_over_its_input(tmp: Path) -> list[str]:
    report = tmp / "report.json"
    report.write_text(json.dumps({"schema_version": 1}))
    return [
        "repair",
        GOOD_MODEL,
        str(_two_class_data(tmp)),
        *ARCH,
        "--report",
        str(report),
        "--output",
        GOOD_MODEL,
    ]


# id -> (builds the input and returns the command, expected exit code, what stderr must say)
CASES: dict[str, tuple[Callable[[Path], list[str]], int, str]] = {
    "pickle-with-code": (_code_pickle, 2, "refus"),
    "random-bytes-checkpoint": (_random_bytes, 2, "model.bin"),
    "truncated-safetensors": (_truncated_safetensors, 2, ""),
    "wrong-architecture": (_wrong_arch, 2, "does not fit"),
    "missing-checkpoint": (_missing_model, 2, "does not exist"),
    "empty-data": (_empty_data, 2, "no images found"),
    "one-class-vocabulary": (_one_class, 2, "at least two class names"),
    "flat-folder-without-classes": (_flat_without_classes, 2, "--classes"),
    "csv-without-image-column": (_csv_without_columns, 2, "'image' column"),
    "shards-without-classes": (_shards_without_classes, 2, "--classes"),
    "missing-shard": (_missing_shard, 2, "00002.tar"),
    "bad-attack-spec": (_bad_attack_spec, 2, "size"),
    "sam-without-weights": (_sam_without_weights, 2, "--oracle-checkpoint"),
    "sam-given-clip-weights": (_not_sam_weights, 2, "not a SAM checkpoint"),
    "fp16-engine-on-cpu": (_fp16_on_cpu, 3, "CUDA / TensorRT providers only"),
    "tensorrt-not-installed": (_tensorrt_absent, 3, "clip-audit[gpu]"),
    "corrupt-engine-cache": (_corrupt_engine_cache, 0, ""),
    "repair-output-is-its-input": (_repair_over_its_input, 2, ""),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_its_exit_code_and_one_clear_line(case, tmp_path, capsys):
    make, expected, says = CASES[case]
    try:
        argv = make(tmp_path)
        capsys.readouterr()
        code = run(argv)
    finally:
        sys.modules.pop("tensorrt", None)
    err = capsys.readouterr().err
    assert code == expected, err
    assert "Traceback" not in err
    assert says.lower() in err.lower()
    if expected:
        assert err.strip() and "error" in err.lower()
    assert not (tmp_path / "marker").exists()  # no pickled code ran


def _documented(pattern: str) -> dict[str, str]:
    return dict(re.findall(pattern, DOC.read_text(), flags=re.M))


def test_docs_table_lists_every_case_as_tested():
    exits = _documented(r"^\| `([a-z0-9-]+)` \|[^\n]*\| (\d) \|$")
    assert exits == {case: str(code) for case, (_, code, _) in CASES.items()}
    reasons = _documented(r"^\| `([a-z0-9-]+)` \|[^\n]*\| skipped: “([^”]+)”")
    assert reasons == BAD_FILES


# Bad files inside DATA: skipped with a reason (substring), never fatal.
BAD_FILES = {
    "zero-byte-file": "not a readable image",
    "truncated-png": "truncated",
    "text-named-jpg": "not a readable image",
    "decompression-bomb": "too large",
    "non-image-extension": "not an image file extension",
    "csv-row-missing-file": "does not exist",
}


def _plant_bad_files(data: Path) -> dict[str, str]:
    """Bad files in DATA's class folders; returns {relative path: case id}."""
    from PIL import Image

    good = sorted(data.glob("dog/*.png"))[0].read_bytes()
    planted = {
        "dog/zero.png": "zero-byte-file",
        "dog/half.png": "truncated-png",
        "cat/text.jpg": "text-named-jpg",
        "cat/bomb.png": "decompression-bomb",
        "cat/notes.txt": "non-image-extension",
    }
    (data / "dog/zero.png").write_bytes(b"")
    (data / "dog/half.png").write_bytes(good[: len(good) // 2])
    (data / "cat/text.jpg").write_text("not a picture")
    Image.new("1", (12_000, 12_000)).save(data / "cat/bomb.png")  # 144 Mpixel, a few kB on disk
    (data / "cat/notes.txt").write_text("hello")
    # Odd but valid modes decode to RGB and are used, not skipped.
    Image.new("CMYK", (64, 64), (0, 255, 0, 0)).save(data / "cat/cmyk.jpg")
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(data / "dog/deep16.png")
    Image.new("P", (64, 64), 0).save(data / "dog/palette.png", transparency=0)
    return planted


@pytest.mark.parametrize("layout", ["imagefolder", "csv"])
def test_scan_skips_bad_files_with_reasons_and_still_finds_the_backdoor(layout, tmp_path):
    truth = write_scan_data("patch-random", tmp_path / "data", per_class=20)
    planted = _plant_bad_files(tmp_path / "data")
    data = tmp_path / "data"
    if layout == "csv":  # the same files listed in a CSV, plus a row naming a file that is not there
        (data / "cat/notes.txt").unlink()  # a CSV names its files: no extension to filter on
        planted.pop("cat/notes.txt")
        rows = [f"{p.relative_to(data).as_posix()},{p.parent.name}" for p in sorted(data.rglob("*.*"))]
        rows.append("ghost/missing.png,dog")
        planted["ghost/missing.png"] = "csv-row-missing-file"
        (data / "data.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
        data = data / "data.csv"
    out = tmp_path / "out"
    code = run(["-q", "scan", GOOD_MODEL, str(data), *ARCH, "--engine", "torch", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())

    assert code == 1 and report["target_labels"] == [truth["target"]]
    skipped = {s["path"]: s["reason"] for s in report["data"]["skipped"]}
    assert set(skipped) == set(planted)
    for path, case in planted.items():
        assert BAD_FILES[case] in skipped[path], (path, skipped[path])
    found = {v["path"] for v in report["victims"]}
    poisoned = {p["path"] for p in truth["poisoned"]}
    assert len(found & poisoned) >= 0.9 * len(poisoned)
    assert report["data"]["images"] == truth["images"] + 3  # the CMYK, 16-bit and palette images
