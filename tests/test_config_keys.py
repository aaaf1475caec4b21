"""Every key of the config files is read by something; every model and objective setting has a key; the sleep
phase and a user's own proposal are reachable from the command line."""
import contextlib
import dataclasses
import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from conftest import apply_overrides, tiny_caption_overrides, tiny_overrides, write_flickr_fixture
from experiments.configs import captions as caption_configs
from experiments.configs import mnist as mnist_configs
from wsram_jax import errors
from wsram_jax import objectives
from wsram_jax.captioning import model as caption_model
from wsram_jax.captioning import train as caption_train
from wsram_jax.classifier import model as classifier_model
from wsram_jax.classifier import train as classifier_train
from wsram_jax.training import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ConfigDict = ml_collections.ConfigDict


def _leaves(config, prefix=()) -> set[tuple[str, ...]]:
  out = set()
  for k, v in config._fields.items():  # pylint: disable=protected-access  (no read of the values)
    out |= _leaves(v, prefix + (k,)) if isinstance(v, ConfigDict) else {prefix + (k,)}
  return out


class _ReadRecorder:
  """Records the key paths read from a ConfigDict tree by item or attribute access (also from copies made by
  `copy_and_resolve_references`), except inside whole-config serialisations (to_json, to_dict, printing), which
  read every key and use none."""

  def __init__(self):
    self.paths: dict[int, tuple[str, ...]] = {}
    self.read: set[tuple[str, ...]] = set()
    self.quiet = 0

  def register(self, node, prefix=()):
    self.paths[id(node)] = prefix
    for k, v in node._fields.items():  # pylint: disable=protected-access
      if isinstance(v, ConfigDict):
        self.register(v, prefix + (k,))

  @contextlib.contextmanager
  def patched(self, monkeypatch):
    original_getitem = ConfigDict.__getitem__
    recorder = self

    def getitem(self, key):
      value = original_getitem(self, key)
      if not recorder.quiet and id(self) in recorder.paths and isinstance(key, str) and "." not in key:
        recorder.read.add(recorder.paths[id(self)] + (key,))
      return value

    def quiet(method):
      original = getattr(ConfigDict, method)

      def wrapped(self, *args, **kwargs):
        recorder.quiet += 1
        try:
          result = original(self, *args, **kwargs)
        finally:
          recorder.quiet -= 1
        if method == "copy_and_resolve_references" and id(self) in recorder.paths:
          recorder.register(result, recorder.paths[id(self)])
        return result

      return wrapped

    monkeypatch.setattr(ConfigDict, "__getitem__", getitem)
    for method in ("to_json", "to_json_best_effort", "to_dict", "__repr__", "__str__", "__eq__",
                   "copy_and_resolve_references"):
      monkeypatch.setattr(ConfigDict, method, quiet(method))
    yield self


def _unread(recorder, *configs) -> list[str]:
  keys = set().union(*(_leaves(c) for c in configs))
  return sorted(".".join(k) for k in keys - recorder.read)


def test_every_classifier_config_key_is_read(tiny_mnist_dir, tmp_path, monkeypatch):
  config = apply_overrides(mnist_configs.get_config("wsram_q_cv"), tiny_overrides(tiny_mnist_dir))
  recorder = _ReadRecorder()
  recorder.register(config)
  with recorder.patched(monkeypatch):
    classifier_train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not _unread(recorder, config), f"config keys nothing reads: {_unread(recorder, config)}"


def test_every_captioner_config_key_is_read(tiny_mnist_dir, tmp_path, monkeypatch):
  digits = apply_overrides(caption_configs.get_config("wsram_q_cv"), tiny_caption_overrides(tiny_mnist_dir))
  digits.diag_every = 2
  json_path, image_dir = write_flickr_fixture(tmp_path / "flickr")
  flickr = apply_overrides(caption_configs.get_config("var_cv"), {
      **tiny_caption_overrides(tiny_mnist_dir), "data.task": "flickr8k", "data.flickr8k_json": str(json_path),
      "data.flickr8k_images": str(image_dir), "data.image_size": 16, "data.max_words": 4,
      "data.min_word_count": 1})
  recorder = _ReadRecorder()
  recorder.register(digits)
  recorder.register(flickr)
  with recorder.patched(monkeypatch):
    caption_train.train_and_evaluate(digits, str(tmp_path / "run"))
    caption_train.validate_config(flickr)
    caption_train.build_model(flickr, len(caption_train.load_task(flickr).vocab))
  # Both configs come from the same file: a key counts when either run reads it.
  keys = _leaves(digits)
  assert keys == _leaves(flickr)
  unread = sorted(".".join(k) for k in keys - recorder.read)
  assert not unread, f"config keys nothing reads: {unread}"


@pytest.mark.parametrize("variant", mnist_configs.VARIANTS)
def test_every_model_and_objective_setting_has_a_key(variant):
  for config, model_cls, derived, extra in (
      (mnist_configs.get_config(variant), classifier_model.AttentionModel, (), ()),
      (caption_configs.get_config(variant), caption_model.CaptionModel, ("vocab_size", "encoder"),
       caption_train.NON_FIELD_MODEL_KEYS)):
    config_lib.check_model_block(config.model, model_cls, derived=derived, extra=extra)
    keys = set(config.keys()) | set(config.heuristics.keys())
    fields = {f.name for f in dataclasses.fields(objectives.ObjectiveConfig)}
    assert fields <= keys, sorted(fields - keys)


def test_a_model_field_without_a_key_or_a_key_without_a_field_is_refused(tiny_config):
  config = tiny_config()
  del config.model["head_init_scale"]
  with pytest.raises(errors.ConfigError, match="lacks the AttentionModel settings head_init_scale"):
    classifier_train.validate_config(config)
  config = tiny_config()
  config.model.unlock()
  config.model.dropout = 0.5
  with pytest.raises(errors.ConfigError, match="does not have: dropout"):
    classifier_train.validate_config(config)


def test_objective_config_rejects_inconsistent_settings_itself():
  with pytest.raises(ValueError, match="samples from the prior"):
    objectives.ObjectiveConfig(method="var", proposal="inference_network")
  with pytest.raises(ValueError, match="samples from the prior"):
    objectives.ObjectiveConfig(method="vimco", proposal="defensive_mixture")
  with pytest.raises(ValueError, match="untempered prior"):
    objectives.ObjectiveConfig(method="vimco", temperature=1.5)
  with pytest.raises(ValueError, match="sleep phase"):
    objectives.ObjectiveConfig(method="var", sleep_weight=1.0)
  assert objectives.ObjectiveConfig(method="var").proposal == "prior"
  assert objectives.ObjectiveConfig().proposal == "inference_network"


# ---------------------------------------------------------------------------------------------------------------
# The binaries: the sleep phase, and a proposal written outside the package.

_USER_PROPOSAL = textwrap.dedent("""
    import math

    def wide_prior(ctx):
      '''The prior with twice its location std.'''
      return ctx.prior._replace(loc_log_std=ctx.prior.loc_log_std + math.log(2.0))

    NOT_A_FUNCTION = 3
    """)


def _run(binary, config, workdir, *flags, pythonpath=None):
  env = dict(os.environ)
  if pythonpath:
    env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
  cmd = [sys.executable, "-m", binary, f"--config={config}", f"--workdir={workdir}", *flags]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def _flags(overrides):
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def test_sleep_phase_from_the_command_line(tiny_mnist_dir, tmp_path):
  overrides = {**tiny_overrides(tiny_mnist_dir), "num_steps": 2, "eval_every": 2, "diag_every": 0}
  proc = _run("experiments.train", "experiments/configs/mnist.py:wsram_q_cv", tmp_path / "w",
              *_flags(overrides), "--config.sleep_weight=1.0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  from wsram_jax.training import metric_writers  # pylint: disable=g-import-not-at-top
  records = metric_writers.read_metrics(str(tmp_path / "w"))
  assert any("train/loss_sleep" in r for r in records)


@pytest.mark.parametrize("binary, config, overrides", [
    ("experiments.train", "experiments/configs/mnist.py:wsram_q_cv", "classifier"),
    ("experiments.train_captions", "experiments/configs/captions.py:wsram_q_cv", "captioner"),
])
def test_a_proposal_from_the_users_own_module_trains_from_the_binaries(binary, config, overrides, tiny_mnist_dir,
                                                                        tmp_path):
  user_dir = tmp_path / "user"
  (user_dir / "mypkg").mkdir(parents=True)
  (user_dir / "mypkg" / "__init__.py").write_text("")
  (user_dir / "mypkg" / "proposals.py").write_text(_USER_PROPOSAL)
  base = (tiny_overrides(tiny_mnist_dir) if overrides == "classifier" else tiny_caption_overrides(tiny_mnist_dir))
  flags = _flags({**base, "num_steps": 2, "eval_every": 2, "diag_every": 0})
  proc = _run(binary, config, tmp_path / "w", *flags, "--config.proposal=mypkg.proposals:wide_prior",
              pythonpath=user_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "w" / "metrics.jsonl").exists()
  for bad, match in (("mypkg.nowhere:f", "cannot import 'mypkg.nowhere'"),
                     ("mypkg.proposals:missing", "has no attribute 'missing'"),
                     ("mypkg.proposals:NOT_A_FUNCTION", "is a int, not a function")):
    proc = _run(binary, config, tmp_path / "bad", *flags, f"--config.proposal={bad}", pythonpath=user_dir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert match in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
