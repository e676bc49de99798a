"""User-facing errors: one clear message, no traceback, non-zero exit."""

from __future__ import annotations


class VkdError(Exception):
    """A problem with the user's input (config, paths, data, models, checkpoints).

    Entry points print ``vkd-ds: error: <message>`` and exit with status 2
    instead of a traceback, so the message must name the problem and where.
    """


EXIT_USER_ERROR = 2
