"""The captioner (paper Sec. 5.2) as a task of the training core (`wsram_jax.training`).

    train_and_evaluate(config, workdir) -> final metrics       (`training.trainer.train_and_evaluate(TASK, ...)`)

Everything a run needs beyond the task -- the update itself, sweeps of R runs as one program, the data-parallel
mesh, resume, progress lines, metrics JSONL + TensorBoard, orbax checkpoints with fallback, the NaN guard, the
gradient-variance diagnostics and the cache of compiled functions -- comes from the core; `TASK` supplies the
captioner's pieces:

* its data (`load_task`): digit canvases generated on the device, or Flickr8k images and one of their captions,
  drawn by ``key_t = fold_in(state.key, t)`` (`TaskData.sample`);
* its loss, `captioning.loss.make_loss_fn` (the estimators of `wsram_jax.estimators`);
* evaluation (`make_task_evaluator`) on the fixed test split: greedy captions (the prior's mode glimpse, then the
  most probable word, `rollout.greedy_decode`) scored by corpus BLEU-1..4 (`captioning.bleu`, nltk) against
  the references, and ``eval/nll`` = -log p(y|a) of the first reference caption under M glimpse sequences
  from the prior, with ``eval/log_p_y`` its Eqn 9 bound (`estimators.log_marginal_bound`; prior proposal:
  log mean_m p(y|a^m)).

Training metrics logged against updates: ``train/nll`` (-log p(y|a) per caption, Figure 4), ``train/bound``,
``train/ess``, ``train/nll_per_word``, level usage.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from wsram_jax import attention
from wsram_jax import estimators
from wsram_jax import objectives as objectives_lib
from wsram_jax import proposals
from wsram_jax.captioning import bleu
from wsram_jax.captioning import data as digits_data
from wsram_jax.captioning import encoders
from wsram_jax.captioning import flickr8k
from wsram_jax.captioning import loss as loss_lib
from wsram_jax.captioning import model as model_lib
from wsram_jax.captioning import rollout as rollout_lib
from wsram_jax.captioning import vocab as vocab_lib
from wsram_jax.data import canvas as canvas_lib
from wsram_jax.data import mnist
from wsram_jax.training import config as config_lib
from wsram_jax.training import state as state_lib
from wsram_jax.training import step as step_lib
from wsram_jax.training import task as task_lib
from wsram_jax.training import trainer


TASKS = ("digits", "flickr8k")
ENCODERS = ("conv_pyramid",)


# ---------------------------------------------------------------------------------------------------------------
# Configuration.


_require = config_lib.require
_require_int = config_lib.require_int


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def task_spec(config) -> digits_data.TaskSpec:
  d = config.data
  return digits_data.TaskSpec(canvas_size=d.canvas_size, num_digits=d.num_digits, small_min=d.small_min,
                              small_max=d.small_max, large_min=d.large_min, large_max=d.large_max)


def image_side(config) -> int:
  return int(config.data.canvas_size if config.data.task == "digits" else config.data.image_size)


def validate(config) -> None:
  """The captioner's own checks (`Task.validate`): one `errors.ConfigError` sentence for the first invalid value
  of its model, data and evaluation keys."""
  _require(float(config.sleep_weight) == 0,
           "The sleep phase is implemented for the classifier only; set --config.sleep_weight=0.")
  _require(config.bleu_smoothing in bleu.SMOOTHING_METHODS,
           f"Unknown --config.bleu_smoothing {config.bleu_smoothing!r}; choose one of "
           f"{', '.join(bleu.SMOOTHING_METHODS)}.")

  m = config.model
  config_lib.check_model_block(m, model_lib.CaptionModel, derived=("vocab_size", "encoder"),
                               extra=NON_FIELD_MODEL_KEYS)
  _require(m.encoder in ENCODERS, f"Unknown --config.model.encoder {m.encoder!r}; choose one of {', '.join(ENCODERS)}.")
  channels = m.encoder_channels
  _require(isinstance(channels, (tuple, list)) and len(channels) >= 1 and all(_is_int(c) and c >= 1 for c in channels),
           f"--config.model.encoder_channels must be a non-empty tuple of positive integers, got {channels!r}.")
  _require_int("model.num_scales", m.num_scales)
  _require(m.num_scales <= len(channels),
           f"--config.model.num_scales ({m.num_scales}) cannot exceed the number of encoder blocks "
           f"({len(channels)}).")
  for name in ("feature_dim", "read_size", "embed_dim", "hidden_size", "glimpse_hidden", "attention_hidden",
               "lowres_size"):
    _require_int(f"model.{name}", m[name])
  _require_int("model.context_dim", m.context_dim, 0)
  config_lib.require_loc_std("model.loc_std", m.loc_std)
  _require(m.q_word in model_lib.Q_WORDS,
           f"Unknown --config.model.q_word {m.q_word!r}; choose one of {', '.join(model_lib.Q_WORDS)}.")

  d = config.data
  _require(d.task in TASKS, f"Unknown --config.data.task {d.task!r}; choose one of {', '.join(TASKS)}.")
  if d.task == "digits":
    _require(d.source in mnist.SOURCES,
             f"Unknown --config.data.source {d.source!r}; choose one of {', '.join(mnist.SOURCES)}.")
    task_spec(config).check()
  else:
    _require(bool(d.flickr8k_json) and bool(d.flickr8k_images),
             "--config.data.task=flickr8k needs --config.data.flickr8k_json (Karpathy's dataset_flickr8k.json) "
             "and --config.data.flickr8k_images (the image folder).")
    _require_int("data.max_words", d.max_words)
    _require_int("data.min_word_count", d.min_word_count)
    _require_int("data.image_size", d.image_size, 8)
  side = image_side(config)
  _require(side // 2 ** len(channels) >= 1,
           f"{len(channels)} encoder blocks halve the {side} px image to nothing; use fewer blocks.")
  _require(m.lowres_size <= side,
           f"--config.model.lowres_size ({m.lowres_size}) cannot exceed the image size ({side}).")
  _require_int("data.num_test", d.num_test)
  _require_int("data.eval_batch_size", d.eval_batch_size)


# ---------------------------------------------------------------------------------------------------------------
# Data.


class TaskData(NamedTuple):
  """What a run trains and evaluates on.

  Attributes:
    vocab: the `Vocabulary`.
    train: device arrays the jitted sampler draws from (a dict).
    sample: ``(key, train, batch_size) -> (images float32 [B, H, W, C], captions int32 [B, T + 1])`` (jit-able).
    test_images: ``[E, H, W, C]`` uint8.
    test_captions: ``[E, T + 1]`` int32, one reference per image (for the NLL).
    test_references: per test image, its tokenised references (for BLEU).
    caption_length: T.
  """
  vocab: vocab_lib.Vocabulary
  train: dict
  sample: Callable[..., tuple[jax.Array, jax.Array]]
  test_images: np.ndarray
  test_captions: np.ndarray
  test_references: list
  caption_length: int


def load_task(config) -> TaskData:
  d = config.data
  if d.task == "digits":
    spec = task_spec(config)
    data_dir = d.data_dir or None
    classes = len(digits_data.DIGIT_WORDS)  # a caption names each digit's class
    images, labels = mnist.load_mnist("train", source=d.source, data_dir=data_dir, num_classes=classes)
    test_images, test_labels = mnist.load_mnist("test", source=d.source, data_dir=data_dir, num_classes=classes)
    test = digits_data.fixed_test_set(test_images, test_labels, spec, seed=d.test_seed, num=int(d.num_test))

    def sample(key, train, batch_size):
      ex = digits_data.sample_batch(key, train["images"], train["labels"], batch_size, spec)
      return ex.canvas, ex.caption

    refs = [[digits_data.VOCAB.decode(c)] for c in test.caption]
    return TaskData(vocab=digits_data.VOCAB, train={"images": jnp.asarray(images), "labels": jnp.asarray(labels)},
                    sample=sample, test_images=test.canvas, test_captions=test.caption, test_references=refs,
                    caption_length=spec.caption_length)

  ds = flickr8k.load_flickr8k(d.flickr8k_json, d.flickr8k_images, image_size=int(d.image_size),
                              max_words=int(d.max_words), min_count=int(d.min_word_count),
                              splits=("train", "test"))
  tr, te = ds.splits["train"], ds.splits["test"]
  num = config_lib.capped("data.num_test", int(d.num_test), te.images.shape[0], "Flickr8k test images")

  def sample(key, train, batch_size):
    k_index, k_ref = jax.random.split(key)
    index = jax.random.randint(k_index, (batch_size,), 0, train["images"].shape[0])
    refs = train["num_refs"][index]
    ref = jnp.minimum((jax.random.uniform(k_ref, (batch_size,)) * refs).astype(jnp.int32), refs - 1)
    return canvas_lib.to_float(train["images"][index]), train["captions"][index, ref]

  train = {"images": jnp.asarray(tr.images), "captions": jnp.asarray(tr.captions),
           "num_refs": jnp.asarray(tr.num_refs)}
  return TaskData(vocab=ds.vocab, train=train, sample=sample, test_images=te.images[:num],
                  test_captions=te.captions[:num, 0], test_references=te.references[:num],
                  caption_length=int(d.max_words) + 1)


# ---------------------------------------------------------------------------------------------------------------
# Model, state.


# The keys of `config.model` that are not fields of `CaptionModel`: the encoder's (built here, its weights loaded by
# `create_train_state`) and the word the inference network sees (the rollout's `q_word`).
NON_FIELD_MODEL_KEYS = ("encoder", "encoder_channels", "encoder_weights", "q_word")


def build_model(config, vocab_size: int) -> model_lib.CaptionModel:
  """The `CaptionModel` of `config.model`: its encoder from ``encoder`` and ``encoder_channels``, every other
  field from the key of the same name."""
  m = config.model
  encoder = model_lib.ConvPyramid(channels=tuple(int(c) for c in m.encoder_channels), num_levels=m.num_scales)
  fields = {k: m[k] for k in m if k not in NON_FIELD_MODEL_KEYS}
  return model_lib.CaptionModel(vocab_size=vocab_size, encoder=encoder, **fields)


def image_shape(config) -> tuple[int, int, int]:
  side = image_side(config)
  return (side, side, 1 if config.data.task == "digits" else 3)


def init_params(config, model, key):
  """Fresh parameters of `model`; the encoder's replaced by ``config.model.encoder_weights`` when given."""
  params = model_lib.init_params(model, key, image_shape(config))
  if config.model.encoder_weights:
    params = encoders.replace_encoder(params, config.model.encoder_weights)
  return params


def train_arrays(task: TaskData) -> tuple[dict]:
  """What the step draws its batches from: the dict of device arrays of `TaskData.train`."""
  return (task.train,)


def make_sampler(config, task: TaskData) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """``sample(key, train) -> (images float32 [B, H, W, C], captions int32 [B, T + 1])`` (`TaskData.sample`)."""
  sample, batch_size = task.sample, config.batch_size  # not `task`: a cached step must not keep the test split

  return lambda key, train: sample(key, train, batch_size)


def make_loss_fn(config, model):
  """``loss_fn(params, batch, key, baseline_value, hyper)``: the captioner's loss (`captioning.loss.make_loss_fn`)."""
  return loss_lib.make_loss_fn(objectives_lib.ObjectiveConfig.from_config(config), model,
                               q_word=config.model.q_word)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation.


@functools.lru_cache(maxsize=16)
def make_decoder(model, max_len: int) -> Callable[[Any, jax.Array], rollout_lib.Decoded]:
  """``decode(params, images uint8/float [B, H, W, C]) -> Decoded`` (greedy, jitted; one per model)."""

  @functools.partial(jax.jit, compiler_options=step_lib.compiler_options())
  def decode(params, images):
    images = canvas_lib.to_float(images)
    return jax.vmap(lambda im: rollout_lib.greedy_decode(params, im, model=model, max_len=max_len))(images)

  return decode


@functools.lru_cache(maxsize=16)
def _nll_batch(model, num_samples: int, q_word: str):
  """``(params, images, captions, mask, key, hyper) -> sums of the NLL and of the Eqn 9 bound`` (jitted; one per
  model; ``hyper``, the run's own numbers, may set the model's ``loc_std``)."""

  @functools.partial(jax.jit, compiler_options=step_lib.compiler_options())
  def nll_batch(params, images, captions, mask, key, hyper):
    traj = loss_lib.batched_rollout(params, canvas_lib.to_float(images), captions, key,
                                    model=attention.model_for_run(model, hyper), proposal=proposals.prior,
                                    num_samples=num_samples, q_word=q_word)
    bound = estimators.log_marginal_bound(traj.log_p_y)  # Eqn 9; prior as proposal: log w = log p(y|a)
    return {"nll": jnp.sum(-jnp.mean(traj.log_p_y, -1) * mask), "log_p_y": jnp.sum(bound * mask)}

  return nll_batch


def make_task_evaluator(config, model, task: TaskData) -> Callable[..., dict]:
  """``evaluate(params, hyper)``: BLEU-1..4 of greedy captions and the NLL of the references on the fixed test
  split (deterministic); ``hyper`` is the run's own numbers (``{}`` for a single run)."""
  decode = make_decoder(model, task.caption_length)
  nll_batch = _nll_batch(model, int(config.num_samples), config.model.q_word)

  e = int(config.data.eval_batch_size)
  n = task.test_images.shape[0]
  key = jax.random.PRNGKey(int(config.data.get("test_seed", 0)) + 1)

  def evaluate(params, hyper):
    hyps, totals = [], {}
    for start in range(0, n, e):
      index = np.minimum(np.arange(start, start + e), n - 1)
      mask = (np.arange(start, start + e) < n).astype(np.float32)
      dec = jax.device_get(decode(params, task.test_images[index]))
      hyps += [task.vocab.decode(t) for t in dec.tokens[:min(e, n - start)]]
      out = nll_batch(params, task.test_images[index], task.test_captions[index], mask,
                      jax.random.fold_in(key, start), hyper)
      for k, v in out.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    scores = bleu.corpus_bleu(task.test_references, hyps, smoothing=config.bleu_smoothing)
    metrics = {f"eval/{k}": v for k, v in scores.items()}
    metrics.update({f"eval/{k}": v / n for k, v in totals.items()})
    metrics["eval/exact_match"] = float(np.mean([h in r for h, r in zip(hyps, task.test_references)]))
    return metrics

  return evaluate


# ---------------------------------------------------------------------------------------------------------------
# The captioner's entry points: the core's, with `TASK` (defined at the end of the module).


def validate_config(config) -> None:
  """Raises `errors.ConfigError` (one sentence) for any invalid value, before anything is loaded or compiled
  (`training.trainer.validate_config`: the shared checks, then the captioner's own)."""
  trainer.validate_config(TASK, config)


def create_train_state(config, model, optimizer) -> state_lib.TrainState:
  """Fresh parameters, optimiser and baseline state (`training.trainer.create_train_state`)."""
  return trainer.create_train_state(TASK, config, model, optimizer)


def make_train_step(config, model, optimizer, task: TaskData) -> Callable[..., tuple[state_lib.TrainState, dict]]:
  """``step(state, train_arrays) -> (state, metrics)``, jitted (one per configuration;
  `training.trainer.make_train_step`)."""
  return trainer.make_train_step(TASK, config, model, optimizer, task)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a run) and returns the last value of every metric."""
  return trainer.train_and_evaluate(TASK, config, workdir)


@dataclasses.dataclass
class Restored:
  """A trained run, for plots and examples: the model, its state, the task and a jitted greedy decoder."""
  model: model_lib.CaptionModel
  state: state_lib.TrainState
  task: TaskData
  decode: Callable[[Any, Any], rollout_lib.Decoded]
  step: int


def restore(config, workdir: str, task: Optional[TaskData] = None, run: Optional[int] = None) -> Restored:
  """The newest readable checkpoint of `workdir` (`errors.CheckpointError` if none): every run of a sweep stacked,
  or with `run` that run alone, its own model and state (`trainer.restore_run`)."""
  validate_config(config)
  task = task or load_task(config)
  if run is None:
    model, state, step = trainer.restore_latest(TASK, config, workdir, task)
  else:
    model, state, step, _ = trainer.restore_run(TASK, config, workdir, run, task)
  return Restored(model=model, state=state, task=task, decode=make_decoder(model, task.caption_length),
                  step=int(step))


def summary(last: dict[str, Any]) -> str:
  """One line with the numbers a run ends on (one per run, labelled, for several runs; `run_summary`)."""
  return trainer.summary(TASK, last)


def run_summary(last: dict[str, Any]) -> str:
  """One run's line: test BLEU-1..4 (x100, as in Table 2), test NLL and the training NLL the run ends on."""
  parts = []
  if all(f"eval/bleu{n}" in last for n in (1, 2, 3, 4)):
    parts.append("test BLEU-1..4 " + " / ".join(f"{100 * last[f'eval/bleu{n}']:.1f}" for n in (1, 2, 3, 4)))
  for name, key, fmt in (("test NLL", "eval/nll", "{:.3f}"), ("test log p(y|I) >=", "eval/log_p_y", "{:.3f}"),
                         ("train NLL", "train/nll", "{:.3f}"), ("ESS", "train/ess", "{:.2f}")):
    if key in last:
      parts.append(f"{name} {fmt.format(last[key])}")
  return "; ".join(parts)


TASK = task_lib.Task(
    name="captioner", validate=validate, load_data=load_task, train_arrays=train_arrays, make_sampler=make_sampler,
    build_model=lambda config, task: build_model(config, len(task.vocab)), init_params=init_params,
    make_loss=make_loss_fn, make_evaluator=make_task_evaluator, summary=run_summary,
    progress_keys=("train/nll", "train/bound", "train/ess"))
