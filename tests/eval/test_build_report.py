"""bench/report/build_report.py: target verdicts, README section replaced in place, plots made,
missing or unknown result files tolerated."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "report"))
import build_report  # noqa: E402


def result(label, method, bits, ppl):
    return {"label": label, "method": method, "params": {}, "bits_per_element": bits, "ppl": ppl,
            "seconds": 1.0}


FIDELITY = [
    result("fp16", "fp16", 16.0, 10.0),
    result("KIVI-2", "kivi", 3.0, 12.0),
    result("KIVI-4", "kivi", 5.0, 10.2),
    result("KVQuant-4", "kvquant", 4.5, 10.04),  # +0.4% at 4.5 bits (<= 4.3 + 0.25): met
    result("KVQuant-3", "kvquant", 3.4, 10.3),   # +3% at 3.4 bits: not met
    result("HF quanto int2", "hf-quanto", 2.0, 9.0),  # baselines never count for kvpack
]


def test_target_verdicts():
    lines = build_report.target_verdicts(FIDELITY)
    assert "**met**" in lines[0] and "KVQuant-4" in lines[0] and "+0.40%" in lines[0]
    assert "**not met**" in lines[1] and "KVQuant-3" in lines[1]
    assert "**not met**" in lines[2] and "no kvpack method" in lines[2]
    # KIVI-2 at 3.0 bits: nothing else at <= 3.0 bits; KIVI-4 at 5.0: KVQuant-4 (10.04 < 10.2)
    assert "**not met**" in lines[3] and "KIVI-2" in lines[3]
    assert "**met**" in lines[4] and "KIVI-4" in lines[4]


def test_report_section_is_replaced_in_place(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "fidelity_test.json").write_text(json.dumps({"model": "m", "results": FIDELITY}))
    (results / "broken.json").write_text("{not json")
    (results / "kvstore_other.json").write_text(json.dumps({"rows": []}))
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n## someone else's section\n\nkeep me\n")
    assert build_report.main(["--results", str(results), "--readme", str(readme)]) == 0
    first = readme.read_text()
    assert first.startswith("# Benchmarks\n\n## someone else's section\n\nkeep me\n")
    assert first.count(build_report.BEGIN) == 1 and "| KVQuant-4 |" in first
    assert "`kvstore_other.json`" in first
    assert (results / "plots" / "ppl_vs_bits_fidelity_test.png").stat().st_size > 10_000
    readme.write_text(first + "\n## a later section\n")
    assert build_report.main(["--results", str(results), "--readme", str(readme)]) == 0
    second = readme.read_text()
    assert second == first + "\n## a later section\n"


def test_empty_results_folder(tmp_path):
    readme = tmp_path / "README.md"
    (tmp_path / "results").mkdir()
    assert build_report.main(["--results", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    assert build_report.BEGIN in readme.read_text()


def test_no_fp16_no_verdicts():
    assert build_report.target_verdicts(FIDELITY[1:]) == [
        "no fp16 result: targets cannot be judged"]
