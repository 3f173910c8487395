"""The one error hierarchy of the project.

Each class names its gRPC status code (as a string, so that this module stays free of
grpc); the service maps them to statuses with details and the client maps them back.
Field violations travel as google.rpc.BadRequest, resources as ResourceInfo.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FieldViolation:
    field: str
    description: str


class DatastoreError(Exception):
    """Base class: a failure the caller can act on, with a gRPC code."""

    code: str = "INTERNAL"
    #: One-line hint on how to mend it, printed by the CLI.
    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return self.message


class InvalidArgument(DatastoreError, ValueError):
    """Bad input: wrong dimension, NaN, k out of range, empty query, malformed line."""

    code = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, violations: list[FieldViolation] | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.violations = violations or []

    @classmethod
    def field(cls, name: str, description: str, hint: str | None = None) -> "InvalidArgument":
        return cls(f"{name}: {description}", violations=[FieldViolation(name, description)], hint=hint)


class NotFound(DatastoreError, KeyError):
    """Unknown id, tenant, collection, file or datastore."""

    code = "NOT_FOUND"

    def __init__(self, message: str, *, resource_type: str = "", resource_name: str = "", hint: str | None = None):
        super().__init__(message, hint=hint)
        self.resource_type = resource_type
        self.resource_name = resource_name


class AlreadyExists(DatastoreError):
    """The target already holds something that must not be overwritten."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(DatastoreError):
    """The datastore is in a state that forbids the call (wrong format version, corrupt files)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(DatastoreError):
    """A size limit was hit: message size, batch size, disk or map full."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, subject: str = "", hint: str | None = None):
        super().__init__(message, hint=hint)
        self.subject = subject


class Unauthenticated(DatastoreError):
    code = "UNAUTHENTICATED"


class PermissionDenied(DatastoreError):
    code = "PERMISSION_DENIED"


class DeadlineExceeded(DatastoreError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(DatastoreError):
    code = "UNAVAILABLE"


class Internal(DatastoreError):
    code = "INTERNAL"


#: Every class by its code, for the client side of the mapping.
BY_CODE: dict[str, type[DatastoreError]] = {
    c.code: c
    for c in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted,
              Unauthenticated, PermissionDenied, DeadlineExceeded, Unavailable, Internal)
}
