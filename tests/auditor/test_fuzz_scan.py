"""A slice of the scan fuzzer (`benchmarks/fuzz_scan.py`): every data kind on every engine.

33 cases: random-init tiny ViTs and ModifiedResNets at 32-64 px, fp32 and fp16 checkpoints,
each of the fuzzer's data kinds on torch, ONNX fp32 and ONNX int8. Every scan must exit 0 or 1
with a report that reads back, or 2 with one error line where the data is unusable. The full
run (500+ scans, ViT-B-32 and a random SAM) is the benchmark.
"""

from __future__ import annotations

import pytest

from benchmarks.fuzz_scan import DATA_KINDS, ENGINES, draw_cases, run_cases, summarize


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory):
    cases = draw_cases(len(DATA_KINDS) * len(ENGINES), seed=1, max_size=64)
    return run_cases(cases, tmp_path_factory.mktemp("fuzz"), progress=False)


def test_the_slice_covers_every_data_kind_engine_and_tower(fuzz_results):
    assert len(fuzz_results) >= 30
    assert {(r["data"], r["engine"]) for r in fuzz_results} == {(d, e) for d in DATA_KINDS for e in ENGINES}
    assert {r["tower"] for r in fuzz_results} == {"vit", "resnet"}


def test_every_fuzzed_scan_ends_with_a_report_or_a_one_line_refusal(fuzz_results):
    summary = summarize(fuzz_results)
    assert summary["failures"] == []
    assert summary["internal_errors"] == 0
    refused = [r for r in fuzz_results if r["exit"] == 2]
    assert refused and all(
        r["data"] == "one-class" and "cannot be audited" in str(r["error"]) for r in refused
    )
