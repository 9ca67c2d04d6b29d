"""The one exception type for mistakes a user can fix.

Command-line entry points catch :class:`UserError`, print its message as a single line on
stderr and exit with code 2. Library code raises it for bad flag values, missing data files,
broken checkpoints and the like; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem caused by the user's input; the message names the problem and the fix."""
