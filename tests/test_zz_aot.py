"""Every kernel specialization the test session launched (or, run alone, the
representative set) compiles ahead of time for sm_90 with no spills.

Runs last (file order): the session fixture in conftest.py records every launch.
Compilation happens in a subprocess without TRITON_INTERPRET; the report with
registers, shared memory and spills per specialization is written beside the
test's temporary files and summarised in the assertion messages.
"""
import json

from isreshape_triton import aot


def test_exercised_specializations_compile_for_sm90_without_spills(record_specializations, tmp_path):
    specs = list(record_specializations.values()) or aot.default_specs()
    rows = aot.run_in_subprocess(specs, tmp_path / "aot_report.json", timeout=2700)  # ~550 specializations, 2 cores
    assert len(rows) == len(specs)
    errors = [(r["kernel"], r["constexprs"], r["error"][:300]) for r in rows if "error" in r]
    assert not errors, errors
    spills = [json.dumps(r, sort_keys=True) for r in rows if r["spill_stores"] != 0 or r["spill_loads"] != 0]
    assert not spills, "\n".join(spills)
    assert all(0 < r["registers"] <= 255 and r["local_bytes"] == 0 for r in rows)
    print(f"{len(rows)} specializations, max {max(r['registers'] for r in rows)} registers, no spills")
