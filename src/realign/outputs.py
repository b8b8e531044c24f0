"""Where a command may write: every command resolves its outputs against its inputs here, before
any work starts, so that no output ever replaces, contains or lands inside something it reads.

Rules (the same for every command, ``--force`` or not):

- an output may not be an input, contain an input, or lie inside an input directory;
- an output may not be the current directory or one of its ancestors (``-o .`` would replace the
  user's working directory);
- ``--force`` replaces only what realign wrote before (recognised by its provenance file) or an
  empty directory; anything else is refused, so a typo in ``-o`` never deletes a user's files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from realign.errors import RealignError

# Files by which realign recognises its own earlier outputs (replaceable with --force).
PROVENANCE_FILES = ("realign.json", "patch.json", "world.json", "summary.json", "realign_attack.json")

PathLike = str | os.PathLike


def _resolved(path: PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def input_paths(*items: object) -> list[Path]:
    """The local paths of inputs: paths, strings that name existing files or directories, and
    ``Model`` objects (their directory, an adapter's base, tokenizer and config folders). Hub ids
    that name nothing local are skipped: the hub cache is resolved through the ``Model``."""
    out: list[Path] = []
    for item in items:
        if item is None:
            continue
        if isinstance(item, list | tuple | set):
            out += input_paths(*item)
            continue
        if hasattr(item, "weights") and hasattr(item, "path"):  # a realign.sources.Model
            out.append(_resolved(item.path))  # type: ignore[attr-defined]
            base = getattr(item, "base", None)
            if base is not None and base is not item:
                out += input_paths(base)
            continue
        if isinstance(item, str | os.PathLike):
            local = Path(item).expanduser()
            if local.exists():
                out.append(local.resolve())
            elif isinstance(item, str) and "+" in item:  # BASE+ADAPTER: both are inputs
                out += input_paths(*item.split("+", 1))
    return list(dict.fromkeys(out))


def is_realign_output(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in PROVENANCE_FILES)


def check_output(out: PathLike, inputs: Iterable[Path] = (), force: bool = False, kind: str = "dir",
                 flag: str = "--out") -> Path:
    """Resolve ``out`` and refuse it (one line, nothing touched) when writing it could destroy an
    input or the working directory. ``kind`` is ``dir`` (replaced as a whole: ``--force`` rules
    apply), ``file`` (a results file, replaced atomically) or ``tree`` (a directory that a command
    adds to, such as the demo's: only the rules about inputs and the working directory)."""
    target = _resolved(out)
    cwd = Path.cwd().resolve()
    if _inside(cwd, target):
        where = "the current directory" if target == cwd else "an ancestor of the current directory"
        raise RealignError(f"{flag} {out} is {where}: writing it would replace your files; choose a new path")
    for src in inputs:
        if target == src:
            raise RealignError(f"{flag} {out} is an input of this command ({src}): choose another path")
        if _inside(src, target):
            raise RealignError(f"{flag} {out} contains an input of this command ({src}): choose another path")
        if src.is_dir() and _inside(target, src):
            raise RealignError(f"{flag} {out} lies inside an input of this command ({src}): choose another path")
    if kind == "dir" and target.exists():
        if not force:
            raise RealignError(f"output {target} already exists: choose another path or pass --force")
        if not target.is_dir():
            raise RealignError(f"output {target} is a file, not a realign output: remove it yourself or choose "
                               "another path")
        if any(target.iterdir()) and not is_realign_output(target):
            raise RealignError(f"output {target} holds files realign did not write (it is not a realign output): "
                               "realign only replaces its own earlier outputs or an empty directory; remove it "
                               "yourself or choose another path")
    if kind == "file" and target.is_dir():
        raise RealignError(f"{flag} {out} is a directory: give a file name")
    return target


__all__ = ["check_output", "input_paths", "is_realign_output", "PROVENANCE_FILES"]
