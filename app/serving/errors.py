"""Errors of the serving layer, each with an HTTP status and a stable machine-readable code."""

from __future__ import annotations


class ServiceError(Exception):
    """A request cannot be served; ``status`` and ``code`` say how the API answers it."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


class QueueFullError(ServiceError):
    def __init__(self, model: str, retry_after_s: int) -> None:
        super().__init__(
            503,
            "queue_full",
            f"model {model!r} has too much queued work; retry after {retry_after_s} s",
            headers={"Retry-After": str(retry_after_s)},
        )


class DeadlineExceededError(ServiceError):
    """The queue was too long for the request to start in time: overload, so it says when to retry."""

    def __init__(self, model: str, timeout_s: float, retry_after_s: int = 1) -> None:
        super().__init__(
            504,
            "deadline_exceeded",
            f"the request to model {model!r} could not start within {timeout_s:g} s",
            headers={"Retry-After": str(retry_after_s)},
        )


class ClientDisconnectedError(ServiceError):
    """The client went away before its work started; nobody reads this answer."""

    def __init__(self) -> None:
        super().__init__(499, "client_disconnected", "the client disconnected before the work started")


class ComputeFailedError(ServiceError):
    def __init__(self, model: str, cause: BaseException) -> None:
        super().__init__(
            500,
            "compute_failed",
            f"model {model!r} failed on this request: {type(cause).__name__}: {cause}",
        )
        self.cause = cause


class OutOfMemoryError(ServiceError):
    """The model ran out of (accelerator) memory on this request even when computed on its own."""

    def __init__(self, model: str, cause: BaseException, retry_after_s: int = 1) -> None:
        super().__init__(
            503,
            "out_of_memory",
            f"model {model!r} ran out of memory on this request, even computed alone: {cause}",
            headers={"Retry-After": str(retry_after_s)},
        )
        self.cause = cause


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error."""
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def compute_error(model: str, cause: BaseException, retry_after_s: int = 1) -> ServiceError:
    """What a request whose image failed in the model gets: 503 + Retry-After when memory ran out
    (a transient condition), 500 otherwise."""
    if is_out_of_memory(cause):
        return OutOfMemoryError(model, cause, retry_after_s)
    return ComputeFailedError(model, cause)


class ShuttingDownError(ServiceError):
    def __init__(self) -> None:
        super().__init__(503, "shutting_down", "the service is shutting down", headers={"Retry-After": "1"})
