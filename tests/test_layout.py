"""The buffers the kernels exchange (issue 18): each declared once by name in
``kernels/layout.py``; every slot constant is generated from the declaration, the partial
record is written and merged by field name and the metric vector stored by metric name."""
import inspect

import pytest

from isreshape_triton.kernels import finalize, layout, loss

RECORDS = [("S_", layout.STATS_FIELDS, layout.S_BASE_WIDTH), ("E_", layout.ELEMENT_FIELDS, layout.ELEMENT_WIDTH),
           ("C_", layout.CORR_FIELDS, layout.CORR_WIDTH),
           ("P_", layout.PARTIAL_FIELDS, layout.PARTIAL_WIDTH),
           ("M_", layout.METRIC_FIELDS, layout.METRIC_WIDTH)]


@pytest.mark.parametrize("prefix,fields,width", RECORDS, ids=[r[0] for r in RECORDS])
def test_slot_constants_follow_the_declaration(prefix, fields, width):
    offset = 0
    for f in fields:
        assert getattr(layout, prefix + f.name.upper()).value == offset
        offset += f.width
    assert offset == getattr(width, "value", width)


def test_the_partial_record_is_written_and_merged_by_field():
    written = inspect.getsource(loss._partial_record.fn)
    merged = inspect.getsource(finalize.merge_record.fn)
    for f in layout.PARTIAL_FIELDS:
        assert f.merge in ("sum", "max", "own") and f"put(r, P_{f.name.upper()}," in written, f
        assert (f"put(out, P_{f.name.upper()}," in merged) == (f.merge == "own"), f


def test_every_metric_is_stored_by_name():
    stored = inspect.getsource(finalize.finalize.fn)
    assert [name for name in layout.METRIC_SLOTS if f"tl.store(m + M_{name.upper()}," not in stored] == []
    assert "tl.store(m + M_EXTRAS + k," in stored  # the family's extra metrics


def test_partial_slots_follow_the_capabilities():
    every = layout.partial_slots(True, True, True, True, True, 5, True)
    assert every == (1 << layout.PARTIAL_WIDTH.value) - 1
    base = layout.partial_slots(False, False, False, False, False, 0)
    names = [f.name for f in layout.PARTIAL_FIELDS if (base >> getattr(layout, "P_" + f.name.upper()).value) & 1]
    assert names == ["n_all", "w_max", "phi_max", "z_all", "m2", "ess", "loss", "w", "phi", "nonfinite"]
    two_extras = layout.partial_slots(False, False, False, False, False, 2) ^ base
    assert two_extras == 0b11 << layout.P_EXTRAS.value
