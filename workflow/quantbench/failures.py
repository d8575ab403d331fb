"""Which failures are results and which are not.

A deterministic failure (the method cannot do this model: a shape it refuses, an unsupported
architecture) is a result: the cell's row says so, and running again would fail the same way.
A transient failure (the machine, not the method: killed by a signal, out of memory) is not: the
job fails, so that Snakemake's --retries (with attempt-scaled memory) can run it again, and
nothing is recorded that a rerun would take for finished.
"""
from __future__ import annotations

import re
import signal
from pathlib import Path


class Transient(RuntimeError):
    """A failure of the machine, not of the method."""


class Damaged(Transient):
    """An input that cannot be read whole: not the method's failure, and never a result."""


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (Transient, MemoryError)) or type(exc).__name__ == "OutOfMemoryError"


def last_error(log: str | Path) -> str | None:
    """What a job's log says went wrong: its last "SomethingError: message" line, else its last line."""
    log = Path(log)
    if not log.is_file():
        return None
    text = log.read_text(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return error_line(text) or (lines[-1] if lines else None)


def error_line(output: str) -> str | None:
    """The last "SomethingError: message" of a program's output; worker threads may glue it to a
    traceback line ("^^ValueError: ...")."""
    errors = re.findall(r"\b(\w+(?:Error|Exception): .+)$", output, flags=re.MULTILINE)
    return errors[-1] if errors else None


def from_exit(returncode: int, error: str | None) -> Exception:
    """The failure of a child process, from its exit code and the last error it printed."""
    if returncode < 0:
        return Transient(f"killed by {signal.Signals(-returncode).name}")
    if error and error.split(":")[0] in ("MemoryError", "OutOfMemoryError", "torch.OutOfMemoryError"):
        return Transient(error)
    return RuntimeError(error or f"exited with code {returncode}")
