"""The family architecture (issue 18): a family is its module in ``isreshape_triton/families/``
and its device module in ``kernels/families/``; every table derives from the declarations, and
the shared code (kernels, op, reference, metrics) never names a family."""
import ast
import dataclasses
import importlib
from pathlib import Path

import pytest

import isreshape_triton as irt
from isreshape_triton import reference
from isreshape_triton.families import FAMILIES, kernel_family
from isreshape_triton.family import GAMMA_MODES, Family
from isreshape_triton.kernels import layout
from isreshape_triton.metrics import COMMON, GAMMA_STATS, metric_names

ROOT = Path(__file__).resolve().parent.parent
NAMES = tuple(FAMILIES)


def test_the_registry_is_the_family_modules():
    modules = sorted(p.stem for p in (ROOT / "isreshape_triton" / "families").glob("*.py") if p.stem != "__init__")
    assert list(NAMES) == modules and irt.LOSS_TYPES == NAMES
    for name, family in FAMILIES.items():
        assert isinstance(family, Family) and family.name == name


@pytest.mark.parametrize("name", NAMES)
def test_a_family_declares_everything_the_package_derives(name):
    family = FAMILIES[name]
    assert dataclasses.is_dataclass(family.params) and family.params.__dataclass_params__.frozen
    params = irt.make_params(name)
    assert type(params) is family.params and getattr(irt, family.params.__name__) is family.params
    assert getattr(reference, name) is family.reference is reference.FAMILIES[name]
    assert metric_names(name) == COMMON + (GAMMA_STATS if family.gamma_stats else ()) + family.metrics
    assert set(metric_names(name)) <= set(layout.METRIC_SLOTS), "a metric the kernels do not compute"
    kernel = kernel_family(name, params)
    assert kernel.name == name and kernel.gamma_mode in GAMMA_MODES
    assert (kernel.gamma_stats, kernel.row_weight) == (family.gamma_stats, family.row_weight)
    device = importlib.import_module(f"isreshape_triton.kernels.families.{name}")
    assert callable(device.token) and hasattr(device, "row_weight") == family.row_weight


def _family_mentions(path: Path) -> list:
    """Identifiers and string constants naming a family (a default argument value aside)."""
    tree = ast.parse(path.read_text())
    defaults = {id(d) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                for d in f.args.defaults + f.args.kw_defaults if d is not None}
    hits = []
    for node in ast.walk(tree):
        word = (node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute)
                else node.value if isinstance(node, ast.Constant) and id(node) not in defaults else None)
        if isinstance(word, str) and word.lower() in NAMES:
            hits.append(f"{path.relative_to(ROOT)}:{node.lineno} {word}")
    return hits


def test_the_shared_code_never_names_a_family():
    """No family id, name test or special case in the kernels, the op, the reference or the metrics
    (the adapters and the development tooling aside)."""
    own = ("families", "integrations", "dev")
    shared = [p for p in (ROOT / "isreshape_triton").rglob("*.py")
              if not set(p.relative_to(ROOT / "isreshape_triton").parts[:-1]) & set(own)]
    shared += sorted((ROOT / "kernels").glob("*.py"))
    assert not [hit for path in shared for hit in _family_mentions(path)]


def test_setup_installs_every_package():
    """A wheel holds every package of the tree (the family modules and their device modules too)."""
    setup = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(setup) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    declared = set(ast.literal_eval(next(k.value for k in call.keywords if k.arg == "packages")))
    tree = {".".join(("isreshape_triton",) + p.parent.relative_to(ROOT / "isreshape_triton").parts)
            for p in (ROOT / "isreshape_triton").rglob("__init__.py")}
    tree |= {".".join(("isreshape_triton", "kernels") + p.parent.relative_to(ROOT / "kernels").parts)
             for p in (ROOT / "kernels").rglob("__init__.py")}
    assert declared == tree
