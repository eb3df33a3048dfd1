"""One exception type for mistakes a user can fix (bad flag, missing file, mismatched keys).

Scripts catch :class:`UserError`, print its one-sentence message and exit with status 2;
everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in one sentence."""
