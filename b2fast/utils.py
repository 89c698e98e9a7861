"""Small helpers shared by several layers: importing user callables, one-line command-line errors,
atomic file and folder writes. Standard library only, so every ``--help`` stays fast."""
from __future__ import annotations

import argparse
import difflib
import errno
import functools
import importlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

# File name of LoRA weights, as diffusers' load_lora_weights expects it.
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


# Device names every entry point accepts.
DEVICE_NAMES = "'auto', 'cpu', 'cuda' or 'cuda:N'"


def is_device_name(name: str) -> bool:
    return re.fullmatch(r"auto|cpu|cuda(:\d+)?", name) is not None


def did_you_mean(word: object, choices) -> str:
    """' (did you mean 'X'?)' naming the choice closest to a mistyped ``word``; '' when none is close.
    A prefix that the word and every choice share (``b2fast:``) is not counted as a likeness."""
    if not isinstance(word, str):
        return ""
    skip = len(os.path.commonprefix([word, *map(str, choices)]))
    tails = {str(c)[skip:]: str(c) for c in choices}
    close = difflib.get_close_matches(word[skip:], list(tails), n=1, cutoff=0.6)
    return f" (did you mean {tails[close[0]]!r}?)" if close else ""


def option_hint(parser: argparse.ArgumentParser, flag: str) -> str:
    """:func:`did_you_mean` over the long options of ``parser`` (``--lorra`` → '--lora')."""
    return did_you_mean(flag, [o for o in parser._option_string_actions if o.startswith("--")])


class ArgumentError(ValueError):
    """A command-line argument is invalid; the message names it."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`ArgumentError`: the CLI's ``main`` prints one
    'error:' line (exit code 2) instead of the usage text."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            for flag in (a.partition("=")[0] for a in message.split(": ", 1)[1].split() if a.startswith("--")):
                hint = option_hint(self, flag)
                message += f"; {flag}{hint}" if hint else ""
        raise ArgumentError(message)


def require(ok: bool, name: str, value, allowed: str, choices=()) -> None:
    """ArgumentError "NAME: got VALUE, expected ALLOWED" unless ``ok`` (with the closest of
    ``choices`` when VALUE looks like a typo of one)."""
    if not ok:
        raise ArgumentError(f"{name}: got {value!r}{did_you_mean(value, choices)}, expected {allowed}")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def stop_on_interrupt(note: str) -> Callable:
    """Decorator for a command-line ``main(argv) -> exit code``: Ctrl-C, or SIGTERM (what job
    schedulers and ``timeout`` send) while it runs, ends it with one line, ``interrupted; NOTE``,
    and exit code 130. Every file the product writes is written atomically, so nothing is left
    half-written; the NOTE says what is kept."""
    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            in_main_thread = threading.current_thread() is threading.main_thread()  # signals need it
            previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main_thread else None
            try:
                return main(argv)
            except KeyboardInterrupt:
                print(f"interrupted; {note}", file=sys.stderr)
                return 130
            finally:
                if in_main_thread:
                    signal.signal(signal.SIGTERM, previous)
        return run
    return decorate


def load_callable(spec: str, field: str) -> Callable:
    """Import ``module:function`` and return the function, with a one-line error naming ``field``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{field}: expected 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{field}: cannot import module {module_name!r} ({exc})") from None
    except Exception as exc:  # the module's own code failed: a SyntaxError, its set-up raising
        raise ValueError(f"{field}: importing module {module_name!r} failed ({one_line(exc)})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{field}: module {module_name!r} has no callable named {attr!r}")
    return fn


def first_line(message: object, limit: int = 200) -> str:
    """The first line of ``message`` (an exception or text), cut at a word to at most ``limit``
    characters: the reason part of a one-line error ('' when there is none)."""
    text = (str(message).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``: for one-line errors about a library's failure."""
    return f"{type(exc).__name__}: {first_line(exc, limit)}"


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {' '.join(str(message).split())}\n"


def one_line_warnings() -> None:
    """Print warnings as ``warning: message`` on one line. Python's default format adds the file,
    line number and source line that raised it: a path into b2fast or a library, not the user's
    input. Called by the command-line entry points only (a library must not change it)."""
    import warnings

    warnings.formatwarning = _one_line_warning


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc), so other
    threads never see a temporarily cleared umask; elsewhere set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(folder: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` would give a new file / folder: 0o666 / 0o777 minus the umask
    (mkstemp / mkdtemp make 0o600 / 0o700, unreadable by the rest of a shared cluster's group)."""
    return (0o777 if folder else 0o666) & ~current_umask()


def check_writable(path: str | os.PathLike, name: str, folder: bool = False) -> None:
    """Fail early, in one line naming ``name`` (a CLI flag), unless ``path`` can be written later: a
    file path (its folders made as needed) or, with ``folder``, a folder to write into. Nothing is
    created here, so a run that stops before its outputs leaves nothing behind."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    kind = "folder" if folder else "file"
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{name}: {str(path)!r} is an existing file; give a folder to write the results into")
    if not folder and path.is_dir():
        raise ValueError(f"{name}: {str(path)!r} is a folder; give a file path")
    existing = path if folder else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{name}: cannot create the {kind} {str(path)!r}: {str(existing)!r} is a file, "
                         "not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: cannot write the {kind} {str(path)!r}: no write permission in "
                         f"{str(existing)!r}; choose a writable location")


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or folder's data (a folder: its entries) to the disk, so a rename that
    follows cannot reach the disk before what it renames. Skipped where the OS or filesystem
    cannot (folders on Windows, some network filesystems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EBADF, errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a kill (or a power cut: the file is
    fsynced before the rename, the folder after it) never leaves a partial file. The file gets
    the usual permissions (0o666 minus the umask), like any newly created file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode())  # after write(): a writer may have replaced the file
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


# A folder is replaced in steps: the new one is filled under ``.NAME.new-XXXX``, the old one
# renamed aside to ``.NAME.old``, the new one renamed to ``NAME``, then the aside one deleted.
# A kill between the two renames leaves only ``.NAME.old``: readers use it (readable_folder),
# the next write puts it back (recover_folders).
_NEW, _OLD = ".new-", ".old"
_ASIDE_NAME = re.compile(r"\.(.+)\.old")
_NEW_NAME = re.compile(r"\.(.+)\.new-[a-z0-9_]{8}")  # tempfile.mkdtemp's 8 random characters


def _aside(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}{_OLD}")


def readable_folder(folder: str | os.PathLike) -> Path:
    """``folder``, or its complete previous version when a kill interrupted its replacement
    (``.NAME.old``, left in place: only the writer moves it back, so readers never race it)."""
    folder = Path(folder)
    aside = _aside(folder)
    return aside if not folder.exists() and aside.is_dir() else folder


def recover_folders(parent: str | os.PathLike) -> None:
    """Finish what a killed :func:`atomic_write_folder` left in ``parent``: put each aside folder
    back where its replacement never arrived (else delete it), and delete unfinished new ones.
    Only the one writer of ``parent`` may call this."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        aside, new = _ASIDE_NAME.fullmatch(entry.name), _NEW_NAME.fullmatch(entry.name)
        if not entry.is_dir() or not (aside or new):
            continue
        if new or (parent / aside[1]).exists():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            os.replace(entry, parent / aside[1])
            fsync_path(parent)


def atomic_write_folder(folder: str | os.PathLike, fill: Callable[[Path], Any]) -> Path:
    """Call ``fill(tmp)`` on a new temporary sibling folder, then put it in place of ``folder``,
    so at every moment a reader (through :func:`readable_folder`) finds a complete folder: the
    old one or the new one. Files and folders get the usual modes (mkdtemp makes 0o700, and some
    writers, e.g. safetensors, 0o600 files)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_folders(folder.parent)
    aside = _aside(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}{_NEW}", dir=folder.parent))
    try:
        fill(tmp)
        for path in [*tmp.rglob("*"), tmp]:
            os.chmod(path, default_mode(folder=path.is_dir()))
            fsync_path(path)
        if folder.exists():
            os.replace(folder, aside)
        os.replace(tmp, folder)
        fsync_path(folder.parent)
    except BaseException:
        if aside.is_dir() and not folder.exists():
            os.replace(aside, folder)  # interrupted between the renames: the old one goes back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)
    return folder


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by None, through dicts, lists and
    tuples: ``json.dumps(finite_json(v), allow_nan=False)`` is strict JSON (no bare NaN tokens,
    which most JSON parsers outside Python reject)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def append_jsonl(path: str | os.PathLike, records: dict | list[dict]) -> None:
    """Append JSON records, one line each, in a single write call (flushed)."""
    records = [records] if isinstance(records, dict) else records
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        f.flush()
