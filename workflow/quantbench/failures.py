"""Which failures are results and which are not.

A deterministic failure (the method cannot do this model: a shape it refuses, an unsupported
architecture) is a result: the cell's row says so, and running again would fail the same way.
A transient failure (the machine, not the method: killed by a signal, out of memory) is not: the
job fails, so that Snakemake's --retries (with attempt-scaled memory) can run it again, and
nothing is recorded that a rerun would take for finished.
"""
from __future__ import annotations

import signal


class Transient(RuntimeError):
    """A failure of the machine, not of the method."""


class Damaged(Transient):
    """An input that cannot be read whole: not the method's failure, and never a result."""


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (Transient, MemoryError)) or type(exc).__name__ == "OutOfMemoryError"


def from_exit(returncode: int, error: str | None) -> Exception:
    """The failure of a child process, from its exit code and the last error it printed."""
    if returncode < 0:
        return Transient(f"killed by {signal.Signals(-returncode).name}")
    if error and error.split(":")[0] in ("MemoryError", "OutOfMemoryError", "torch.OutOfMemoryError"):
        return Transient(error)
    return RuntimeError(error or f"exited with code {returncode}")
