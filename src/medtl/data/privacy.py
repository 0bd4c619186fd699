"""Pseudonyms for patient identifiers, and how a run shows the paths of its data.

medtl needs patient identity only to keep a patient's images on one side of a split. The value
itself (PatientID, or PatientName when there is no ID) never reaches a Record: it is replaced at
read time by a salted SHA-256, so nothing medtl writes (run directory, report, logs, cache,
manifests) can hold it. The salt is a secret of this machine, created once, so the same patient
gets the same pseudonym in every run here and a pseudonym cannot be reversed by hashing a list of
candidate IDs without it. Set ``MEDTL_SALT`` to share pseudonyms between machines.

Paths are the other leak: PACS exports and clinical shares name folders after patients and
dates, and an absolute path names the user's machine and folders. :class:`PathDisplay` is the
``--paths`` choice for everything a run writes: relative to the data root (default), a salted
pseudonym of that relative path, or absolute.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medtl.errors import MedtlError, check_choice
from medtl.files import atomic_create, cache_root

PREFIX = "pt-"
PATH_PREFIX = "ph-"
PATH_MODES: tuple[str, ...] = ("relative", "hashed", "absolute")
_PSEUDONYM = re.compile(r"pt-[0-9a-f]{16}")
_SALT_FILE = "salt"


def salt() -> bytes:
    """``MEDTL_SALT`` when set, else this machine's secret salt (created on first use, 0600).

    The salt file appears whole or not at all (``atomic_create``): a salt read empty, after a
    crash or beside a concurrent first use, would make every pseudonym a plain SHA-256 of the
    patient id, reversible by hashing candidate ids.
    """
    env = os.environ.get("MEDTL_SALT")
    if env:
        return env.encode()
    path = cache_root() / _SALT_FILE
    legacy = Path.home() / ".cache" / "medtl" / _SALT_FILE  # medtl 0.1 ignored XDG_CACHE_HOME
    if not path.exists() and legacy.is_file() and not os.environ.get("MEDTL_CACHE_DIR"):
        path = legacy  # keep the pseudonyms this machine already made
    if not path.exists():
        # Two processes starting at once must agree on one salt: the first to create it wins.
        atomic_create(path, secrets.token_hex(32).encode())
    value = path.read_bytes()
    if len(value) < 32:
        raise MedtlError(f"{path}: the pseudonym salt is damaged ({len(value)} bytes); delete "
                         "it only if no pseudonyms made with it are still needed, or set "
                         "MEDTL_SALT")
    return value


def pseudonym(identifier: str) -> str:
    """``pt-`` and 16 hex digits of SHA-256(salt, identifier): stable here, not reversible."""
    digest = hashlib.sha256(salt() + b"\0" + identifier.strip().encode("utf-8")).hexdigest()
    return PREFIX + digest[:16]


def patient_key(identifier: str) -> str:
    """The pseudonym of a patient identifier from a manifest or a folder name; a value that is
    already a medtl pseudonym (a manifest medtl wrote) is kept, so a round trip does not hash
    it twice."""
    value = identifier.strip()
    return value if _PSEUDONYM.fullmatch(value) else pseudonym(value)


# ---- paths in outputs ------------------------------------------------------------------------


def _extension(name: str) -> str:
    """The file's type (``.dcm``, ``.nii.gz``), kept on a hashed name so a reader still sees
    what kind of file it was; anything odd is left out rather than shown."""
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return ".nii.gz"
    suffix = Path(name).suffix
    return suffix.lower() if re.fullmatch(r"\.[A-Za-z0-9]{1,5}", suffix) else ""


# A path written in a log line ends at whitespace or at one of these (``path: reason``).
_PATH_END = " \t\n:;,'\")]>"


class PathDisplay:
    """How the paths of the data appear in what a run writes (``--paths``).

    - ``relative`` (default): relative to the data root (the data folder, a manifest's folder,
      an .npz's folder; for predict and explain the folder given, or the file's own folder).
      A path outside every root is shown hashed: its folders are not the data's to show.
    - ``hashed``: ``ph-`` and 16 hex digits of a salted SHA-256 of that relative path, plus
      the file's extension; stable on this machine (and wherever ``MEDTL_SALT`` is shared).
    - ``absolute``: the paths as read, as medtl 0.1 wrote them.

    :meth:`show` maps one path; :meth:`scrub` rewrites the paths inside a free text (a log
    line), and also the run's own folder and the cache folder (``aliases``) to short names.
    """

    def __init__(self, mode: str = "relative", roots: Iterable[str | os.PathLike[str]] = (), *,
                 aliases: Mapping[str, str] | None = None) -> None:
        self.mode = check_choice("--paths", mode, PATH_MODES)
        self._salt: bytes | None = None
        self.roots = _longest_first(_forms(r) for r in roots)
        # (prefix, what replaces it, whether it is a data root), longest first: a root inside
        # another (a run folder inside the data folder) is matched before its parent.
        prefixes = {root: (self._root_label(root), True) for root in self.roots}
        for path, label in (aliases or {}).items():
            for form in _forms(path):
                prefixes.setdefault(form, (label, False))
        self._prefixes = [(p, *prefixes[p]) for p in _longest_first([prefixes])
                          if p.rstrip(os.sep)]  # never the file-system root

    @classmethod
    def for_source(cls, mode: str, source: str | os.PathLike[str], *,
                   aliases: Mapping[str, str] | None = None) -> PathDisplay:
        """For DATA of ``load_dataset``: a folder is its own root; a manifest's or an .npz's
        root is the folder it is in."""
        p = Path(source).expanduser()
        return cls(mode, [p.parent if p.is_file() else p], aliases=aliases)

    @classmethod
    def for_inputs(cls, mode: str, inputs: Iterable[str | os.PathLike[str]], *,
                   aliases: Mapping[str, str] | None = None) -> PathDisplay:
        """For the files and folders given to predict or explain: a folder is the root of the
        images found in it, a file is shown by its name (its folder, and the folder of what a
        symbolic link points at, are roots)."""
        roots: list[str] = []
        for item in inputs:
            p = Path(item).expanduser()
            roots += [str(p.parent), os.path.dirname(os.path.realpath(p))] if p.is_file() \
                else [str(p)]
        return cls(mode, roots, aliases=aliases)

    def _hash(self, text: str) -> str:
        if self._salt is None:
            self._salt = salt()
        data = text.encode("utf-8", "surrogateescape")  # names that are not valid UTF-8
        return PATH_PREFIX + hashlib.sha256(self._salt + b"\0path\0" + data).hexdigest()[:16]

    def _root_label(self, root: str) -> str:
        """What a data root alone (``data /abs/root: ...``) is shown as."""
        if self.mode == "hashed":
            return self._hash("root\0" + root)
        return Path(root).name or root

    def _relative(self, path: str) -> str | None:
        absolute = os.path.abspath(path)
        for root in self.roots:
            if absolute == root:
                return Path(root).name
            base = root if root.endswith(os.sep) else root + os.sep
            if absolute.startswith(base):
                return Path(absolute[len(base):]).as_posix()
        return None

    def show(self, path: str | os.PathLike[str]) -> str:
        """``path`` as the outputs show it."""
        text = os.fspath(path)
        if self.mode == "absolute":
            return text
        rel = self._relative(text)
        if rel is None:  # outside the data root: hashed whole, whatever the mode
            return self._hash("outside\0" + os.path.abspath(text)) + _extension(text)
        return rel if self.mode == "relative" else self._hash(rel) + _extension(rel)

    def scrub(self, text: str) -> str:
        """``text`` with every data path in it shown as :meth:`show` does, the data root by its
        name (hashed: its pseudonym) and each alias folder by its label."""
        if self.mode == "absolute":
            return text
        for prefix, label, is_data in self._prefixes:
            if prefix in text:
                text = self._rewrite(text, prefix, label, is_data)
        return text

    def scrub_tree(self, value: Any) -> Any:
        """``value`` (JSON-like: dicts, lists, strings) with :meth:`scrub` applied to every
        string in it, keys included: the last guard on what goes into a run's JSON files."""
        if self.mode == "absolute":
            return value
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, Mapping):
            return {self.scrub(k) if isinstance(k, str) else k: self.scrub_tree(v)
                    for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.scrub_tree(v) for v in value]
        return value

    def _rewrite(self, text: str, prefix: str, label: str, is_data: bool) -> str:
        out, pos = [], 0
        for m in re.finditer(re.escape(prefix.rstrip(os.sep)) + r"(?=$|[/\\" +
                             re.escape(_PATH_END) + "])", text):
            i, j = m.start(), m.end()
            if j < pos:
                continue
            below = j < len(text) and text[j] in "/\\"
            if below and is_data and self.mode == "hashed":
                k = _path_end(text, i)
                out += [text[pos:i], self.show(text[i:k])]
                pos = k
            elif below:
                out += [text[pos:i], "" if is_data else label + text[j]]
                pos = j + 1
            else:
                out += [text[pos:i], label]
                pos = j
        out.append(text[pos:])
        return "".join(out)


def _forms(path: str | os.PathLike[str]) -> set[str]:
    """A folder as it may be written: absolute, and with its symbolic links resolved."""
    p = os.path.expanduser(os.fspath(path))
    return {os.path.abspath(p), os.path.realpath(p)}


def _longest_first(groups: Iterable[Iterable[str]]) -> list[str]:
    return sorted({x for g in groups for x in g}, key=lambda x: (-len(x), x))


def _path_end(text: str, start: int) -> int:
    """Where the path starting at ``start`` of a log line ends: the longest candidate that
    exists on disk (names with spaces or colons), else the first whitespace or separator."""
    ends = [j for j in range(len(text), start, -1) if j == len(text) or text[j] in _PATH_END]
    for j in ends:
        if os.path.exists(text[start:j]):
            return j
    return ends[-1] if ends else len(text)


# ---- where config.json says the data is ------------------------------------------------------


def recorded_source(mode: str, source: str | os.PathLike[str],
                    run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json's ``data.source``, ``data.source_relative_to`` and ``data.paths``.

    ``absolute``: the resolved path. ``relative``: the path from the run folder to the data
    (``../data/cxr``), so ``medtl evaluate RUN`` finds it from any working directory while the
    two keep their places; when they share no folder but the file-system root, that path would
    spell the absolute one, so only the data's name is kept. ``hashed``: the data root's
    pseudonym only. Without a usable path, ``evaluate`` asks for DATA.
    """
    check_choice("--paths", mode, PATH_MODES)
    data = os.path.realpath(os.path.expanduser(os.fspath(source)))
    if mode == "absolute":
        return {"source": data, "source_relative_to": "absolute", "paths": mode}
    if mode == "hashed":
        return {"source": PathDisplay("hashed", [data]).scrub(data), "source_relative_to": None,
                "paths": mode}
    run = os.path.realpath(run_dir)
    try:
        common = os.path.commonpath([data, run])
    except ValueError:  # another drive
        common = ""
    if common and os.path.dirname(common) != common:
        return {"source": Path(os.path.relpath(data, run)).as_posix(),
                "source_relative_to": "run", "paths": mode}
    return {"source": Path(data).name, "source_relative_to": None, "paths": mode}


def recorded_data_path(data: Mapping[str, Any], run_dir: str | os.PathLike[str]) -> str | None:
    """The data a run's config.json names, as a path to load, or None when it names none
    (``--paths hashed``, or a relative run whose data shared no folder with it). Runs written
    before ``--paths`` recorded the absolute path."""
    source = data.get("source")
    if not isinstance(source, str) or not source:
        return None
    base = data.get("source_relative_to", "absolute")
    if base == "absolute":
        return source
    if base == "run":
        return os.path.normpath(os.path.join(os.path.realpath(run_dir), source))
    return None
