"""Data sets under audit: ImageFolder, CSV, a flat folder plus a class list, or WebDataset shards.

Labels found here are *claims* (possibly poisoned); the vocabulary is the folder names, the
`--classes` file, or the CSV's distinct labels. Images are decoded lazily in a deterministic
order (sorted relative paths); a file that cannot be decoded is skipped with a reason that ends
up in the result, never a crash.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from auditor.errors import DataError
from auditor.shards import Member, is_shard_spec, read_member, read_shard, shard_files

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Pillow's own default (~89 Mpx) is only a warning; an image larger than this is refused outright.
MAX_IMAGE_PIXELS = 64_000_000


@dataclass(frozen=True)
class Sample:
    """One image: its path relative to DATA (as found there) and its claimed label, if any."""

    path: str
    label: str | None = None


@dataclass(frozen=True)
class Skipped:
    """A file that was not used, and why."""

    path: str
    reason: str


@dataclass
class Dataset:
    """A data set's images, its class vocabulary and what was skipped so far.

    `skipped` grows while images are decoded: it is complete once every image was read.
    """

    root: Path  # the folder, the CSV file, or the folder that shard names are relative to
    layout: str  # "imagefolder" | "csv" | "flat" | "webdataset"
    classes: list[str]
    samples: list[Sample]
    skipped: list[Skipped] = field(default_factory=list)
    members: dict[str, Member] = field(default_factory=dict)  # webdataset: `SHARD#KEY` -> image bytes

    def absolute(self, sample: Sample) -> Path:
        """The file that holds the sample (for a WebDataset sample, its shard)."""
        base = self.root.parent if self.layout == "csv" else self.root
        return base / sample.path.partition("#")[0] if self.layout == "webdataset" else base / sample.path

    def load(self, sample: Sample) -> Image.Image:
        """The sample's image as RGB; raises ImageDecodeError with the reason it cannot be used."""
        if self.layout != "webdataset":
            return load_image(self.absolute(sample))
        member = self.members.get(sample.path)
        if member is None:
            raise ImageDecodeError("no such sample in the shards")
        try:
            data = read_member(member)
        except OSError as exc:
            raise ImageDecodeError(f"unreadable shard member ({exc})") from exc
        return load_image(io.BytesIO(data))

    def content_sha256(self, sample: Sample) -> str:
        """SHA-256 of the sample's image bytes; raises OSError when they cannot be read."""
        if self.layout != "webdataset":
            from engines.cache import file_sha256

            return file_sha256(self.absolute(sample))
        member = self.members.get(sample.path)
        if member is None:
            raise FileNotFoundError(sample.path)
        return hashlib.sha256(read_member(member)).hexdigest()

    def label_index(self, sample: Sample) -> int | None:
        if sample.label is None:
            return None
        return self.classes.index(sample.label)


def folder_to_label(name: str) -> str:
    """ImageFolder convention here: underscores in folder names read as spaces."""
    return name.replace("_", " ").strip()


def open_dataset(path: str | os.PathLike[str], classes_file: str | os.PathLike[str] | None = None) -> Dataset:
    """Detect DATA's layout and list its samples (no image is decoded yet).

    DATA may also be WebDataset shards: a `.tar` file, a folder of them, or a brace pattern
    (`shards/{00000..00099}.tar`); captions name the labels, with `--classes` as for CSV captions.
    """
    classes = read_classes(Path(classes_file)) if classes_file is not None else None
    if is_shard_spec(os.fspath(path)):
        dataset = _open_shards(os.fspath(path), classes)
        _check_usable(dataset)
        return dataset
    root = Path(path)
    if not root.exists():
        raise DataError(f"data not found: {root}")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(f"{root}: DATA must be a folder, a .csv file or WebDataset .tar shards")
        dataset = _open_csv(root, classes)
    elif any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        dataset = _open_imagefolder(root, classes)
    else:
        if classes is None:
            raise DataError(
                f"{root} is a flat folder of images: the class names are unknown",
                hint="pass --classes FILE (one class name per line)",
            )
        dataset = _open_flat(root, classes)
    _check_usable(dataset)
    return dataset


def open_image_folder(path: str | os.PathLike[str], classes: list[str]) -> Dataset:
    """Every image under the folder `path` (any layout, labels ignored), with the vocabulary `classes`.

    For images whose labels do not matter: the model-level search's `--inversion-data`.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder of images")
    dataset = _open_flat(root, classes)
    _check_usable(dataset)
    return dataset


def read_classes(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read --classes file {path}: {exc}") from exc
    names = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    return names


def _check_usable(dataset: Dataset) -> None:
    if not dataset.samples:
        raise DataError(
            f"no images found in {dataset.root}",
            hint="DATA must hold images (" + ", ".join(sorted(IMAGE_EXTENSIONS)) + ")",
        )
    if len(dataset.classes) < 2:
        raise DataError(
            f"{dataset.root}: a vocabulary of {len(dataset.classes)} class(es) cannot be audited",
            hint="zero-shot audits need at least two class names: pass --classes FILE or add folders",
        )


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _walk_images(folder: Path, rel_to: Path, skipped: list[Skipped]) -> list[str]:
    """Relative POSIX paths of the images under `folder`, sorted; other files are skipped."""
    found = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            file = Path(current) / name
            if _is_hidden(file):
                continue
            rel = file.relative_to(rel_to).as_posix()
            if file.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(rel)
            else:
                skipped.append(Skipped(rel, "not an image file extension"))
    return found


def _open_imagefolder(root: Path, classes: list[str] | None) -> Dataset:
    skipped: list[Skipped] = []
    samples = []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p))
    for folder in folders:
        label = folder_to_label(folder.name)
        samples += [Sample(rel, label) for rel in _walk_images(folder, root, skipped)]
    for file in sorted(p for p in root.iterdir() if p.is_file() and not _is_hidden(p)):
        skipped.append(Skipped(file.name, "outside any class folder"))
    vocabulary = classes if classes is not None else [folder_to_label(f.name) for f in folders]
    vocabulary = list(dict.fromkeys(vocabulary))
    for sample in samples:
        if sample.label not in vocabulary:
            raise DataError(f"folder label '{sample.label}' is not in the --classes file")
    return Dataset(root, "imagefolder", vocabulary, samples, skipped)


def _open_flat(root: Path, classes: list[str]) -> Dataset:
    skipped: list[Skipped] = []
    samples = [Sample(rel) for rel in _walk_images(root, root, skipped)]
    return Dataset(root, "flat", classes, samples, skipped)


def _open_csv(path: Path, classes: list[str] | None) -> Dataset:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read CSV {path}: {exc}") from exc
    columns = set(rows[0]) if rows else set()
    if "image" not in columns or not ({"label", "caption"} & columns):
        raise DataError(
            f"{path}: a data CSV needs an 'image' column and a 'label' or 'caption' column",
            hint=f"found columns: {', '.join(sorted(c for c in columns if c)) or 'none'}",
        )
    if "label" not in columns and classes is None:
        raise DataError(
            f"{path} has captions but no labels: the class names are unknown",
            hint="pass --classes FILE; each caption's label is the class it names",
        )
    skipped: list[Skipped] = []
    samples = []
    for row in rows:
        rel = (row.get("image") or "").strip()
        if not rel:
            skipped.append(Skipped(rel, "CSV row without an image path"))
            continue
        if not (path.parent / rel).is_file():
            skipped.append(Skipped(rel, "file named in the CSV does not exist"))
            continue
        label = (row.get("label") or "").strip() if "label" in columns else None
        if label is None:
            label = _label_from_caption(row.get("caption") or "", classes or [])
        samples.append(Sample(rel, label or None))
    samples.sort(key=lambda s: s.path)
    vocabulary = classes if classes is not None else sorted({s.label for s in samples if s.label})
    vocabulary = list(dict.fromkeys(vocabulary))
    samples = [s if s.label in vocabulary else Sample(s.path) for s in samples]
    return Dataset(path, "csv", vocabulary, samples, skipped)


def _open_shards(spec: str, classes: list[str] | None) -> Dataset:
    """WebDataset shards: every sample with an image, labelled by the class its caption names."""
    if classes is None:
        raise DataError(
            f"{spec}: WebDataset shards carry captions, not labels: the class names are unknown",
            hint="pass --classes FILE; each caption's label is the class it names",
        )
    root, shards = shard_files(spec)
    samples, skipped, members = [], [], {}
    for shard in shards:
        found, problem = read_shard(shard, root)
        if problem is not None:
            skipped.append(Skipped(shard.name, problem))
        for sample in found:
            if sample.image is None:
                skipped.append(Skipped(sample.name, "sample without an image"))
                continue
            members[sample.name] = sample.image
            samples.append(Sample(sample.name, _label_from_caption(sample.caption or "", classes)))
    return Dataset(root, "webdataset", classes, samples, skipped, members)


def _label_from_caption(caption: str, classes: list[str]) -> str | None:
    """The longest class name that occurs in the caption as whole words, if any."""
    words = f" {' '.join(caption.lower().replace(',', ' ').replace('.', ' ').split())} "
    hits = [c for c in classes if f" {c.lower()} " in words]
    return max(hits, key=len) if hits else None


class ImageDecodeError(Exception):
    """An image file that cannot be used; the message is the skip reason."""


def load_image(path: Path | BinaryIO) -> Image.Image:
    """Decode an image (a file, or bytes in a stream) to RGB, guarding against bombs, truncation
    and odd modes."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise ImageDecodeError(
                        f"image too large ({img.width}x{img.height} pixels, limit {MAX_IMAGE_PIXELS})"
                    )
                img.load()
                return to_rgb(img)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image too large (decompression bomb guard: {exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not a readable image") from exc
    except FileNotFoundError as exc:
        raise ImageDecodeError("file does not exist") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image ({exc})") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() if arr.size and arr.max() > 0 else 1.0
        img = Image.fromarray((arr / top * 255.0).round().astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


@dataclass(frozen=True)
class Batch:
    """Decoded images of one batch: their indices into `Dataset.samples` and pixels.

    `pixels` is float32 of shape (B, 3, S, S) after `preprocess`; `images` are the RGB originals.
    """

    indices: list[int]
    pixels: torch.Tensor
    images: list[Image.Image]


def iter_batches(
    dataset: Dataset,
    preprocess: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 64,
    indices: list[int] | None = None,
    transform: Callable[[int, Image.Image], Image.Image | None] | None = None,
) -> Iterator[Batch]:
    """Decode, optionally transform, and preprocess images in order, `batch_size` at a time.

    Unreadable files are appended to `dataset.skipped` (once) and left out of the batches.
    `transform(index, image)` may return None to leave an image out (e.g. a target-class image
    when measuring attack success).
    """
    order = range(len(dataset.samples)) if indices is None else indices
    already = {s.path for s in dataset.skipped}
    chunk: list[tuple[int, Image.Image]] = []
    for index in order:
        sample = dataset.samples[index]
        try:
            image = dataset.load(sample)
        except ImageDecodeError as exc:
            if sample.path not in already:
                dataset.skipped.append(Skipped(sample.path, str(exc)))
                already.add(sample.path)
            continue
        if transform is not None:
            transformed = transform(index, image)
            if transformed is None:
                continue
            image = transformed
        chunk.append((index, image))
        if len(chunk) == batch_size:
            yield _make_batch(chunk, preprocess)
            chunk = []
    if chunk:
        yield _make_batch(chunk, preprocess)


def _make_batch(
    chunk: list[tuple[int, Image.Image]], preprocess: Callable[[Image.Image], torch.Tensor]
) -> Batch:
    import torch

    return Batch(
        indices=[i for i, _ in chunk],
        pixels=torch.stack([preprocess(img) for _, img in chunk]),
        images=[img for _, img in chunk],
    )


def pil_to_array(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> uint8 array of shape (H, W, 3)."""
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def first_image(dataset: Dataset | None) -> np.ndarray | None:
    """The first decodable image of `dataset` as uint8 RGB (H, W, 3); None when there is none."""
    if dataset is None:
        return None
    for sample in dataset.samples:
        try:
            return pil_to_array(dataset.load(sample))
        except ImageDecodeError:
            continue
    return None
