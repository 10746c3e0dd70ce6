"""The one exception type kflo raises for user errors."""


class KfloError(Exception):
    """A problem the user can fix: bad input, a missing file, a mismatched checkpoint.

    The message is one sentence that names the problem and the fix. The CLI prints it without a traceback
    and exits with code 2.
    """


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed (host or device): a request too large for this machine."""
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return "can't allocate memory" in text or "not enough memory" in text or "out of memory" in text.lower()

