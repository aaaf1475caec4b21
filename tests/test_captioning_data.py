"""The caption task, vocabularies, the Flickr8k loader, BLEU and encoder weight files."""
import json

import jax
import numpy as np
import pytest
from nltk.translate import bleu_score

from conftest import synthetic_digits, write_flickr_fixture
from wsram_jax import errors
from wsram_jax.captioning import bleu
from wsram_jax.captioning import data
from wsram_jax.captioning import encoders
from wsram_jax.captioning import flickr8k
from wsram_jax.captioning import model as model_lib
from wsram_jax.captioning import vocab as vocab_lib
from wsram_jax.data import canvas as canvas_lib

SPEC = data.TaskSpec(canvas_size=48, small_min=10, small_max=12, large_min=18, large_max=22)


# --------------------------------------------------------------------------------------------------------------
# Vocabulary.


def test_vocabulary_reserved_ids_and_round_trip():
  v = vocab_lib.Vocabulary(["a", "dog"])
  assert v.tokens[:4] == ("<pad>", "<bos>", "<eos>", "<unk>") and len(v) == 6
  ids = v.encode(["a", "cat", "dog"], 7)
  np.testing.assert_array_equal(ids, [1, 4, 3, 5, 2, 0, 0])
  assert v.decode(ids) == ["a", "<unk>", "dog"]
  np.testing.assert_array_equal(v.encode(["a", "dog", "a", "dog"], 4), [1, 4, 5, 2])  # cut to fit <eos>
  built = vocab_lib.build_vocabulary([["b", "a"], ["a", "c"], ["a", "b"]], min_count=2)
  assert built.tokens[4:] == ("a", "b")
  with pytest.raises(errors.ConfigError):
    vocab_lib.Vocabulary(["a", "a"])
  assert data.VOCAB.tokens[4:] == data.WORDS and len(data.VOCAB) == 21


# --------------------------------------------------------------------------------------------------------------
# The digit caption task.


@pytest.fixture(scope="module")
def test_split():
  images, labels = synthetic_digits(64, seed=3)
  return data.fixed_test_set(images, labels, SPEC, seed=5, num=64, chunk_size=32), images


def _parse(words, num_digits):
  """words -> [(size, digit)], [relation] following the documented grammar (fails on anything else)."""
  nps, rels, i = [], [], 0
  for j in range(num_digits):
    if j > 0:
      if words[i] == "left":
        assert words[i + 1] == "of"
        rels.append("left of")
        i += 2
      else:
        assert words[i] in ("above", "below"), words
        rels.append(words[i])
        i += 1
    assert words[i] == "a" and words[i + 1] in ("small", "large") and words[i + 2] in data.DIGIT_WORDS, words
    nps.append((words[i + 1], int(words[i + 2])))
    i += 3
  assert i == len(words), words
  return nps, rels


def test_captions_describe_the_canvases(test_split):
  ex, _ = test_split
  assert ex.canvas.shape == (64, 48, 48, 1) and ex.canvas.dtype == np.uint8
  assert ex.caption.shape == (64, SPEC.caption_length + 1)
  assert not ex.overlap.any()
  relations = set()
  for j in range(64):
    caption = ex.caption[j]
    assert caption[0] == vocab_lib.BOS_ID
    nps, rels = _parse(data.VOCAB.decode(caption), SPEC.num_digits)
    boxes = ex.boxes[j]
    sides = boxes[:, 2] - boxes[:, 0]
    np.testing.assert_array_equal(sides, boxes[:, 3] - boxes[:, 1])
    # Sizes: the side lies in the range of its class.
    for side, large in zip(sides, ex.large[j]):
      lo, hi = (SPEC.large_min, SPEC.large_max) if large else (SPEC.small_min, SPEC.small_max)
      assert lo <= side <= hi
    # Order: left to right by box centre; sizes and digits follow.
    cx, cy = (boxes[:, 1] + boxes[:, 3]) / 2, (boxes[:, 0] + boxes[:, 2]) / 2
    order = np.argsort(cx, kind="stable")
    assert nps == [("large" if ex.large[j][k] else "small", int(ex.digits[j][k])) for k in order]
    for r, (a, b) in zip(rels, zip(order[:-1], order[1:])):
      dx, dy = cx[b] - cx[a], cy[b] - cy[a]
      assert r == ("left of" if dx >= abs(dy) else "above" if dy > 0 else "below")
      relations.add(r)
    # Ink only inside the boxes, boxes apart.
    inside = np.zeros((48, 48), bool)
    for t, l, b, r in boxes:
      inside[t:b, l:r] = True
    assert ex.canvas[j, ..., 0][~inside].max() == 0
    assert ex.canvas[j, ..., 0][inside].max() > 100
    assert bool(data._apart(boxes[0], boxes[1], SPEC.margin))  # pylint: disable=protected-access
  assert relations == {"left of", "above", "below"}


def test_test_split_is_a_function_of_the_seed(test_split):
  ex, images = test_split
  labels = synthetic_digits(64, seed=3)[1]
  prefix = data.fixed_test_set(images, labels, SPEC, seed=5, num=32, chunk_size=32)
  np.testing.assert_array_equal(prefix.canvas, ex.canvas[:32])
  np.testing.assert_array_equal(prefix.caption, ex.caption[:32])
  other = data.fixed_test_set(images, labels, SPEC, seed=6, num=32, chunk_size=32)
  assert not np.array_equal(other.boxes, ex.boxes[:32])


def test_sample_batch_and_box_depends_on_key_only():
  images, labels = synthetic_digits(16)
  ex = data.sample_batch(jax.random.PRNGKey(0), images, labels, 4, SPEC)
  assert ex.canvas.shape == (4, 48, 48, 1) and ex.canvas.dtype == np.float32
  assert ex.caption.shape == (4, SPEC.caption_length + 1) and ex.boxes.shape == (4, 2, 4)
  # The task computes boxes with a 1x1 stand-in digit: place_digit's box must not depend on the digit.
  key = jax.random.PRNGKey(7)
  _, box_real = canvas_lib.place_digit(key, images[0], canvas_size=48, min_size=10, max_size=22)
  _, box_tiny = canvas_lib.place_digit(key, np.zeros((1, 1), np.float32), canvas_size=48, min_size=10,
                                       max_size=22)
  np.testing.assert_array_equal(box_real, box_tiny)


def test_task_spec_rejects_bad_sizes():
  with pytest.raises(errors.ConfigError, match="must not overlap"):
    data.TaskSpec(small_max=24).check()
  with pytest.raises(errors.ConfigError, match="2 or 3"):
    data.TaskSpec(num_digits=4).check()


# --------------------------------------------------------------------------------------------------------------
# Flickr8k.


def test_flickr8k_loader(tmp_path):
  json_path, image_dir = write_flickr_fixture(tmp_path)
  ds = flickr8k.load_flickr8k(json_path, image_dir, image_size=16, max_words=4, min_count=2)
  # Training words (restval counts as train) seen twice: a (4), dog (2); lower-cased.
  assert ds.vocab.tokens[4:] == ("a", "dog")
  tr, te, va = ds.splits["train"], ds.splits["test"], ds.splits["val"]
  assert tr.filenames == ["a.png", "b.jpg"] and te.filenames == ["c.png"] and va.filenames == ["d.png"]
  assert tr.images.shape == (2, 16, 16, 3) and tr.images.dtype == np.uint8
  assert tr.captions.shape == (2, 2, 6) and te.captions.shape == (1, 3, 6)
  np.testing.assert_array_equal(tr.num_refs, [2, 1])
  np.testing.assert_array_equal(tr.captions[0, 0], [1, 4, 5, 3, 2, 0])  # <bos> a dog <unk> <eos>
  np.testing.assert_array_equal(tr.captions[1, 1], 0)  # a missing reference is all <pad>
  assert ds.vocab.decode(tr.captions[1, 0]) == ["a", "<unk>", "<unk>", "<unk>"]  # cut to max_words
  assert te.references[0] == [["a", "dog", "sits"], ["the", "dog"], ["a", "red", "ball"]]


def test_flickr8k_loader_errors(tmp_path):
  json_path, image_dir = write_flickr_fixture(tmp_path)
  (image_dir / "c.png").unlink()
  with pytest.raises(errors.DataError, match="c.png"):
    flickr8k.load_flickr8k(json_path, image_dir, image_size=8)
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(errors.DataError, match="JSON"):
    flickr8k.load_flickr8k(bad, image_dir)
  with pytest.raises(errors.DataError, match="does not exist"):
    flickr8k.load_flickr8k(tmp_path / "nope.json", image_dir)
  bad.write_text(json.dumps({"images": [{"filename": "x.png", "split": "train"}]}))
  with pytest.raises(errors.DataError, match="sentences"):
    flickr8k.load_flickr8k(bad, image_dir)


# --------------------------------------------------------------------------------------------------------------
# BLEU.


def test_bleu_equals_nltk():
  refs = [[["a", "small", "3", "left", "of", "a", "large", "7"]],
          [["a", "dog", "runs", "on", "the", "grass"], ["the", "dog", "is", "running"]],
          [["a", "large", "0", "above", "a", "small", "5"]]]
  hyps = [["a", "small", "3", "left", "of", "a", "small", "7"], ["a", "dog", "is", "running"],
          ["a", "large", "0", "below", "a", "small", "5"]]
  got = bleu.corpus_bleu(refs, hyps)
  smooth = bleu_score.SmoothingFunction().method1
  for n, w in ((1, (1.0,)), (2, (0.5, 0.5)), (3, (1 / 3,) * 3), (4, (0.25,) * 4)):
    want = bleu_score.corpus_bleu(refs, hyps, weights=w, smoothing_function=smooth)
    assert got[f"bleu{n}"] == pytest.approx(want, abs=1e-12)
  assert got["bleu1"] > got["bleu4"] > 0
  perfect = bleu.corpus_bleu([[h] for h in hyps], hyps, smoothing="method0")
  assert all(v == pytest.approx(1.0) for v in perfect.values())
  with pytest.raises(errors.ConfigError, match="smoothing"):
    bleu.corpus_bleu(refs, hyps, smoothing="laplace")


# --------------------------------------------------------------------------------------------------------------
# Encoder weight files.


def test_encoder_weights_round_trip_and_mismatch(tmp_path):
  enc = model_lib.ConvPyramid(channels=(4, 6), num_levels=2)
  params = enc.init(jax.random.PRNGKey(0), np.zeros((16, 16, 3), np.float32))["params"]
  path = encoders.save_encoder_params(tmp_path / "enc.npz", {"encoder": params})
  with np.load(path) as z:
    assert sorted(z.files) == ["conv_0/bias", "conv_0/kernel", "conv_1/bias", "conv_1/kernel"]
  zeros = jax.tree_util.tree_map(np.zeros_like, params)
  loaded = encoders.load_encoder_params(path, zeros)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, jax.device_get(params))
  other = model_lib.ConvPyramid(channels=(4, 8), num_levels=2).init(
      jax.random.PRNGKey(0), np.zeros((16, 16, 3), np.float32))["params"]
  with pytest.raises(errors.DataError, match="shape"):
    encoders.load_encoder_params(path, other)
  with pytest.raises(errors.DataError, match="does not exist"):
    encoders.load_encoder_params(tmp_path / "none.npz", params)
