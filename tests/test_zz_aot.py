"""The kernel specializations the test session launched (or, run alone, the representative
set) compile ahead of time for sm_90 with no spills.

Runs last (file order): the session fixture in conftest.py records every launch (~650
specializations). CI compiles a pairwise cover of them (``aot.pairwise_cover``: every pair of
argument types, constexpr values, options and alignments that the session launched together is
in one compiled specialization, ~110 of them; each value of a derived bitmask once); ``ISRESHAPE_AOT_ALL=1`` compiles every one.
Compilation happens in a subprocess without TRITON_INTERPRET; the report with registers, shared
memory and spills per specialization is written beside the test's temporary files and
summarised in the assertion messages.
"""
import json
import os

from isreshape_triton.dev import aot


def test_exercised_specializations_compile_for_sm90_without_spills(record_specializations, tmp_path):
    specs = list(record_specializations.values()) or aot.default_specs()
    if os.environ.get("ISRESHAPE_AOT_ALL") != "1":
        specs = aot.pairwise_cover(specs)
    rows = aot.run_in_subprocess(specs, tmp_path / "aot_report.json", timeout=2700)
    assert len(rows) == len(specs)
    errors = [(r["kernel"], r["constexprs"], r["error"][:300]) for r in rows if "error" in r]
    assert not errors, errors
    spills = [json.dumps(r, sort_keys=True) for r in rows if r["spill_stores"] != 0 or r["spill_loads"] != 0]
    assert not spills, "\n".join(spills)
    assert all(0 < r["registers"] <= 255 and r["local_bytes"] == 0 for r in rows)
    print(f"{len(rows)} specializations, max {max(r['registers'] for r in rows)} registers, no spills")


def test_pairwise_cover_keeps_every_pair_of_values():
    import itertools
    import random

    rng = random.Random(0)
    specs = [{"kernel": f"k{rng.randrange(2)}", "signature": {"x": rng.choice(["*fp32", "*bf16"])},
              "constexprs": {c: rng.randrange(n) for c, n in zip("ABCD", (2, 3, 4, 5))},
              "options": {"num_warps": rng.choice([4, 8])}} for _ in range(300)]
    specs = list({aot.spec_key(s): s for s in specs}.values())
    cover = aot.pairwise_cover(specs)
    assert len(cover) < len(specs) / 2 and all(s in specs for s in cover)

    def pairs(group):
        return {(s["kernel"],) + p for s in group for p in itertools.combinations(sorted(aot._features(s)), 2)}

    def slots(group):
        return {(s["kernel"], s["constexprs"].get("SLOTS")) for s in group}

    assert pairs(cover) == pairs(specs)
    mixed = [dict(s, constexprs=dict(s["constexprs"], SLOTS=i)) for i, s in enumerate(specs[:40])]
    assert slots(aot.pairwise_cover(mixed)) == slots(mixed)  # SINGLES: each value, not each pair
    assert aot.pairwise_cover(list(reversed(specs))) == cover  # deterministic
