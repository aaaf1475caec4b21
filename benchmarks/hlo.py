"""The compiled step's HLO: every dot with its shapes and FLOPs, counts of what the step compiled to, and a jitted
batch of exactly the step's dots (the practical matmul peak that `benchmarks.step` measures utilisation against)."""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["dot_shapes", "hlo_stats", "matmul_batch"]

_INSTR = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = (\w+)\[([\d,]*)\]")
_DOT = re.compile(r"= \w+\[[\d,]*\]\S* dot\((%[\w.\-]+), (%[\w.\-]+)\), (.*)")


def _dims(text: str, name: str) -> tuple[int, ...]:
  m = re.search(name + r"=\{([\d,]*)\}", text)
  return tuple(int(x) for x in m.group(1).split(",") if x) if m else ()


def dot_shapes(hlo: str) -> list[dict[str, Any]]:
  """Every dot of an optimised HLO module (also inside fusions): operand shapes, dimension numbers, FLOPs."""
  shapes = {}
  for line in hlo.splitlines():
    m = _INSTR.match(line)
    if m:
      shapes[m.group(1)] = tuple(int(x) for x in m.group(3).split(",") if x)
  dots = []
  for line in hlo.splitlines():
    m = _DOT.search(line)
    if not m or m.group(1) not in shapes or m.group(2) not in shapes:
      continue
    lhs, rhs, rest = shapes[m.group(1)], shapes[m.group(2)], m.group(3)
    lc, rc = _dims(rest, "lhs_contracting_dims"), _dims(rest, "rhs_contracting_dims")
    lb, rb = _dims(rest, "lhs_batch_dims"), _dims(rest, "rhs_batch_dims")
    out = [lhs[i] for i in lb] + [d for i, d in enumerate(lhs) if i not in lc + lb] + \
        [d for i, d in enumerate(rhs) if i not in rc + rb]
    flops = 2 * int(np.prod(out, dtype=np.int64)) * int(np.prod([lhs[i] for i in lc], dtype=np.int64))
    dots.append(dict(lhs=lhs, rhs=rhs, dims=((lc, rc), (lb, rb)), flops=flops))
  return dots


def hlo_stats(hlo: str) -> dict[str, int]:
  """Counts in the optimised HLO: fusions (compiled kernels and library calls), while loops, dots, gathers."""
  return {"fusions": hlo.count(" fusion("), "while_loops": hlo.count(" while("), "dots": len(dot_shapes(hlo)),
          "gathers": hlo.count(" gather("), "scatters": hlo.count(" scatter("), "lines": hlo.count("\n")}


def matmul_batch(dots: list[dict[str, Any]], seed: int = 0) -> tuple[Callable[[], Any], int]:
  """A jitted function running every dot in ``dots`` once on random operands, and its FLOPs."""
  rng = np.random.default_rng(seed)
  lhs = [jnp.asarray(rng.standard_normal(d["lhs"]), jnp.float32) for d in dots]
  rhs = [jnp.asarray(rng.standard_normal(d["rhs"]), jnp.float32) for d in dots]
  dims = [d["dims"] for d in dots]

  @jax.jit
  def run_all(lhs, rhs):
    return [jax.lax.dot_general(a, b, dn) for a, b, dn in zip(lhs, rhs, dims)]

  return (lambda: jax.block_until_ready(run_all(lhs, rhs))), sum(d["flops"] for d in dots)

