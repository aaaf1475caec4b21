"""Corpus BLEU-1..4 (Papineni et al. 2002) with nltk's maintained implementation, not a hand-written one.

``BLEU-n = BP * exp(sum_{k<=n} (1/n) log p_k)``: `nltk.translate.bleu_score.corpus_bleu` with uniform weights
over the 1..n-gram precisions (the "cumulative" BLEU-n that caption papers report, e.g. the paper's Table 2),
clipped counts and the brevity penalty pooled over the whole corpus (not an average of sentence scores).
Scores are in [0, 1]; multiply by 100 to compare with the paper.

Smoothing (``smoothing``, a name of `nltk.translate.bleu_score.SmoothingFunction`'s methods): the default
``'method1'`` adds epsilon = 0.1 to the numerator of an n-gram precision whose corpus-wide match count is 0; it
changes a score only in that case, where the unsmoothed score is exactly 0 (nltk then also warns). With any
matches of every order, as for a trained model on a corpus of hundreds of captions, ``'method1'`` and
``'method0'`` (no smoothing, as in the coco-caption toolkit) give identical numbers.
"""
from __future__ import annotations

from typing import Sequence

from nltk.translate import bleu_score

from wsram_jax.errors import ConfigError

__all__ = ["corpus_bleu", "SMOOTHING_METHODS", "WEIGHTS"]

SMOOTHING_METHODS = tuple(f"method{i}" for i in range(8))
WEIGHTS = {n: tuple([1.0 / n] * n) for n in (1, 2, 3, 4)}


def corpus_bleu(references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]], *,
                smoothing: str = "method1") -> dict[str, float]:
  """``{'bleu1': ..., 'bleu4': ...}`` of tokenised hypotheses against their reference lists.

  Args:
    references: per hypothesis, a list of one or more tokenised reference captions.
    hypotheses: the tokenised generated captions (without <bos>/<eos>).
    smoothing: a `SmoothingFunction` method name (see the module docstring).

  Returns:
    The four cumulative BLEU scores in [0, 1].
  """
  if smoothing not in SMOOTHING_METHODS:
    raise ConfigError(f"Unknown BLEU smoothing {smoothing!r}; choose one of {', '.join(SMOOTHING_METHODS)}.")
  if len(references) != len(hypotheses) or not hypotheses:
    raise ValueError(f"corpus_bleu needs one reference list per hypothesis (and at least one), got "
                     f"{len(references)} and {len(hypotheses)}.")
  refs = [[list(r) for r in rs] for rs in references]
  hyps = [list(h) for h in hypotheses]
  fn = getattr(bleu_score.SmoothingFunction(), smoothing)
  return {f"bleu{n}": float(bleu_score.corpus_bleu(refs, hyps, weights=w, smoothing_function=fn))
          for n, w in WEIGHTS.items()}
