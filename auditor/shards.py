"""WebDataset tar shards as DATA: `00000.tar`, … as img2dataset writes them.

A sample is the group of members that share a key (the member's path up to the first dot of
its file name): `KEY.jpg|png|webp|…` the image, `KEY.txt` the caption, `KEY.json` metadata.
A sample is named `SHARD#KEY` in the scan (SHARD relative to DATA's folder), which is how
victims are reported and how `repair` and the compact set read them back.

The shards are read with the standard library's `tarfile`, not the `webdataset` package: the
scan reads images out of order (the oracle revisits suspects' images; repair and the HTML
report read victims back by name), and a tar member's data offset gives that in one seek,
where a streaming reader would read the shard from its start. Each shard's member table is read
once, when DATA is opened.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from auditor.errors import DataError

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SHARD_SUFFIX = ".tar"
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_CHOICE = re.compile(r"\{([^{}]*,[^{}]*)\}")


@dataclass(frozen=True)
class Member:
    """Where one sample's image bytes lie: the shard file, the data offset and the size."""

    shard: Path
    offset: int
    size: int


@dataclass(frozen=True)
class ShardSample:
    """One sample of a shard: its `SHARD#KEY` name, image location (None: no image) and caption."""

    name: str
    image: Member | None
    caption: str | None


def is_shard_spec(path: str) -> bool:
    """Whether DATA names tar shards: a `.tar` file, a brace pattern, or a folder of `.tar` files."""
    if _RANGE.search(path) or _CHOICE.search(path):
        return path.endswith(SHARD_SUFFIX)
    candidate = Path(path)
    if candidate.is_file():
        return candidate.suffix.lower() == SHARD_SUFFIX
    if candidate.is_dir():
        entries = [p for p in candidate.iterdir() if not p.name.startswith(".")]
        return bool(entries) and all(p.is_file() and p.suffix.lower() == SHARD_SUFFIX for p in entries)
    return False


def expand_braces(pattern: str) -> list[str]:
    """`shards/{00000..00002}.tar` -> the three names, zero padding kept; `{a,b}` lists too.
    Groups expand left to right, as a shell does."""
    found = [m for m in (_RANGE.search(pattern), _CHOICE.search(pattern)) if m]
    if not found:
        return [pattern]
    match = min(found, key=lambda m: m.start())
    head, tail = pattern[: match.start()], pattern[match.end() :]
    if match.re is _RANGE:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        parts = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    else:
        parts = match.group(1).split(",")
    return [name for part in parts for name in expand_braces(head + part + tail)]


def shard_files(spec: str) -> tuple[Path, list[Path]]:
    """(the folder sample names are relative to, the shard files in order) of a shard spec."""
    candidate = Path(spec)
    if candidate.is_dir():
        shards = sorted(p for p in candidate.iterdir() if p.suffix.lower() == SHARD_SUFFIX)
        return candidate, shards
    shards = [Path(name) for name in expand_braces(spec)]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"shard(s) not found: {shown}")
    return shards[0].parent, shards


def read_shard(shard: Path, root: Path) -> tuple[list[ShardSample], str | None]:
    """The samples of one shard in member order, and why reading stopped early (None: it did not).

    A truncated or corrupt shard keeps the samples read before the damage.
    """
    name = shard.relative_to(root).as_posix() if shard.is_relative_to(root) else shard.name
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    problem = None
    try:
        with tarfile.open(shard, mode="r:") as archive:
            for info in archive:
                if not info.isfile():
                    continue
                key, _, suffix = _split_member(info.name)
                # A field is named by its last extension (`KEY.jpg.png` is a png), as webdataset's
                # decoders read it.
                groups.setdefault(key, {})[suffix.lower().rpartition(".")[2]] = info
    except (tarfile.TarError, OSError, EOFError) as exc:
        problem = f"unreadable shard ({type(exc).__name__}: {exc})"
    samples = []
    with shard.open("rb") as handle:
        for key, members in groups.items():
            image = next((members[s] for s in IMAGE_SUFFIXES if s in members), None)
            caption = _text(handle, members["txt"]) if "txt" in members else None
            samples.append(
                ShardSample(
                    f"{name}#{key}",
                    None if image is None else Member(shard, image.offset_data, image.size),
                    caption,
                )
            )
    return samples, problem


def read_member(member: Member) -> bytes:
    """The bytes of one image member (one seek and one read)."""
    with member.shard.open("rb") as handle:
        handle.seek(member.offset)
        data = handle.read(member.size)
    if len(data) != member.size:
        raise OSError(f"{member.shard.name}: member ends after {len(data)} of {member.size} bytes")
    return data


def _split_member(path: str) -> tuple[str, str, str]:
    """`dir/KEY.ext1.ext2` -> ("dir/KEY", ".", "ext1.ext2"): the key ends at the file name's first dot."""
    folder, _, base = path.rpartition("/")
    stem, dot, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), dot, suffix


def _text(handle: BinaryIO, info: tarfile.TarInfo, limit: int = 65_536) -> str:
    """A caption member as text (at most `limit` bytes; undecodable bytes replaced)."""
    handle.seek(info.offset_data)
    return handle.read(min(info.size, limit)).decode("utf-8", errors="replace").strip()
