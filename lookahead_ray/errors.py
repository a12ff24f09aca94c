"""The error family: every error a user can fix is a :class:`LookaheadError`.

The CLI prints a ``LookaheadError`` as one line and exits 2; anything else is a bug and keeps its traceback.
Each class also derives from the builtin a caller would expect (``ValueError``, ``RuntimeError``), so
``except ValueError`` keeps working. Pure module.
"""

from __future__ import annotations

from typing import Any


class LookaheadError(Exception):
    """An error in the user's config, data, models or services, with a message that says what to change."""


class ConfigError(LookaheadError, ValueError):
    """A config file, override or pre-flight check is invalid; the message names the source and the key."""


class RowError(LookaheadError, ValueError):
    """One bad input row. ``reason`` is a stable key for the report; file and row say where."""

    def __init__(self, reason: str, field: str | None, detail: str, file: str | None = None, row: int | None = None):
        self.reason, self.field, self.detail, self.file, self.row = reason, field, detail, file, row
        super().__init__(reason, field, detail, file, row)

    def at(self, file: str | None, row: int | None) -> RowError:
        return RowError(self.reason, self.field, self.detail, file, row)

    def __str__(self) -> str:
        # A whole-file error (not a list, truncated Parquet) has no row: the file alone says where.
        where = f"{self.file or '<records>'}" + (f", row {self.row}" if self.row is not None else "")
        field = f", field {self.field!r}" if self.field else ""
        return f"{where}{field}: {self.reason}: {self.detail}"

    def __reduce__(self):  # keep the fields when Ray ships the error between processes
        return (RowError, (self.reason, self.field, self.detail, self.file, self.row))


class ModelLoadError(LookaheadError, OSError):
    """A tokenizer or model could not be loaded from the directory or Hub id given."""


class ExportMismatchError(LookaheadError, RuntimeError):
    """The reloaded Hugging Face export does not reproduce the trained engine's logits."""


class JudgeUnavailableError(LookaheadError, RuntimeError):
    """The judge endpoint kept failing; judgements made so far are in the cache."""


class JobError(LookaheadError, RuntimeError):
    """A cluster job cannot be submitted or followed: unreachable address, refused token, missing job SDK,
    a working_dir or config that would not reach the cluster."""


class OutputInUseError(LookaheadError):
    """Another live run holds the output location (``storage.held_output``): names the holder and its lock file."""


FIXABLE_ERRNOS = {28: "no space left on the device", 122: "disk quota exceeded", 30: "the file system is read-only",
                  13: "permission denied", 1: "operation not permitted", 21: "it is a directory, not a file",
                  20: "a part of the path is a file, not a directory"}
"""OS errors a person fixes (ENOSPC, EDQUOT, EROFS, EACCES, EPERM, EISDIR, ENOTDIR), by errno, in words."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a training run; the message says at which step and from where a rerun resumes. The CLI
    prints it and exits 130, as a shell does for SIGINT."""


def find_in_causes(error: BaseException, match: Any) -> BaseException | None:
    """The first exception behind ``error`` for which ``match`` is true: itself, its causes and contexts, a Ray
    task's cause (``cause``) or a Ray Train worker's failures (``worker_failures``); else None."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if match(current):
            return current
        pending += [current.__cause__, current.__context__, getattr(current, "cause", None),
                    *getattr(current, "worker_failures", {}).values()]
    return None


def fixable_os_error(error: BaseException) -> OSError | None:
    """The OSError a person can act on behind ``error`` (see :func:`find_in_causes`), else None."""
    return find_in_causes(error, lambda e: isinstance(e, OSError) and e.errno in FIXABLE_ERRNOS)


def os_error_line(error: OSError) -> str:
    """One line: what happened, to which path, and what to do."""
    import re

    # A staged sibling (".NAME.tmp-HEX", storage.staging_path) or the lock of an output (".NAME.lookahead-lock",
    # storage.held_output) is named by the output it stands for.
    named = [re.sub(r"/\.([^/]+)\.(tmp-[0-9a-f]+|lookahead-lock)$", r"/\1", str(p))
             for p in (error.filename, error.filename2) if p]
    paths = " -> ".join(dict.fromkeys(named))
    advice = {28: "free space there (or write elsewhere) and rerun", 122: "free space there (or write elsewhere) and rerun",
              30: "write the output somewhere writable", 13: "fix the permissions or write elsewhere",
              1: "fix the permissions or write elsewhere"}.get(error.errno, "fix the path")
    return f"{FIXABLE_ERRNOS[error.errno]}: {paths or error.strerror}; {advice}"
