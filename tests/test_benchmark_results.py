"""README's performance numbers trace to committed JSON: every result file it names exists, and the engine
rows regenerate from that JSON (`python -m benchmarks.engine_bench --table`), answered queries only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks.engine_bench import main, table_rows

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def test_every_result_file_named_in_readme_is_committed():
    text = (REPO / "README.md").read_text()
    kinds = "engine|pipeline|scaling|label|densify|reconstruct|object|ibims|depth_bench|stop_rule|marked_batch"
    named = set(re.findall(rf"`((?:{kinds})[\w.-]*\.json)`", text))
    assert len(named) >= 10  # the table cites its JSON (the pattern still matches README's way of naming them)
    missing = sorted(n for n in named if not (RESULTS / n).is_file())
    assert not missing, f"README cites result files that are not committed: {missing}"


def test_engine_rows_come_from_the_committed_json(capsys):
    rows = {r["file"]: r for r in table_rows(RESULTS / "engine_bench-H200-20261130-fp8-ray3.json")}
    row = rows["engine_bench-H200-20261130-fp8-ray3.json"]
    assert (row["answered q/s"], row["engines/GPU"], row["weights"], row["GPU busy"]) == ("780.6", "3", "fp8", "0.95")
    assert main(["--table"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("engine_bench-H200-20261130-") >= 12 and "| 615.8 | 4 | bf16 |" in printed


def test_a_row_with_errors_counts_answered_queries_and_is_marked_invalid(tmp_path):
    f = tmp_path / "engine_bench-x.json"
    f.write_text(json.dumps({"benchmark": "densify engine_bench", "rows": [
        {"variant": "v", "queries": 1000, "errors": 250, "wall_s": 2.0},
        {"variant": "w", "queries": 1000, "answered": 1000, "errors": 0, "wall_s": 4.0, "valid": True}]}))
    bad, good = table_rows(f)
    assert bad["answered q/s"] == "375.0" and bad["valid"] == "INVALID (250 errors)"
    assert good["answered q/s"] == "250.0" and good["valid"] == "yes"
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "densify label_bench"}))
    with pytest.raises(ValueError, match="not an engine_bench result"):
        table_rows(tmp_path / "other.json")
