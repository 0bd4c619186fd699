"""Every file medtl keeps is written here: atomically and durably, or not at all.

A reader (``evaluate``, ``--resume``, the feature cache, a second machine on a shared disk) must
see either the old file or the complete new one, even after a crash or a power cut. So each
write goes to a temporary file in the same folder (a rename is only atomic within one file
system), is flushed and fsynced, renamed over the target with :func:`os.replace`, and the folder
is fsynced so that the rename itself is on disk. On any error, ``KeyboardInterrupt`` included,
the temporary file is removed and the old file is left as it was.

This module is the bottom layer: standard library and :mod:`medtl.errors` only, so that every
other module (the training loop's checkpoints, the feature cache, the run directory) can use it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from medtl.errors import MedtlError

__all__ = ["LockHeldError", "atomic_open", "atomic_path", "atomic_write", "fsync_dir",
           "hold_lock", "read_bytes", "read_json", "write_csv", "write_json"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a removal inside ``path`` durable (POSIX: fsync the folder itself)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # a platform that cannot open folders (Windows): nothing more to do
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_beside(path: Path) -> tuple[int, Path]:
    """A new file next to ``path``, opened for writing. Unlike ``tempfile.mkstemp`` (mode 0600)
    it gets the permissions of an ordinary file (0666 less the umask), since it becomes one."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a library that can only write to a file name
    (ONNX export, ``safetensors.torch.save_file``); when the block ends without error the file
    is fsynced and renamed to ``path``. On error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)  # the library closed its own handle: fsync through ours
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Yield a file object whose content replaces ``path`` only when the block ends without
    error: for libraries that write to a file object (``torch.save``, ``np.save``, skops).

    ``mode`` is ``"wb"`` or ``"w"`` (text: UTF-8, line endings written as given).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode must be 'wb' or 'w', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(path)
    try:
        text = {} if mode == "wb" else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Replace ``path`` with ``data`` (``str`` is written as UTF-8, with what UTF-8 cannot hold
    escaped by :func:`escape_undecodable`), atomically and durably."""
    if isinstance(data, str):
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError:  # a file name that is not UTF-8, in a CSV, log or report
            data = escape_undecodable(data).encode("utf-8")
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_create(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` holding ``data`` whole, only if it does not exist yet; ``False`` when
    another process created it first. Readers never see it empty or half written: the file is
    written and fsynced under a temporary name, then hard-linked into place (``link`` fails
    when the name exists, so the first writer wins)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(path)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        fsync_dir(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def cache_root() -> Path:
    """medtl's cache folder: ``MEDTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/medtl``, else
    ``~/.cache/medtl``."""
    if os.environ.get("MEDTL_CACHE_DIR"):
        return Path(os.environ["MEDTL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medtl"


# What a run's small JSON files may weigh: config.json and model.json are a few kB (a
# 10,000-class run's some hundreds), metrics.json grows with classes and curves.
MAX_JSON_BYTES = 4 << 20


def read_bytes(path: str | os.PathLike[str], *, max_bytes: int) -> bytes:
    """The content of the regular file ``path``, refused (MedtlError naming the file and the
    reason) when it is anything else or holds more than ``max_bytes``.

    For files that come from elsewhere (a shared run): a metrics.json that is a symlink to
    ``/dev/zero`` or a FIFO would otherwise be read forever or block. The file is opened with
    ``O_NONBLOCK`` (a FIFO does not wait for a writer) and checked with ``fstat`` on that same
    descriptor, so it cannot be swapped between the check and the read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise MedtlError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MedtlError(f"{path}: not a regular file (a device, FIFO or folder); refused")
        if st.st_size > max_bytes:
            raise MedtlError(f"{path}: {st.st_size} bytes, more than the {max_bytes} a medtl "
                             "file of its kind holds; refused")
        chunks, left = [], max_bytes + 1  # read past the limit: a file growing meanwhile
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise MedtlError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise MedtlError(f"{path}: more than the {max_bytes} bytes a medtl file of its kind "
                         "holds; refused")
    return data


def read_json(path: str | os.PathLike[str], *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in the regular file ``path`` (at most ``max_bytes``); a file that is not
    regular, too large, not UTF-8 or not JSON is a MedtlError naming it and the reason.
    ``FileNotFoundError`` passes through, for callers whose message says what is missing."""
    data = read_bytes(path, max_bytes=max_bytes)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise MedtlError(f"{path}: not valid JSON ({reason})") from None


def escape_undecodable(text: str) -> str:
    """``text`` with every character that UTF-8 cannot encode written as a backslash escape.

    A file name whose bytes are not UTF-8 (Latin-1 names from a Windows zip) reaches Python as a
    str holding surrogate escapes (``b"caf\\xe9.png"`` is ``"caf\\udce9.png"``), which no UTF-8
    file can store. Each such byte is written ``\\xNN``, as ``bytes.decode(errors=
    "backslashreplace")`` shows it (``caf\\xe9.png``); any other lone surrogate ``\\uNNNN``. This
    one representation is used in every CSV, JSON, log and report medtl writes, so the same
    file is named the same way everywhere. Other text is returned unchanged.
    """
    if text.isascii():
        return text
    return "".join(_escape_surrogate(c) if "\ud800" <= c <= "\udfff" else c for c in text)


def _escape_surrogate(c: str) -> str:
    code = ord(c)
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def _escape_strings(obj: Any) -> Any:
    """``obj`` with :func:`escape_undecodable` applied to every string in it (keys included)."""
    if isinstance(obj, str):
        return escape_undecodable(obj)
    if isinstance(obj, Mapping):
        return {_escape_strings(k): _escape_strings(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_escape_strings(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return escape_undecodable(os.fspath(obj))
    return obj


def _json_default(o: Any) -> Any:
    # NumPy scalars and arrays without importing NumPy: both have tolist() (a scalar's gives
    # the Python number, as .item() does).
    if type(o).__module__ == "numpy" and hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(type(o).__name__)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """``obj`` as indented JSON and a final newline; NumPy values and paths become plain JSON,
    and a file name that is not UTF-8 is written as :func:`escape_undecodable` shows it."""
    text = json.dumps(obj, indent=2, default=_json_default)
    if "\\ud" in text:  # a surrogate was escaped as \udcXX: write the one representation instead
        text = json.dumps(_escape_strings(obj), indent=2, default=_json_default)
    atomic_write(path, text + "\n")


def write_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows as CSV, the union of their keys as header (in first-seen order)."""
    buf = io.StringIO()
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        # csv quotes a field holding the "\n" line end but not a lone "\r", which a reader
        # takes for one: a file name with a carriage return would split its row in two.
        quoted = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n",
                                quoting=csv.QUOTE_ALL)
        (quoted if any("\r" in str(f) for f in fields) else w).writeheader()
        for r in rows:
            # repr() keeps every bit of a float, so a reloaded run reproduces it exactly.
            row = {k: repr(v) if isinstance(v, float) else v for k, v in r.items()}
            cr = any(isinstance(v, str) and "\r" in v for v in row.values())
            (quoted if cr else w).writerow(row)
    atomic_write(path, buf.getvalue())


class LockHeldError(MedtlError):
    """Another process holds the lock; ``holder`` is what it wrote into the lock file."""

    def __init__(self, path: Path, holder: dict[str, Any]) -> None:
        self.path = path
        self.holder = holder
        super().__init__(f"{path}: locked by {describe_holder(holder)}")


def describe_holder(holder: Mapping[str, Any]) -> str:
    """``pid 123 on host since 2026-01-01 10:00:00 (medtl train ...)``, from what is known."""
    if not holder.get("pid"):
        return "another process"
    text = f"pid {holder['pid']}"
    if holder.get("host"):
        text += f" on {holder['host']}"
    if holder.get("started"):
        text += f" since {holder['started']}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    return text


@contextmanager
def hold_lock(path: str | os.PathLike[str], *, command: str | None = None,
              ) -> Iterator[dict[str, Any]]:
    """Hold an exclusive ``flock`` on the file ``path`` for the block, or raise LockHeldError
    at once. The file holds the holder's pid, host, start time and ``command`` (by default
    this process's command line), for the error a second process gets; it is removed when the
    block ends.

    The kernel releases the lock when its process dies, even by SIGKILL, so a lock file left
    behind by a killed process never blocks anyone.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): run unlocked rather than not at all
        yield {}
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        # O_NOFOLLOW: a lock file planted as a symbolic link must not make us truncate and
        # write the file it points to (ELOOP instead).
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockHeldError(path, holder) from None
        except BaseException:
            os.close(fd)
            raise
        # The holder before us may have removed the file between our open and our flock: then
        # we locked a file nobody else will see, so start again on the new one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": command if command is not None else " ".join(
                  [Path(sys.argv[0]).name, *sys.argv[1:]])}
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode("utf-8"))
        yield holder
    finally:
        # Remove while still locked, so no one can lock the old file after we let go of it.
        path.unlink(missing_ok=True)
        os.close(fd)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 65536, 0)
        holder = json.loads(raw.decode("utf-8")) if raw else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
