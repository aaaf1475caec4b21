"""The PyTorch side of `benchmarks.step`: the peer's step (`benchmarks.torch_peer`), eager at each thread count and
compiled in each `torch.compile` mode, and its glimpses alone, as closures the interleaved rounds time.

Importing this module needs no torch; every function returns nothing to time (and says why) when torch is not
installed (``make bench`` installs it).
"""
from __future__ import annotations

import importlib.util
import time
from typing import Any, Callable

import numpy as np

__all__ = ["INSTALL_HINT", "torch_installed", "peers", "glimpse_timers"]

INSTALL_HINT = "make bench installs it into .venv"


def torch_installed() -> bool:
  """Whether torch can be imported (without importing it)."""
  try:
    return importlib.util.find_spec("torch") is not None
  except ValueError:  # a stub module without a spec
    return False


def _one_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def peers(config, images: np.ndarray, labels: np.ndarray, *, threads: tuple[int, ...],
          compile_modes: tuple[str, ...], compile_threads: tuple[int, ...] = (0,), warmup: int,
          log: Callable[[str], None]) -> tuple[dict[str, Callable[[], Any]], dict[str, dict[str, Any]]]:
  """``(timers, info)``: a closure per peer that runs one step on its thread count, and what each is.

  Eager: ``eager_{t}t`` for every `threads` entry (0 = torch's default, all cores). Compiled:
  ``compiled_{mode}_{t}t`` for every mode of `compile_modes` and every `compile_threads` entry, compiled and run
  on that thread count (Inductor generates its C++ kernels for the thread count they are compiled with);
  ``info[name]['compile_s']`` is its first step, compilation included.
  A mode that fails to compile or run is left out, with ``info[name]['error']`` (one line). Every peer is warmed
  up by `warmup` steps. All start from the JAX model's initial parameters (seed ``config.seed``).
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    log(f"PyTorch is not installed: no peer ({INSTALL_HINT}).")
    return {}, {}
  import jax  # pylint: disable=g-import-not-at-top

  from benchmarks import torch_peer  # pylint: disable=g-import-not-at-top
  from wsram_jax.classifier import model as networks  # pylint: disable=g-import-not-at-top
  from wsram_jax.classifier import train  # pylint: disable=g-import-not-at-top

  default_threads = torch.get_num_threads()
  params = networks.init_params(train.build_model(config), jax.random.PRNGKey(config.seed))
  cfg = torch_peer.PeerConfig.from_config(config, train.canvas_kwargs(config))
  timers, info = {}, {}

  def make_run(peer, t):
    def run():
      torch.set_num_threads(t)
      peer.step()
    return run

  eager = torch_peer.TorchPeer(cfg, params, images, labels, seed=config.seed)
  for t in dict.fromkeys(t or default_threads for t in threads):
    run = make_run(eager, t)
    for _ in range(warmup):
      run()
    timers[f"eager_{t}t"] = run
    info[f"eager_{t}t"] = {"kind": "eager", "threads": t}
  for mode, t in [(mode, t) for mode in compile_modes for t in dict.fromkeys(t or default_threads
                                                                            for t in compile_threads)]:
    name = f"compiled_{mode}_{t}t"
    info[name] = {"kind": "compiled", "mode": mode, "threads": t}
    peer = torch_peer.TorchPeer(cfg, params, images, labels, seed=config.seed, compile_mode=mode)
    run = make_run(peer, t)
    log(f"  torch.compile(mode={mode!r}, dynamic=False), {t} threads: compiling ...")
    t0 = time.perf_counter()
    try:
      for _ in range(warmup):
        run()
    except Exception as e:  # pylint: disable=broad-except  (a mode that does not work here is a result too)
      info[name]["error"] = _one_line(e)
      log(f"  torch.compile(mode={mode!r}) failed: {info[name]['error']}")
      continue
    info[name]["compile_s"] = peer.compile_s
    info[name]["warmup_s"] = round(time.perf_counter() - t0, 3)
    log(f"  torch.compile(mode={mode!r}): first step {peer.compile_s} s")
    timers[name] = run
  torch.set_num_threads(default_threads)
  return timers, info


def glimpse_timers(canvases: np.ndarray, loc: np.ndarray, scale: np.ndarray, *, size: int,
                   num_scales: int) -> dict[str, Callable[[], Any]]:
  """The peer's vectorised glimpses and the per-example crop loop (`torch_peer.crop_loop_glimpse`) of
  ``canvases [B, H, W]`` at ``loc [B, M, 2]``, ``scale [B, M]``; none without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from benchmarks import torch_peer  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {}
  tc, tl, ts = torch.tensor(canvases), torch.tensor(loc), torch.tensor(scale, dtype=torch.long)
  kw = dict(size=size, num_scales=num_scales, canvas_hw=tuple(canvases.shape[1:3]))

  def vectorised():
    torch_peer.glimpse(torch_peer.pad_canvases(tc, size=size, num_scales=num_scales), tl, ts, **kw)

  def crop_loop():
    torch_peer.crop_loop_glimpse(torch_peer.pad_canvases(tc, size=size, num_scales=num_scales), tl, ts, **kw)

  return {"torch_vectorised": vectorised, "torch_crop_loop": crop_loop}
