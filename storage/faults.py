"""Faults of the machine, not of the input: they fail the run loudly and are never recorded.

A full disk, an I/O error, a quota, a read-only file system, memory exhaustion or running out of
file descriptors say nothing about the video or row being handled. Recording them as a rejected
row would drop good data for good (stage results are cached), so every per-row guard asks
`environment_fault(exc)` first and raises EnvironmentFault instead: the shard fails, nothing is
cached, and a rerun (after the disk is freed) resumes where it stopped.

PyAV reports ENOSPC as `av.error.FFmpegError` subclasses carrying `errno`, so faults are
classified by errno (and by MemoryError), never by exception type alone.
"""

from __future__ import annotations

import errno

ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EIO", "EDQUOT", "EROFS", "ENOMEM", "EMFILE", "ENFILE", "ESTALE")
    if hasattr(errno, name)
)


class EnvironmentFault(RuntimeError):
    """The machine failed (disk full, I/O error, out of memory): not bad input, never cached."""


def environment_fault(exc: BaseException | None) -> bool:
    """True if `exc`, or an exception it was raised from, is a fault of the machine."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, (EnvironmentFault, MemoryError)):
            return True
        if getattr(exc, "errno", None) in ENVIRONMENT_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def raise_if_environment(exc: BaseException, doing: str) -> None:
    """Re-raise a machine fault as one clear EnvironmentFault line; return for anything else."""
    if isinstance(exc, EnvironmentFault):
        raise exc
    if environment_fault(exc):
        code = getattr(exc, "errno", None)
        name = errno.errorcode.get(code, "") if isinstance(code, int) else type(exc).__name__
        raise EnvironmentFault(
            f"{doing}: environment fault ({name or type(exc).__name__}: {exc}); nothing was recorded as bad input, "
            "free the disk or memory and run again: finished work is kept"
        ) from exc
