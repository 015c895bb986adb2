"""Owned, atomic output directories: the one way moescope writes a directory.

Every command that writes a directory (``trace``, ``merge``, ``similarity``, ``prune``)
goes through :func:`atomic_output`:

1. :func:`check_destination` refuses a destination that is empty, ``.``, ``~``, ``/``, the
   working directory or one of its ancestors, the home directory, or an ancestor of (or
   equal to) any input; and an existing directory unless it is a *complete moescope
   output of the same kind* that holds nothing but the files moescope listed in its
   marker. ``--overwrite`` never widens this.
2. The output is built in a temporary sibling of the *resolved* destination, named
   ``.moescope-tmp-<name>-<pid>-<hex>``, and verified there by the caller.
3. On success the marker is stamped (``tool``, ``kind``, ``complete``, ``owned_files``) and
   the new directory is swapped in: one atomic ``renameat2(RENAME_EXCHANGE)`` where the
   kernel and file system support it, else rename-aside / rename-in with Ctrl-C deferred
   between the two and the old output renamed back if the second rename fails. The old
   output is removed last.

Interrupted or failed at any instant, the destination holds the complete old output or
the complete new one; the exception carries ``moescope_outcome`` saying which, and the
CLI prints it. Leftovers of killed processes (temporary or set-aside directories whose
process is gone) are removed, or an orphaned old output restored, by the next run into
the same parent directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from moescope.errors import OutputError

TMP_PREFIX = ".moescope-tmp-"
OLD_PREFIX = ".moescope-old-"
# The marker file of each kind of output; a directory is replaceable only if its marker
# says it is a complete moescope output of that kind.
MARKERS = {
    "trace": "summary.json",
    "similarity": "similarity.json",
    "prune": "prune_manifest.json",
}
_LEFTOVER_RE = re.compile(rf"^({re.escape(TMP_PREFIX)}|{re.escape(OLD_PREFIX)})(.+)-(\d+)-([0-9a-f]{{8}})$")

Warn = Callable[[str], None]


def _stderr_warn(message: str) -> None:
    print(f"Warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- destination checks


def resolve_output(out: str | Path | None) -> Path:
    """Expand ``~`` and resolve symlinks; refuse an empty path.

    Raises:
        OutputError: ``out`` is empty or only whitespace (e.g. an unset shell variable).
    """
    raw = "" if out is None else str(out)
    if not raw.strip():
        raise OutputError(
            "--out is empty (an unset shell variable?); pass a new directory such as --out runs/x."
        )
    return Path(raw).expanduser().resolve()


def _protected(dest: Path) -> str | None:
    """Why ``dest`` may never be an output directory, or None."""
    cwd = Path.cwd().resolve()
    if dest == Path(dest.anchor):
        return "is the file-system root"
    if dest == cwd or dest in cwd.parents:
        return "is the working directory or one of its ancestors"
    home = Path.home().resolve()
    if dest == home or dest in home.parents:
        return "is your home directory or one of its ancestors"
    return None


def _owned_files(root: Path, marker: dict[str, Any], kind: str) -> set[str] | None:
    """Relative paths moescope listed as its own in ``marker`` (None: no listing)."""
    owned = marker.get("owned_files")
    if isinstance(owned, list) and all(isinstance(p, str) for p in owned):
        return {*owned, MARKERS[kind]}
    listed = marker.get("files")  # traces of moescope 0.1 list their files (routes/ as a folder)
    if kind == "trace" and isinstance(listed, list) and all(isinstance(p, str) for p in listed):
        files = {p for p in listed if not p.endswith("/")}
        for folder in (p for p in listed if p.endswith("/")):
            files |= {str(f.relative_to(root)) for f in (root / folder).glob("*.parquet") if f.is_file()}
        return {*files, MARKERS[kind]}
    return None


def _all_files(root: Path, *, empty_dirs: bool = False) -> list[str]:
    """Every non-directory entry under ``root`` (symlinks not followed), relative, sorted.

    With ``empty_dirs``, empty directories are listed too (as ``name/``): a user's empty
    folder inside an old output is theirs, not moescope's.
    """
    found: list[str] = []
    for base, dirs, files in os.walk(root):
        rel = Path(base).relative_to(root)
        found += [str(rel / f) if str(rel) != "." else f for f in files]
        # a symlinked directory is listed as an entry, never walked into
        found += [str(rel / d) if str(rel) != "." else d for d in dirs if (Path(base) / d).is_symlink()]
        if empty_dirs and str(rel) != "." and not files and not dirs:
            found.append(f"{rel}/")
    return sorted(found)


def read_marker(root: Path, kind: str) -> dict[str, Any] | None:
    """The parsed marker of a ``kind`` output in ``root``, or None when absent or unreadable."""
    path = root / MARKERS[kind]
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def check_destination(
    out: str | Path | None, kind: str, *, inputs: Iterable[str | Path | None] = (), replace: bool = True
) -> Path:
    """Validate an output destination before any work is done.

    Args:
        out: the ``--out`` value as given.
        kind: ``trace``, ``similarity`` or ``prune`` (selects the marker file).
        inputs: paths the command reads (checkpoint, trace, corpus files, merge inputs);
            the destination may not be one of them or an ancestor of one. Non-paths (hub
            ids, ``demo``) are ignored.
        replace: whether an existing complete output of this kind may be replaced (prune
            asks for ``--overwrite`` first).

    Returns:
        The resolved destination.

    Raises:
        OutputError: the destination is refused; the message names why and the fix.
    """
    dest = resolve_output(out)
    why = _protected(dest)
    if why:
        raise OutputError(f"--out {out} {why}; pass a new directory such as --out {dest / 'out'}.")
    for inp in inputs:
        if inp is None or str(inp) in ("", "-"):
            continue
        p = Path(str(inp)).expanduser()
        if not p.exists():
            continue
        p = p.resolve()
        if dest == p or dest in p.parents:
            raise OutputError(
                f"--out {out} contains the input {inp}; writing there would replace it, pass another --out."
            )
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise OutputError(f"--out {out} exists and is not a directory; pass a new directory.")
    blocker = next((a for a in dest.parents if a.exists() or a.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        raise OutputError(
            f"--out {out}: {blocker} is a file, not a directory; pass a path under a directory."
        )
    if dest.is_dir():
        present = _all_files(dest, empty_dirs=True)
        if not present and not any(dest.iterdir()):
            return dest  # an empty directory holds nothing to lose
        marker = read_marker(dest, kind)
        complete = (
            marker is not None
            and marker.get("complete") is True
            and marker.get("tool", "moescope") == "moescope"
            and marker.get("kind", kind) == kind
            and ("moescope_version" in marker or marker.get("tool") == "moescope")
        )
        if not complete:
            raise OutputError(
                f"--out {out} already exists and is not a complete moescope {kind} output "
                f"(it holds {_names(present)}); moescope replaces only its own outputs, pass a new directory."
            )
        owned = _owned_files(dest, marker or {}, kind)
        if owned is None:
            raise OutputError(
                f"--out {out} was written by an older moescope without a file list, so moescope cannot tell "
                "its files from yours; remove it yourself or pass a new directory."
            )
        foreign = [f for f in present if f not in owned]
        if foreign:
            raise OutputError(
                f"--out {out} holds files moescope did not write ({_names(foreign)}); move them away or pass "
                "a new directory."
            )
        if not replace:
            raise OutputError(
                f"--out {out} already holds a moescope {kind} output; pass --overwrite to replace it, "
                "or a new directory."
            )
    return dest


def _names(files: list[str], limit: int = 3) -> str:
    if not files:
        return "nothing"
    shown = ", ".join(files[:limit])
    return shown + (f" and {len(files) - limit} more" if len(files) > limit else "")


# --------------------------------------------------------------------------- leftovers


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(parent: Path, warn: Warn | None = _stderr_warn) -> list[str]:
    """Remove temporary directories of dead moescope processes in ``parent``; restore orphans.

    A set-aside old output whose destination is missing (the process died between the two
    renames of a swap) is renamed back into place.

    Returns:
        One line per action taken (also passed to ``warn``).
    """
    actions: list[str] = []
    if not parent.is_dir():
        return actions
    for entry in sorted(parent.iterdir()):
        m = _LEFTOVER_RE.match(entry.name)
        if not m or entry.is_symlink() or not entry.is_dir() or _alive(int(m.group(3))):
            continue
        prefix, name = m.group(1), m.group(2)
        target = parent / name
        if prefix == OLD_PREFIX and not target.exists():
            os.rename(entry, target)
            actions.append(f"restored {target} from an interrupted run ({entry.name})")
        else:
            shutil.rmtree(entry, ignore_errors=True)
            actions.append(f"removed {entry.name}, left behind by an interrupted run")
    if warn is not None:
        for line in actions:
            warn(line)
    return actions


# --------------------------------------------------------------------------- the swap


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@functools.lru_cache(maxsize=1)
def _renameat2() -> Any:
    """glibc's ``renameat2`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block ends (main thread only), then deliver it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[Any] = []
    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, lambda *a: pending.append(a))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt


def _swap_in(tmp: Path, dest: Path) -> Path | None:
    """Put ``tmp`` at ``dest``; return where the old output now is (None: there was none)."""
    with _sigint_deferred():
        if not dest.exists():
            os.rename(tmp, dest)
            return None
        if _exchange(tmp, dest):
            return tmp
        old = dest.parent / f"{OLD_PREFIX}{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(dest, old)
        try:
            os.rename(tmp, dest)
        except BaseException:
            os.rename(old, dest)
            raise
        return old


# --------------------------------------------------------------------------- the writer


def stamp_marker(tmp: Path, kind: str) -> dict[str, Any]:
    """Add ``tool``, ``kind``, ``complete`` and ``owned_files`` to the marker in ``tmp``.

    Raises:
        OutputError: the command did not write its marker (a moescope bug).
    """
    path = tmp / MARKERS[kind]
    marker = read_marker(tmp, kind)
    if marker is None:
        raise OutputError(f"internal error: {MARKERS[kind]} was not written; please report this bug.")
    marker.update(
        tool="moescope",
        kind=kind,
        complete=True,
        owned_files=[f for f in _all_files(tmp) if f != MARKERS[kind]],
    )
    write_json_atomic(path, marker)
    return marker


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    part = path.parent / f".{path.name}.part-{uuid.uuid4().hex[:8]}"
    try:
        with open(part, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(part, path)
    except BaseException:
        with contextlib.suppress(OSError):
            part.unlink()
        raise


def write_json_atomic(path: Path, data: Any, **dump_kwargs: Any) -> None:
    """Write JSON atomically (:func:`write_text_atomic`), indented, with a final newline."""
    write_text_atomic(path, json.dumps(data, indent=2, **dump_kwargs) + "\n")


@contextlib.contextmanager
def atomic_output(
    out: str | Path | None,
    kind: str,
    *,
    inputs: Iterable[str | Path | None] = (),
    replace: bool = True,
    warn: Warn | None = _stderr_warn,
) -> Iterator[Path]:
    """Build an output directory in a temporary sibling, then swap it in atomically.

    Use as ``with atomic_output(out, "trace", inputs=[...]) as tmp: write into tmp``; the
    block must write the kind's marker file. Leaving the block normally stamps the marker
    and swaps; an exception (Ctrl-C included) removes the temporary directory, leaves the
    destination as it was, and is re-raised with ``moescope_outcome`` set.

    Raises:
        OutputError: the destination is refused (see :func:`check_destination`).
    """
    dest = check_destination(out, kind, inputs=inputs, replace=replace)
    existed = dest.exists()
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(dest.parent, warn)
    tmp = dest.parent / f"{TMP_PREFIX}{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old: Path | None = None
    swapped = False
    try:
        yield tmp
        stamp_marker(tmp, kind)
        # the destination may have changed during a long run: check it again just before
        check_destination(out, kind, inputs=inputs, replace=replace)
        old = _swap_in(tmp, dest)
        swapped = True
        if old is not None:
            shutil.rmtree(old)
    except BaseException as exc:
        if swapped:
            note = f"{dest} holds the complete new output"
            if old is not None and old.exists():
                note += f"; the previous one ({old.name}) is removed by the next run"
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            note = (
                f"{dest} still holds the previous output, unchanged"
                if existed
                else f"nothing was written to {dest}"
            )
        with contextlib.suppress(AttributeError, TypeError):
            exc.moescope_outcome = note  # type: ignore[attr-defined]
        raise


def check_png_destination(path: Path, mark: str, command: str) -> None:
    """A ``--plot`` PNG path moescope may write: new, or a plot ``moescope {command}`` wrote before.

    ``mark`` is the text chunk that command writes into its PNGs (read from the first 4 KiB).

    Raises:
        OutputError: not ``.png``, a directory, a missing parent, or a file moescope did not write.
    """
    if path.suffix.lower() != ".png":
        raise OutputError(f"--plot {path}: write a .png file (e.g. {command}.png).")
    if path.is_dir():
        raise OutputError(f"--plot {path} is a directory; name a .png file.")
    if not path.parent.is_dir():
        raise OutputError(f"--plot {path}: the directory {path.parent} does not exist; create it first.")
    if path.exists() or path.is_symlink():
        head = path.read_bytes()[:4096] if path.is_file() and not path.is_symlink() else b""
        if mark.encode() not in head:
            raise OutputError(
                f"--plot {path} exists and was not written by moescope {command}; pick another file name "
                "(moescope never overwrites files it did not write)."
            )
