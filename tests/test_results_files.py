"""benchmarks/RESULTS.md and the README's table are what the result files give; the results folder holds only what
they cite."""

from __future__ import annotations

import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def make_results():
    sys.path.insert(0, BENCHMARKS)
    try:
        import make_results

        yield make_results
    finally:
        sys.path.remove(BENCHMARKS)


def test_results_md_and_readme_table_are_generated_from_the_files(make_results, capsys):
    assert make_results.main(["--check"]) == 0, capsys.readouterr().err


def test_the_check_sees_a_stale_table(make_results, monkeypatch, tmp_path):
    stale = tmp_path / "RESULTS.md"
    stale.write_text("# Results\n\nedited by hand\n")
    monkeypatch.setattr(make_results, "RESULTS_MD", str(stale))
    assert make_results.main(["--check"]) == 1
    assert stale.read_text() == "# Results\n\nedited by hand\n"  # --check never writes


def test_the_results_folder_holds_only_cited_files(make_results):
    present = set()
    for root, _, files in os.walk(make_results.RESULTS_DIR):
        present |= {os.path.relpath(os.path.join(root, f), make_results.RESULTS_DIR) for f in files}
    cited = make_results.cited_files()
    assert not cited - present, f"cited but missing: {sorted(cited - present)}"
    assert not present - cited, f"cited by neither README nor RESULTS.md: {sorted(present - cited)}"


def test_a_time_ratio_is_flagged_busy_by_the_load_while_timed(make_results):
    """Runs that record the load right after their timed phases are judged by it; older ones by the load at their
    end (which an evaluation beside them, after calibration, would raise)."""
    end_busy = {"machine": {"cores": 2, "load_average_end": [3.5, 3.0, 3.0]}}
    assert make_results._busy(end_busy, {})
    alone = {"fwd_bwd_load_average": [2.1, 2.0, 1.9], "calibration_load_average": [2.2, 2.1, 2.0]}
    assert not make_results._busy(end_busy, alone)
    end_quiet = {"machine": {"cores": 2, "load_average_end": [1.0, 1.0, 1.0]}}
    assert make_results._busy(end_quiet, alone | {"calibration_load_average": [3.4, 3.0, 2.5]})
