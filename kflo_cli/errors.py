"""The one exception type kflo raises for user errors."""


class KfloError(Exception):
    """A problem the user can fix: bad input, a missing file, a mismatched checkpoint.

    The message is one sentence that names the problem and the fix. The CLI prints it without a traceback
    and exits with code 2.
    """
