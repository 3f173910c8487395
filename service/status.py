"""DatastoreError <-> gRPC status with google.rpc details, both directions.

The server sends BadRequest field violations, ResourceInfo or QuotaFailure with
`abort_with_status`; the client decodes them with `rpc_status.from_call` back into the
same error class, so callers catch `InvalidArgument`, not `grpc.RpcError`.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from datastore import errors


def to_status(err: errors.DatastoreError) -> grpc.Status:
    details = []
    if isinstance(err, errors.InvalidArgument) and err.violations:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in err.violations]))
    elif isinstance(err, errors.NotFound) and err.resource_type:
        details.append(error_details_pb2.ResourceInfo(resource_type=err.resource_type,
                                                      resource_name=err.resource_name,
                                                      description=err.message))
    elif isinstance(err, errors.ResourceExhausted):
        details.append(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=err.subject, description=err.message)]))
    if err.hint:
        details.append(error_details_pb2.Help(links=[error_details_pb2.Help.Link(description=err.hint)]))
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    code = getattr(code_pb2, err.code)
    return rpc_status.to_status(status_pb2.Status(code=code, message=err.message, details=packed))


def from_rpc_error(e: grpc.RpcError) -> errors.DatastoreError:
    """The typed error a failed call stands for (details decoded when the server sent them)."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    message = e.details() if hasattr(e, "details") else str(e)
    cls = errors.BY_CODE.get(code.name, errors.DatastoreError)
    status = None
    try:
        status = rpc_status.from_call(e)
    except (ValueError, AttributeError):
        pass
    violations, resource, quota_subject, hint = [], ("", ""), "", None
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            violations = [errors.FieldViolation(v.field, v.description) for v in br.field_violations]
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            ri = error_details_pb2.ResourceInfo()
            detail.Unpack(ri)
            resource = (ri.resource_type, ri.resource_name)
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            qf = error_details_pb2.QuotaFailure()
            detail.Unpack(qf)
            quota_subject = qf.violations[0].subject if qf.violations else ""
        elif detail.Is(error_details_pb2.Help.DESCRIPTOR):
            h = error_details_pb2.Help()
            detail.Unpack(h)
            hint = h.links[0].description if h.links else None
    if cls is errors.InvalidArgument:
        err = errors.InvalidArgument(message, violations=violations, hint=hint)
    elif cls is errors.NotFound:
        err = errors.NotFound(message, resource_type=resource[0], resource_name=resource[1], hint=hint)
    elif cls is errors.ResourceExhausted:
        err = errors.ResourceExhausted(message, subject=quota_subject, hint=hint)
    else:
        err = cls(message, hint=hint)
    err.grpc_code = code  # type: ignore[attr-defined]
    return err
