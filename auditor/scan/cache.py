"""Beside the stages, resumable scans: stage 0's scores and Algorithm 1's checks, kept as computed.

Layout: `OUT/.scan-cache/key.json` (what the cache belongs to) and one file per finished unit of
work: `scores-<first index>.npz` (one batch of stage 0) and `checks-<digest>.npz` (one chunk of
oracle checks, named by the data indices it covers). Each file is written atomically, so a scan
killed at any point leaves only whole files; a rerun with the same inputs loads them and computes
only what is missing. The key hashes everything the results depend on — checkpoint, every data
file's bytes and label, the class vocabulary, the scan settings, oracle, reference model, engine
and tool version — and a cache made for another key is deleted, never mixed in. Files are numpy
archives read with `allow_pickle=False`: the cache is data, never code.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from auditor import __version__
from auditor.data import Dataset, Skipped
from auditor.files import atomic_write
from auditor.oracle import Segment
from auditor.report import FailureInfo
from auditor.scan.check import ImageCheck
from auditor.scoring import Scores

if TYPE_CHECKING:
    from auditor.models import LoadedModel

CACHE_DIR = ".scan-cache"
KEY_FILE = "key.json"


def data_fingerprint(dataset: Dataset) -> str:
    """SHA-256 over every sample's path, claimed label and file bytes (missing files included)."""
    digest = hashlib.sha256()
    for sample in dataset.samples:
        try:
            content = dataset.content_sha256(sample)
        except OSError as exc:
            content = f"unreadable: {type(exc).__name__}"
        digest.update(json.dumps([sample.path, sample.label, content]).encode())
    digest.update(json.dumps(list(dataset.classes)).encode())
    return digest.hexdigest()


def open_scan_cache(
    out: Path, loaded: LoadedModel, dataset: Dataset, config: object, **settings: object
) -> ScanCache:
    """The cache in `out` for this model, data, scan config (a dataclass) and other `settings`."""
    key = {
        "tool_version": __version__,
        "checkpoint_sha256": loaded.sha256,
        "arch": loaded.arch.name,
        "arch_config": loaded.arch.model_cfg,
        "data": data_fingerprint(dataset),
        "config": asdict(config),  # type: ignore[call-overload]
        **settings,
    }
    return ScanCache(out / CACHE_DIR, key)


class ScanCache:
    """One scan's persisted results in `folder`, valid for `key` only."""

    def __init__(self, folder: Path, key: dict[str, object]) -> None:
        self.folder = folder
        self.key = json.loads(json.dumps(key, sort_keys=True))
        self._open()

    def _open(self) -> None:
        key_path = self.folder / KEY_FILE
        try:
            found = json.loads(key_path.read_text())
        except (OSError, ValueError):
            found = None
        if found != self.key:  # another scan's results (or a damaged cache): start afresh
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            atomic_write(key_path, json.dumps(self.key, indent=1, sort_keys=True).encode())

    # --- stage 0 ------------------------------------------------------------------------
    def load_scores(self, start: int) -> tuple[Scores, list[Skipped]] | None:
        raw = self._load(scores_name(start))
        if raw is None:
            return None
        skipped = [Skipped(path, reason) for path, reason in json.loads(str(raw["skipped"]))]
        return Scores(raw["indices"], raw["embeddings"], raw["topk"], raw["probs"]), skipped

    def save_scores(self, start: int, scores: Scores, skipped: Sequence[Skipped]) -> None:
        self.put(scores_name(start), pack_scores(scores, skipped))

    # --- stages 1-2: Algorithm 1 ----------------------------------------------------------
    def load_checks(self, indices: Sequence[int]) -> tuple[list[ImageCheck], list[FailureInfo]] | None:
        """The chunk's checks and the images in it that could not be checked, or None if not cached."""
        raw = self._load(checks_name(indices))
        if raw is None:
            return None
        failures = [FailureInfo(**f) for f in json.loads(str(raw.get("failures", np.array("[]"))))]
        checks = []
        for i, fields in enumerate(json.loads(str(raw["checks"]))):
            candidate = None
            if fields.pop("candidate"):
                mask = raw[f"mask_{i}"]
                candidate = Segment(mask, tuple(raw[f"box_{i}"].tolist()), float(mask.mean()))
            fields["object_labels"] = tuple(fields["object_labels"])
            checks.append(ImageCheck(candidate=candidate, **fields))
        return checks, failures

    def save_checks(
        self,
        indices: Sequence[int],
        checks: Sequence[ImageCheck],
        images_scored: int,
        failures: Sequence[FailureInfo] = (),
    ) -> None:
        self.put(checks_name(indices), pack_checks(checks, images_scored, failures))

    def put(self, name: str, content: bytes) -> None:
        """Store one unit's archive (from `pack_scores` / `pack_checks`), atomically."""
        atomic_write(self.folder / name, content)

    def has(self, name: str) -> bool:
        return (self.folder / name).exists()

    def images_scored(self) -> int:
        """How many image scorings the cached results stand for (what a rerun saves)."""
        total = 0
        for path in self.folder.glob("*.npz"):
            try:  # only the count: an archive's other arrays are not decompressed
                with np.load(path, allow_pickle=False) as archive:
                    total += int(archive["images_scored"])
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                continue  # a damaged entry stands for nothing; the scan recomputes it
        return total

    # --- files ---------------------------------------------------------------------------
    def _load(self, name: str) -> dict[str, np.ndarray] | None:
        path = self.folder / name
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {k: archive[k] for k in archive.files}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # damaged: recompute it
            path.unlink(missing_ok=True)
            return None


def scores_name(start: int) -> str:
    """The file of stage 0's batch that starts at data index `start`."""
    return f"scores-{start:08d}.npz"


def checks_name(indices: Sequence[int]) -> str:
    """The file of Algorithm 1's chunk of these data indices."""
    digest = hashlib.sha256(json.dumps([int(i) for i in indices]).encode()).hexdigest()[:24]
    return f"checks-{digest}.npz"


def pack_scores(scores: Scores, skipped: Sequence[Skipped]) -> bytes:
    """One stage 0 batch as an archive's bytes: what a worker sends back and the cache keeps."""
    return archive_bytes(
        indices=scores.indices,
        embeddings=scores.embeddings,
        topk=scores.topk,
        probs=scores.probs,
        skipped=np.array(json.dumps([[s.path, s.reason] for s in skipped])),
        images_scored=np.array(len(scores.indices)),
    )


def pack_checks(
    checks: Sequence[ImageCheck], images_scored: int, failures: Sequence[FailureInfo] = ()
) -> bytes:
    """One chunk of Algorithm 1's checks (and the images in it that failed) as an archive's bytes."""
    arrays: dict[str, np.ndarray] = {}
    fields = []
    for i, check in enumerate(checks):
        fields.append(
            {
                "index": check.index,
                "pred": check.pred,
                "object_labels": list(check.object_labels),
                "disagrees": check.disagrees,
                "candidate": check.candidate is not None,
                "flip": check.flip,
                "ablated_pred": check.ablated_pred,
                "oracle_label": check.oracle_label,
            }
        )
        if check.candidate is not None:
            arrays[f"mask_{i}"] = check.candidate.mask
            arrays[f"box_{i}"] = np.asarray(check.candidate.box, np.float64)
    return archive_bytes(
        checks=np.array(json.dumps(fields, default=_plain)),
        failures=np.array(json.dumps([asdict(f) for f in failures])),
        images_scored=np.array(images_scored),
        **arrays,
    )


def archive_bytes(**arrays: np.ndarray) -> bytes:
    """`arrays` as the bytes of a compressed numpy archive (read back with allow_pickle=False)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _plain(value: object) -> object:
    """numpy scalars in ImageCheck fields -> JSON numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in the scan cache")
