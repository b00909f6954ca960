"""Errors the Model side raises that the Gateway answers with 503 + Retry-After."""

from ray.serve.exceptions import BackPressureError


class Unavailable(BackPressureError):
    """No answer that a retry would not cure (the index is loading, a shard is down, a roll is
    under way). A BackPressureError, so that the Gateway answers 503 with Retry-After, also
    through Ray's task-error wrapping; the message says why."""

    def __init__(self, message: str = "the model is unavailable", retry_after_s: float | None = None):
        super().__init__(0, 0, 503, retry_after_s)
        self.args = (message, retry_after_s)
        self._message = message

    def __str__(self) -> str:
        return self._message


def why(e: BaseException) -> str:
    """The last line of an error (of its cause, for Ray's wrapped task errors), for one log line."""
    cause = getattr(e, "cause", None) or e
    return (str(cause).strip().splitlines() or [type(cause).__name__])[-1][:300]
