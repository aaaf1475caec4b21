"""The package's layers (docs/ARCHITECTURE.md): the two tasks sit side by side on the training core, the core
imports neither task, and the objective layer imports no model."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "wsram_jax"


def _imports(path: pathlib.Path) -> set[str]:
  """The wsram_jax modules `path` imports (``from wsram_jax.x import y`` counts as ``wsram_jax.x.y`` and
  ``wsram_jax.x``)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return {m for m in out if m.startswith("wsram_jax")}


def _modules(*parts: str) -> list[pathlib.Path]:
  base = PACKAGE.joinpath(*parts)
  return sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]


@pytest.mark.parametrize("layer, forbidden", [
    (("captioning",), ("wsram_jax.classifier",)),
    (("classifier",), ("wsram_jax.captioning",)),
    (("training",), ("wsram_jax.classifier", "wsram_jax.captioning")),
    (("objectives",), ("wsram_jax.classifier", "wsram_jax.captioning", "wsram_jax.training")),
    (("attention",), ("wsram_jax.classifier", "wsram_jax.captioning", "wsram_jax.training",
                      "wsram_jax.objectives")),
])
def test_layer_imports(layer, forbidden):
  files = _modules(*layer)
  assert files
  for path in files:
    bad = sorted(m for m in _imports(path) if m.startswith(forbidden))
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}"


def test_math_layer_imports_nothing_above_it():
  math_modules = ("actions", "baselines", "diagnostics", "estimators", "exploration", "glimpse", "proposals",
                  "toy", "errors")
  allowed = {f"wsram_jax.{m}" for m in math_modules} | {"wsram_jax"}
  for name in math_modules:
    for path in _modules(name):
      extra = {m for m in _imports(path) if m.rsplit(".", 1)[0] not in allowed and m not in allowed}
      assert not extra, f"{name} imports {sorted(extra)}"
