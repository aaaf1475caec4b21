"""The layers of docs/ARCHITECTURE.md, checked on the imports of every module: each imports only from its own layer
and the layers below (the three tasks side by side, none importing another; the core imports no task; the data
imports nothing above it), the training core's modules keep their order, the library imports neither the
experiments nor the tests, no test module imports another, and experiments/ and benchmarks/ import each other
one way at most."""
import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "wsram_jax"

# Every top-level module or package of wsram_jax, by layer, bottom first: name -> (members, what it may import
# besides its own members).
_BELOW_TASKS = {"errors", "report_files", "math", "data", "plots", "attention", "objectives", "training"}
LAYERS = {
    "errors": ({"errors"}, set()),
    "report_files": ({"report_files"}, {"errors"}),
    "math": ({"actions", "baselines", "diagnostics", "estimators", "exploration", "glimpse", "proposals", "toy"},
             {"errors"}),
    "data": ({"data"}, {"errors"}),
    "plots": ({"plots"}, {"errors", "report_files"}),
    "attention": ({"attention"}, {"errors", "math"}),
    "objectives": ({"objectives"}, {"errors", "math", "attention"}),
    "training": ({"training"}, {"errors", "report_files", "math", "data", "plots", "attention", "objectives"}),
    "classifier": ({"classifier"}, _BELOW_TASKS),
    "captioning": ({"captioning"}, _BELOW_TASKS),
    "toy_task": ({"toy_task"}, _BELOW_TASKS),
}
# The training core's modules in order: each imports only modules before it.
TRAINING_ORDER = ("signals", "checkpoints", "metric_writers", "memory", "config", "state", "workdir", "progress",
                  "resume", "task", "runs", "step", "loop", "trainer", "cli")


def _imports(path: pathlib.Path) -> set[str]:
  """Every module `path` imports, at any depth (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


def _layer_of(module: str) -> str:
  """The layer of ``wsram_jax.x[.y...]``."""
  top = module.split(".")[1]
  return next(name for name, (members, _) in LAYERS.items() if top in members)


def _package_modules():
  return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def _module_name(path: pathlib.Path) -> str:
  return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_every_module_of_the_package_has_a_layer():
  placed = set().union(*(members for members, _ in LAYERS.values()))
  tops = {_module_name(p).split(".")[1] for p in _package_modules()}
  assert tops <= placed, f"modules in no layer of tests/test_layers.py: {sorted(tops - placed)}"
  assert set(TRAINING_ORDER) == {p.stem for p in (PACKAGE / "training").glob("*.py")} - {"__init__"}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_a_layer_imports_only_itself_and_the_layers_below(layer):
  members, allowed = LAYERS[layer]
  files = [p for p in _package_modules() if _module_name(p).split(".")[1] in members]
  assert files
  for path in files:
    imported = {m for m in _imports(path) if m.startswith("wsram_jax.")}
    bad = sorted(m for m in imported if _layer_of(m) != layer and _layer_of(m) not in allowed)
    assert not bad, f"{path.relative_to(ROOT)} ({layer}) imports {bad}"


def test_the_training_core_keeps_its_order():
  for i, name in enumerate(TRAINING_ORDER):
    later = {f"wsram_jax.training.{m}" for m in TRAINING_ORDER[i:]}
    bad = sorted(_imports(PACKAGE / "training" / f"{name}.py") & later - {f"wsram_jax.training.{name}"})
    assert not bad, f"wsram_jax/training/{name}.py imports {bad}, which come after it in TRAINING_ORDER"


def test_the_library_imports_no_experiment_benchmark_or_test():
  for path in _package_modules():
    bad = sorted(m for m in _imports(path) if m.split(".")[0] in ("experiments", "benchmarks", "tests", "conftest")
                 or m.split(".")[0].startswith("test_"))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_no_test_module_imports_another_or_edits_the_import_path():
  for path in sorted((ROOT / "tests").glob("*.py")):
    bad = sorted(m for m in _imports(path) if m.split(".")[0].startswith("test_"))
    assert not bad, f"{path.relative_to(ROOT)} imports the test modules {bad}; shared helpers go in conftest.py"
    assert not re.search(r"sys\.path\.(insert|append)\(", path.read_text(encoding="utf-8")), \
        f"{path.relative_to(ROOT)} edits the import path"


def _cross_imports(tree: str, other: str) -> list[str]:
  """``'tree/file.py -> other.module'`` for every import in `tree`'s files of a module of `other`."""
  return sorted(f"{p.relative_to(ROOT)} -> {m}" for p in sorted((ROOT / tree).rglob("*.py"))
                for m in _imports(p) if m.split(".")[0] == other and "." in m)


def test_experiments_and_benchmarks_import_each_other_one_way_at_most():
  forward, backward = _cross_imports("experiments", "benchmarks"), _cross_imports("benchmarks", "experiments")
  if forward and backward and all(e.startswith("experiments/benchmark.py ->") for e in forward):
    pytest.xfail("the known cycle: experiments/benchmark.py imports benchmarks/ and benchmarks/ imports "
                 "experiments/ (its owner is removing it)")
  assert not (forward and backward), f"a cycle between the trees: {forward} and {backward}"
