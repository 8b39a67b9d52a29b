"""User mistakes on the command line: ``UsageError``, the shared checks, and how ``duollm``
reports them.

Every command validates its options before any work (training, data loading, file writing)
and raises ``UsageError`` for a mistake of the user's. ``duollm.cli.main`` prints it as one or
two lines naming the option, with no traceback, and exits with status 2 (argparse's own code
for usage errors). A traceback is shown only for bugs, or for any error with ``--debug``.

The checks here are shared by every command (``train``, ``study``, ``bench``, ...): each takes
the option's name as the user typed it (``"--steps"``) so that the message names it, and
creates nothing. See docs/ops.md for the Python API's own argument checks.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import math
import os
import re
import sys
from typing import Dict, Iterator, Optional, Union

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'd program

# Below this width the CPU GEMMs are too small to split across threads profitably, and a busy
# machine slows a many-thread run many-fold through OpenMP barrier waits.
ONE_THREAD_D_MODEL = 128


class UsageError(Exception):
    """A user mistake on the command line. ``option`` names the flag (e.g. ``"--steps"``)."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}" if option else message)
        self.option = option
        self.message = message


# --------------------------------------------------------------------------- numbers


def _bounds_text(low, high, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def check_int(option: str, value, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` as an int within ``[low, high]`` (either bound optional); else UsageError."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise UsageError(option, f"expected an integer, got {value!r}") from None
        else:
            raise UsageError(option, f"expected an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise UsageError(option, f"expected an integer {_bounds_text(low, high, False, False)}"
                                 f", got {value}")
    return value


def check_float(option: str, value, low: Optional[float] = None,
                high: Optional[float] = None, low_open: bool = False,
                high_open: bool = False) -> float:
    """``value`` as a finite float within the bounds (``*_open``: the bound itself is
    excluded); else UsageError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(option, f"expected a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise UsageError(option, f"expected a finite number, got {value!r}")
    bad = ((low is not None and (number <= low if low_open else number < low)) or
           (high is not None and (number >= high if high_open else number > high)))
    if bad:
        raise UsageError(option, f"expected a number {_bounds_text(low, high, low_open, high_open)}"
                                 f", got {value}")
    return number


# --------------------------------------------------------------------------- device


def available_devices() -> str:
    """What this machine offers torch, as a sentence fragment: ``"cpu, cuda:0 (NVIDIA ...)"``."""
    import torch

    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                  for i in range(torch.cuda.device_count())]
    return ", ".join(names)


def check_device(option: str, spec: Optional[str], allow_auto: bool = True):
    """The ``torch.device`` that ``spec`` names, checked to exist on this machine.

    ``spec``: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, or (with ``allow_auto``) ``None``/``"auto"``
    for the first CUDA GPU when one is visible, else the CPU. Raises UsageError naming
    ``option`` with what the machine has, e.g. "no CUDA GPU is visible; this machine has: cpu".
    """
    import torch

    if spec is None or spec == "auto":
        if not allow_auto:
            raise UsageError(option, "expected cpu, cuda or cuda:N")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(option, f"expected cpu, cuda or cuda:N{' or auto' if allow_auto else ''}"
                                 f", got {spec!r}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(option, f"duollm runs on cpu or cuda[:N], got {spec!r}; this "
                                 f"machine has: {available_devices()}")
    if not torch.cuda.is_available():
        why = "" if torch.version.cuda else " (this torch is built without CUDA)"
        raise UsageError(option, f"no CUDA GPU is visible{why}; this machine has: "
                                 f"{available_devices()}")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(option, f"{spec} does not exist; this machine has: "
                                 f"{available_devices()}")
    return device


# --------------------------------------------------------------------------- files


def check_out_dir(option: str, path: Optional[str]) -> Optional[str]:
    """Check that ``path`` is (or can become) a writable folder; create nothing.

    Returns ``path`` unchanged (None passes through). Raises UsageError when ``path`` or one
    of its parents is a file, or the nearest existing parent is not writable.
    """
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise UsageError(option, f"expected a folder path, got {path!r}")
    full = os.path.abspath(os.fspath(path))
    if os.path.exists(full):
        if not os.path.isdir(full):
            raise UsageError(option, f"{path} exists and is a file, not a folder; pick "
                                     f"another path or remove the file")
        if not os.access(full, os.W_OK | os.X_OK):
            raise UsageError(option, f"{path}: the folder is not writable")
        if not os.stat(full).st_mode & 0o222:
            # Read-only by its mode: root may still write (or replace) it, but the owner
            # marked it not to be touched.
            raise UsageError(option, f"{path}: the folder is read-only (no write permission "
                                     f"bits); pick another folder or make it writable")
        return path
    parent = os.path.dirname(full)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(option, f"cannot create {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(option, f"cannot create {path}: {parent} is not writable")
    return path


def check_data_file(option: str, path) -> str:
    """Check that ``path`` is an existing, readable, non-empty UTF-8 text file.

    Reads the file once in chunks (it is not kept). Returns ``path``; raises UsageError saying
    what is wrong (missing, a folder, unreadable, empty, binary, not UTF-8).
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise UsageError(option, f"expected a path to a text file, got {path!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(option, f"no such file: {path}")
    if os.path.isdir(path):
        raise UsageError(option, f"{path} is a folder, expected a UTF-8 text file")
    if not os.path.isfile(path):
        raise UsageError(option, f"{path} is not a regular file")
    decoder = codecs.getincrementaldecoder("utf-8")()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                if b"\x00" in chunk:
                    raise UsageError(option, f"{path} looks binary (it holds NUL bytes); "
                                             f"expected a UTF-8 text file")
                decoder.decode(chunk)
                size += len(chunk)
            decoder.decode(b"", final=True)
    except PermissionError:
        raise UsageError(option, f"{path} is not readable (permission denied)") from None
    except UnicodeDecodeError as e:
        raise UsageError(option, f"{path} is not UTF-8 text (bad byte at offset "
                                 f"{size + e.start}); expected a UTF-8 text file") from None
    except OSError as e:
        raise UsageError(option, f"cannot read {path}: {e.strerror or e}") from None
    if size == 0:
        raise UsageError(option, f"{path} is empty")
    return path


# --------------------------------------------------------------------------- threads, progress


def add_threads_arg(parser) -> None:
    """Add ``--threads N`` (the rule of ``apply_thread_rule``) to an argparse parser."""
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help=f"CPU threads for torch, 0: torch's choice (default: 1 for d_model <= "
             f"{ONE_THREAD_D_MODEL} on the CPU, whose ops are too small for threads to pay "
             f"and which a busy machine slows many-fold through OpenMP barrier waits; "
             f"torch's choice otherwise)")


def apply_thread_rule(threads: Optional[int], device, d_model: Optional[int],
                      option: str = "--threads") -> int:
    """Set torch's CPU threads by the rule every command shares; return the count in force.

    ``threads``: the user's ``--threads`` (None: not given, 0: torch's choice). Not given, on
    the CPU, with ``d_model <= ONE_THREAD_D_MODEL`` (or ``d_model`` None meaning "small"):
    one thread. Otherwise torch's own choice is kept.
    """
    import torch

    if threads is not None:
        threads = check_int(option, threads, low=0)
    device_type = getattr(device, "type", None) or str(device).split(":")[0]
    if threads is None and device_type == "cpu" and (d_model is None
                                                     or d_model <= ONE_THREAD_D_MODEL):
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, but not "(default: None)" (such defaults are described
    in words, or there is none) nor "(default: False)" on flags, nor a second default where
    the help already says ``%(default)s``."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (
                action.help or ""):
            return action.help
        return super()._get_help_string(action)


def show_progress(flag: bool = True) -> bool:
    """Whether to draw progress bars: only when asked and stderr is a terminal (bars in a
    piped log are garbage)."""
    try:
        return bool(flag) and sys.stderr.isatty()
    except (AttributeError, ValueError):  # stderr replaced or closed
        return False


# --------------------------------------------------------------------------- config errors

_NAME_RE = re.compile(r"^([a-z_][a-z0-9_]*(?:\s*,\s*[a-z_][a-z0-9_]*)*):\s*(.*)$", re.S)


@contextlib.contextmanager
def options_of(flags: Dict[str, str]) -> Iterator[None]:
    """Turn a config's ``ValueError("field: message")`` into ``UsageError(--flag, message)``.

    ``flags`` maps config field names to the command's flags (``{"batch_size":
    "--batch-size"}``). A ValueError whose leading names are all in ``flags`` becomes a
    UsageError naming those flags; any other ValueError passes through (a bug, not a user
    mistake). This lets a command reuse a dataclass's ``__post_init__`` checks instead of
    copying them.
    """
    try:
        yield
    except ValueError as e:
        match = _NAME_RE.match(str(e))
        if match is None:
            raise
        names = [n.strip() for n in match.group(1).split(",")]
        if not all(n in flags for n in names):
            raise
        message = match.group(2)
        # Say field names as flags: those with an underscore (never English words), and the
        # leading names of a rule relating several options ("lr, min_lr: ... lr > 0").
        said = {n for n in flags if "_" in n} | (set(names) if len(names) > 1 else set())
        if said:  # one pass, so that a flag put in is never rewritten again
            pattern = "|".join(re.escape(n) for n in sorted(said, key=len, reverse=True))
            message = re.sub(rf"(?<![\w-])({pattern})(?![\w-])",
                             lambda m: flags[m.group(1)], message)
        raise UsageError("/".join(flags[n] for n in names), message) from e


def format_error(command: str, error: Union[UsageError, str]) -> str:
    """The line ``duollm <command>: error: <option>: <message>`` main prints for a mistake."""
    prefix = f"duollm {command}: error: " if command else "duollm: error: "
    return prefix + str(error)
