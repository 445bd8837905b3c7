"""Segmenting ahead of the scoring: in parallel for a thread-safe oracle, one image at a time
for any other, and each image's segments are that image's."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np

from auditor.oracle import Segment
from auditor.scan.check import SegmentAhead, segment_workers


class _RecordingOracle:
    """Gives each image one segment whose mask encodes the image's value; counts overlapping calls."""

    name = "recording"
    runtime = "test"

    def __init__(self, thread_safe: bool) -> None:
        self.thread_safe = thread_safe
        self.inside = 0
        self.most_inside = 0
        self.lock = threading.Lock()

    def segments(self, image: np.ndarray) -> list[Segment]:
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        time.sleep(0.05)  # long enough for a second worker to enter if there is one
        with self.lock:
            self.inside -= 1
        return [Segment.from_mask(image[..., 0] == image[0, 0, 0])]


def _segment_all(oracle: _RecordingOracle, count: int) -> list[tuple[np.ndarray, list[Segment]]]:
    images = {i: np.full((4, 4, 3), i, np.uint8) for i in range(count)}
    ctx = SimpleNamespace(oracle=oracle, image=lambda index: images[index])
    with SegmentAhead(ctx) as ahead:  # type: ignore[arg-type]
        ahead.request(list(range(count)))
        return [ahead.get(i) for i in range(count)]


def test_a_thread_safe_oracle_segments_in_parallel_and_each_image_keeps_its_segments(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    oracle = _RecordingOracle(thread_safe=True)
    results = _segment_all(oracle, 8)
    assert oracle.most_inside == segment_workers() == 2
    for index, (image, segments) in enumerate(results):
        assert image[0, 0, 0] == index and segments[0].area == 1.0


def test_an_oracle_that_is_not_thread_safe_is_never_entered_twice(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    oracle = _RecordingOracle(thread_safe=False)
    _segment_all(oracle, 6)
    assert oracle.most_inside == 1


def test_a_process_given_one_thread_segments_on_one(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    oracle = _RecordingOracle(thread_safe=True)
    _segment_all(oracle, 6)
    assert segment_workers() == 1 and oracle.most_inside == 1
