"""User-facing errors: one clear message, no traceback, non-zero exit."""

from __future__ import annotations


class VkdError(Exception):
    """A problem with the user's input (config, paths, data, models, checkpoints).

    Entry points print ``vkd-ds: error: <message>`` and exit with status 2
    instead of a traceback, so the message must name the problem and where.
    """


EXIT_USER_ERROR = 2


def library_reason(err: BaseException) -> str:
    """A library's reason for an error, in one line: its cause's first line where it wraps one (as
    transformers' config validation does), at most 300 characters."""
    cause = err.__cause__ or err
    reason = str(cause).strip().splitlines() or [type(cause).__name__]
    line = reason[0].strip()
    if isinstance(cause, KeyError):  # its message is the missing name alone
        line = f"unknown name {line}"
    return line if len(line) <= 300 else line[:297] + "..."
