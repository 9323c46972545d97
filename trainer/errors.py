"""Errors that are the user's to fix: reported as one line with the fix, never as a traceback."""


class UserError(Exception):
    """A problem in the user's config, data or files. The message names the problem and the fix."""


class DivergenceHalt(UserError):
    """Training stopped on purpose by the divergence guard; the message names the bundle to replay."""
