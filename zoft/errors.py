"""Errors that the CLI turns into one line on stderr (no traceback)."""


class ZoftError(Exception):
    """Runtime failure with a one-line message (exit 1)."""


class UsageError(ZoftError):
    """Bad user input (exit 2)."""
