"""The supported version window (SPEC §14) and the compat module (kernels/compat.py).

Runs on the newest and on the oldest declared Triton (tests/oldest_triton.txt): the import
check's messages, setup.py declaring the same window, and the fast division compiling to
``div.approx`` (no IEEE fix-up) whichever way this Triton spells it.
"""
import os
import re
import subprocess
import sys

import pytest
import torch
import triton

from isreshape_triton import versions
from isreshape_triton.kernels import compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_installed_versions_are_inside_the_window():
    assert versions.version_tuple(torch.__version__) >= versions.TORCH_MIN
    assert versions.TRITON_MIN <= versions.version_tuple(triton.__version__) < versions.TRITON_BEYOND
    assert versions.installed_triton() == triton.__version__


@pytest.mark.parametrize("text,expected", [("3.6.0", (3, 6)), ("2.13.0+cpu", (2, 13)), ("3.7.0.dev20260101", (3, 7)),
                                           ("3.10rc1", (3, 10)), ("2.9", (2, 9))])
def test_version_tuple(text, expected):
    assert versions.version_tuple(text) == expected


@pytest.mark.parametrize("torch_v,triton_v,match", [
    ("2.8.1", "3.4.0", r"torch >= 2\.9; torch 2\.8\.1 is installed"),
    ("2.13.0", "3.4.0", r"triton >= 3\.5, < 4\.0 .*triton 3\.4\.0 is installed"),
    ("2.13.0", "4.0.0", r"triton >= 3\.5, < 4\.0 .*triton 4\.0\.0 is installed"),
])
def test_outside_the_window_import_error_names_version_and_range(torch_v, triton_v, match):
    with pytest.raises(ImportError, match=match):
        versions.check(torch_v, triton_v)


@pytest.mark.parametrize("torch_v,triton_v", [("2.9.0", "3.5.0"), ("2.11.0", "3.6.0"), ("2.14.1", "3.8.0"),
                                              ("2.15.0", "3.9.0"), ("2.13.0+cpu", None)])
def test_inside_the_window_imports(torch_v, triton_v):
    versions.check(torch_v, triton_v)


def test_import_raises_for_an_unsupported_triton():
    """The check runs when the package is imported (a Triton 3.4 stand-in in a fresh process)."""
    code = ("import importlib.metadata as md; real = md.version\n"
            "md.version = lambda d: '3.4.0' if d == 'triton' else real(d)\n"
            "import isreshape_triton")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0
    assert re.search(r"ImportError: isreshape_triton needs triton >= 3\.5, < 4\.0 .*3\.4\.0 is installed", out.stderr)


def test_setup_declares_the_same_window():
    setup = open(os.path.join(ROOT, "setup.py")).read()
    fmt = lambda v: ".".join(map(str, v))  # noqa: E731
    assert f'"torch>={fmt(versions.TORCH_MIN)}"' in setup
    assert f'"triton>={fmt(versions.TRITON_MIN)},<{versions.TRITON_BEYOND[0]}"' in setup


def test_run_sh_tests_the_oldest_triton():
    run_sh = open(os.path.join(ROOT, "run.sh")).read()
    oldest = re.search(r"^OLDEST_TRITON=(\S+)", run_sh, re.M).group(1)
    assert versions.version_tuple(oldest) == versions.TRITON_MIN


def test_compat_picks_the_division_this_triton_has():
    assert compat.HAS_APPROX_FDIV == (versions.version_tuple(triton.__version__) >= (3, 9))


def test_fast_division_compiles_to_div_approx_for_sm90(tmp_path, monkeypatch):
    """``common.fast_div`` is one MUFU.RCP and a multiply (``div.approx.f32``): no FCHK range
    check and no call to the IEEE slow path, unlike ``tl.math.div_rn`` (the control)."""
    from isreshape_triton.dev import aot

    specs = [{"kernel": "_sass_kernels:fast_div_kernel",
              "signature": {"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"},
              "constexprs": {"IEEE": ieee, "BLOCK_T": 256}, "options": {"num_warps": 4, "num_stages": 1}}
             for ieee in (False, True)]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.path.dirname(__file__), ROOT, os.environ.get("PYTHONPATH", "")]))
    fast, ieee = aot.run_in_subprocess(specs, tmp_path / "report.json", timeout=600, sass=True)
    for row in (fast, ieee):
        assert "error" not in row, row.get("error")
    assert "MUFU.RCP" in fast["sass"] and "FCHK" not in fast["sass"] and "CALL" not in fast["sass"]
    assert "FCHK" in ieee["sass"]
