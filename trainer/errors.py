"""Errors that are the user's to fix: reported as one line with the fix, never as a traceback."""


class UserError(Exception):
    """A problem in the user's config, data or files. The message names the problem and the fix."""
