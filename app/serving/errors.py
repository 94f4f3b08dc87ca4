"""Errors of the serving layer. Each has a stable machine-readable ``code``; how a protocol answers it
(the HTTP status, the body's shape) is decided by the protocol's codec (``app.api.errors``)."""

from __future__ import annotations


class ServiceError(Exception):
    """A request cannot be served. ``retry_after_s``: the condition is transient, retry after it."""

    def __init__(self, code: str, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidRequestError(ServiceError):
    """The request cannot be read (body, encoding, an option that is not even well-formed)."""


class InvalidOptionsError(ServiceError):
    """Well-formed options that this model cannot honour (classes, blocks, limits on the answer)."""

    def __init__(self, message: str, code: str = "invalid_options") -> None:
        super().__init__(code, message)


class QueueFullError(ServiceError):
    def __init__(self, model: str, retry_after_s: int) -> None:
        super().__init__(
            "queue_full",
            f"model {model!r} has too much queued work; retry after {retry_after_s} s",
            retry_after_s=retry_after_s,
        )


class DeadlineExceededError(ServiceError):
    """The queue was too long for the request to start in time: overload, so it says when to retry."""

    def __init__(self, model: str, timeout_s: float, retry_after_s: int = 1) -> None:
        super().__init__(
            "deadline_exceeded",
            f"the request to model {model!r} could not start within {timeout_s:g} s",
            retry_after_s=retry_after_s,
        )


class EngineUnresponsiveError(ServiceError):
    """The shared engine process neither answered nor went away in the longest time a job can take."""

    def __init__(self, waited_s: float, retry_after_s: int) -> None:
        super().__init__(
            "engine_unresponsive",
            f"the engine process has not answered within {waited_s:g} s",
            retry_after_s=retry_after_s,
        )


class ClientDisconnectedError(ServiceError):
    """The client went away before its work started; nobody reads this answer."""

    def __init__(self) -> None:
        super().__init__("client_disconnected", "the client disconnected before the work started")


class ComputeFailedError(ServiceError):
    def __init__(self, model: str, cause: BaseException) -> None:
        super().__init__(
            "compute_failed", f"model {model!r} failed on this request: {type(cause).__name__}: {cause}"
        )
        self.cause = cause


class OutOfMemoryError(ServiceError):
    """The model ran out of (accelerator) memory on this request even when computed on its own."""

    def __init__(self, model: str, cause: BaseException, retry_after_s: int = 1) -> None:
        super().__init__(
            "out_of_memory",
            f"model {model!r} ran out of memory on this request, even computed alone: {cause}",
            retry_after_s=retry_after_s,
        )
        self.cause = cause


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error."""
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def compute_error(model: str, cause: BaseException, retry_after_s: int = 1) -> ServiceError:
    """What a request whose image failed in the model gets: retryable when memory ran out (a
    transient condition), a failure otherwise."""
    if is_out_of_memory(cause):
        return OutOfMemoryError(model, cause, retry_after_s)
    return ComputeFailedError(model, cause)


class ShuttingDownError(ServiceError):
    def __init__(self) -> None:
        super().__init__("shutting_down", "the service is shutting down", retry_after_s=1)
