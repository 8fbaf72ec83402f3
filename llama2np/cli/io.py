"""What the command line needs from the operating system, checked up front.

Closed standard streams, command-line text that is not UTF-8, and output files
that cannot be written are each one clear error, found before any model is
loaded; a file is written under a temporary name and renamed into place, so a
failed write leaves nothing half-written behind.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import BinaryIO, Callable

from ..errors import InputError


def check_streams(stdin: bool, stdout: bool) -> None:
    """InputError when a stream the command needs was closed (``<&-``, ``>&-``): Python sees it as None."""
    if stdin and sys.stdin is None:
        raise InputError("standard input is closed: chat reads your messages from it (type them, or pipe a file in)")
    if stdout and sys.stdout is None:
        raise InputError("standard output is closed: the text is printed there (redirect it to a file or "
                         "/dev/null instead of closing it)")


def stdin_keeps_bad_bytes() -> None:
    """Let lines that are not UTF-8 reach the program (as surrogates) so that it can report them, not crash."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")


def check_utf8(text: str, what: str) -> None:
    """InputError naming the first bad byte when ``text`` came from bytes that are not UTF-8.

    Python decodes the command line (and here stdin) with ``surrogateescape``: each byte that
    is not UTF-8 becomes a surrogate U+DC80..U+DCFF; this turns them back into bytes to report them.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = " ".join(f"0x{b:02x}" for b in raw[e.start:e.end])
            raise InputError(f"{what} is not valid UTF-8: byte {bad} at byte {e.start} "
                             f"(after {raw[max(0, e.start - 20):e.start]!r}); use UTF-8 text") from None


def check_output_path(path: Path, flag: str, suffixes: tuple[str, ...]) -> None:
    """InputError, before any work, when ``path`` cannot be a new output file."""
    if path.suffix not in suffixes:
        raise InputError(f"{flag} {path}: the file name must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory: give a file name")
    parent = path.parent
    if not parent.exists():
        raise InputError(f"{flag} {path}: the directory {parent} does not exist")
    if not parent.is_dir():
        raise InputError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: no permission to write in {parent}")


def write_atomically(path: Path, flag: str, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``.

    Any OSError (disk full, permissions, the directory gone) becomes one InputError, and the
    temporary file is removed: ``path`` is either the whole new file or untouched.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise InputError(f"{flag} {path}: could not write it ({e.strerror or e}); no file was left") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
