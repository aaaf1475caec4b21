"""Writing report files (tables, JSON, figures) so that no report destroys a result already written.

Every binary that writes a report (`experiments.table1`, `select_lr`, `search`, `budget`, `grad_variance`,
`caption_report`, the benchmarks) writes it through a `Report`:

    with report_files.Report(force=FLAGS.force) as out:
      out.refuse_empty(finished_runs, f"{root} holds no finished run")        one line, exit 2, nothing written
      out.guard(path, counts, read_counts, default_destination=...)          each file it will replace
      out.write_json(path, obj); out.write_text(path2, text)                 staged beside their destination
      fig.savefig(out.path(path3))
    # leaving the block renames every staged file into place; an exception leaves every old file as it was

* **No report from nothing.** `refuse_empty` raises `errors.ReportRefused` (exit 2) when the inputs hold no
  finished run: a mistyped --root cannot turn a table into "not run".
* **Never a less complete report over a more complete one.** A writer measures a report by named counts
  (``{"finished runs": 24, "updates": 1_200_000}``), from the content alone, so that the file on disk is measured
  by the same function (`guard`'s `read_counts`). A file that would be replaced by a report with a smaller count
  of any kind is refused, unless ``force``. The check applies to *protected* destinations: a flag's default
  (``results/...``), or any path inside this checkout (where the committed results live); a destination given
  explicitly outside the checkout (a scratch directory) is the user's to overwrite.
* **Atomic.** Each file is written to a temporary file in its destination's directory and renamed into place
  (`os.replace`), so an interrupted report leaves the old file whole; the files of one report are renamed only
  after all of them were written (`Report`). `replacing(path)` does the same for a single file.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from typing import Any, Callable, Iterator, Mapping, Optional

from wsram_jax import errors

__all__ = ["Report", "replacing", "write_text", "write_json", "checkout_root", "protected", "is_default",
           "describe", "FORCE_HELP"]

log = logging.getLogger(__name__)

Counts = Mapping[str, float]

FORCE_HELP = ("Write the report even over a more complete one (a file with more finished runs than this report "
              "has); without it such a file is kept and the binary exits with 2.")


def checkout_root() -> Optional[str]:
  """The git checkout this package lives in (the directory above ``wsram_jax/`` when it holds ``.git``), or None
  for an installed package."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return root if os.path.exists(os.path.join(root, ".git")) else None


def _inside(path: str, directory: str) -> bool:
  path, directory = os.path.realpath(path), os.path.realpath(directory)
  return os.path.commonpath([path, directory]) == directory


def protected(path: str, *, default_destination: bool) -> bool:
  """Whether an existing file at `path` may only be replaced by a report at least as complete: written to a flag's
  default destination, or anywhere inside this checkout."""
  root = checkout_root()
  return default_destination or (root is not None and _inside(path, root))


def is_default(value: Optional[str], default: Optional[str]) -> bool:
  """Whether a path flag's `value` names its `default` (``results/`` and ``./results`` name ``results``)."""
  if value is None or default is None:
    return value == default
  return os.path.normpath(value) == os.path.normpath(default)


def describe(counts: Counts) -> str:
  """``{"finished runs": 24, "updates": 1200000}`` -> ``'24 finished runs and 1,200,000 updates'``."""
  parts = [f"{int(v) if float(v).is_integer() else v:,} {k}" for k, v in counts.items()]
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _temporary(path: str) -> str:
  """A new empty file beside `path` (its directory created), named ``.<stem>.<random>.tmp<ext>``: the extension
  kept, as matplotlib infers the format from it."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  stem, ext = os.path.splitext(os.path.basename(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{stem}.", suffix=f".tmp{ext}")
  os.close(fd)
  return tmp


def _put_in_place(tmp: str, path: str) -> None:
  os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is ordinary readable data
  os.replace(tmp, path)


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path` with its extension; when the block ends without an exception the
  temporary file replaces `path` (`os.replace`), else it is removed and `path` is left as it was."""
  tmp = _temporary(path)
  try:
    yield tmp
    _put_in_place(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _write(tmp: str, data: str) -> None:
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _json_text(obj: Any, **dump_kwargs) -> str:
  dump_kwargs.setdefault("indent", 2)
  return json.dumps(obj, **dump_kwargs) + "\n"


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (`replacing`)."""
  with replacing(path) as tmp:
    _write(tmp, text)


def write_json(path: str, obj: Any, **dump_kwargs) -> None:
  """Writes `obj` as JSON (``indent=2`` unless given) to `path` atomically (`replacing`)."""
  write_text(path, _json_text(obj, **dump_kwargs))


def read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_text(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


class Report:
  """The files of one report, written all together or not at all (see the module docstring).

  Use as a context manager: the files staged in it (`path`, `write_text`, `write_json`) replace their destinations
  when the block ends without an exception; otherwise the staged files are removed and nothing on disk changed.
  """

  def __init__(self, *, force: bool = False, force_flag: str = "--force", elsewhere: str = "--results or --out"):
    self.force = force
    self._force_flag, self._elsewhere = force_flag, elsewhere
    self._staged: dict[str, str] = {}  # destination -> its temporary file

  def refuse_empty(self, finished: float, why: str) -> None:
    """`errors.ReportRefused` with ``"<why>; nothing written."`` when `finished` is 0."""
    if not finished:
      raise errors.ReportRefused(f"{why}; nothing written.")

  def guard(self, path: str, counts: Counts, read_counts: Callable[[str], Counts], *,
            default_destination: bool) -> None:
    """Refuses (`errors.ReportRefused`) to replace the file at `path` with a report whose `counts` fall short of
    the file's own in any kind (``read_counts(path)``), unless ``force`` or the destination is not `protected`.
    A file whose counts cannot be read (not a report of this kind) is replaced, with a warning."""
    if self.force or not os.path.exists(path) or not protected(path, default_destination=default_destination):
      return
    try:
      old = dict(read_counts(path))
    except Exception as e:  # pylint: disable=broad-except  (anything unreadable is no report to protect)
      log.warning("%s cannot be read as a report of this kind (%s: %s); replacing it.", path, type(e).__name__, e)
      return
    short = [k for k, v in old.items() if counts.get(k, 0) < v]
    if short:
      raise errors.ReportRefused(
          f"{path} holds {describe(old)}, this report only {describe({k: counts.get(k, 0) for k in old})}: not "
          f"written, nothing changed. Pass {self._force_flag} to replace it, or write elsewhere "
          f"({self._elsewhere}).")

  def path(self, destination: str) -> str:
    """A temporary path beside `destination` (same extension) to write it to; renamed into place on success."""
    if destination not in self._staged:
      self._staged[destination] = _temporary(destination)
    return self._staged[destination]

  def write_text(self, destination: str, text: str) -> None:
    _write(self.path(destination), text)

  def write_json(self, destination: str, obj: Any, **dump_kwargs) -> None:
    _write(self.path(destination), _json_text(obj, **dump_kwargs))

  def commit(self) -> list[str]:
    """Renames every staged file into place, in the order they were staged; returns their destinations."""
    done = []
    while self._staged:
      destination, tmp = next(iter(self._staged.items()))
      _put_in_place(tmp, destination)
      del self._staged[destination]
      done.append(destination)
    return done

  def discard(self) -> None:
    """Removes every staged file; the destinations stay as they were."""
    for tmp in self._staged.values():
      if os.path.exists(tmp):
        os.unlink(tmp)
    self._staged.clear()

  def __enter__(self) -> "Report":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      try:
        self.commit()
      finally:
        self.discard()  # what a failed rename left behind
    else:
      self.discard()
