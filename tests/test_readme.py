"""The README's speed tables are the committed benchmark results, not numbers typed by hand."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_speed_tables_are_regenerated_from_the_results(monkeypatch):
    from benchmarks import readme

    monkeypatch.chdir(ROOT)
    current = readme.README.read_text()
    assert readme.START in current and readme.END in current
    assert readme.rewritten(current) == current, "run: python -m benchmarks.readme"
    # Every figure the tables quote is in a result file: the scans' wall times among them.
    import json

    scans = json.loads((readme.RESULTS / "scan_engines.json").read_text())
    assert f"{scans['median_seconds']['torch']:.1f} s" in current
