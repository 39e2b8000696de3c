"""How the API's answers leave a replica: a typed answer serialized once, the one error body for every
4xx (the app's exception handlers, the router's own 404 and 405 included), and the error counts
beside the successes in `streamrec_requests_total`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from ray import serve
from ray.serve.exceptions import RayServeException
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.api_schema import ErrorBody, http_error, validation_error
from services.metrics import ServeMetrics


def json_answer(answer: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A typed answer serialized once: returned as a Response, FastAPI does not validate it again
    against the route's response_model (which documents it at /docs)."""
    return Response(answer.model_dump_json(), status_code=status, media_type="application/json", headers=headers)


def error_answer(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=body.model_dump(mode="json"), headers=headers)


def replica_metrics() -> ServeMetrics | None:
    """The metrics of the replica serving this request (None outside a replica: unit tests)."""
    try:
        replica = serve.get_replica_context().servable_object
    except RayServeException:
        return None
    metrics = getattr(replica, "metrics", None)
    return metrics if isinstance(metrics, ServeMetrics) else None


def count_refusal(reason: str) -> None:
    """The edge refused a request (too large): counted on the replica that refused it."""
    if (metrics := replica_metrics()) is not None:
        metrics.refused(reason)


def count_error(request: Request, status: int) -> None:
    """An error answer counts in streamrec_requests_total beside the successes (same route label;
    `unmatched` for a path no route has), so the 5xx and 4xx shares can be read from it."""
    if (metrics := replica_metrics()) is not None:
        route = request.scope.get("route")
        label = f"{request.method} {route.path}" if route is not None and hasattr(route, "path") else "unmatched"
        metrics.requests.labels(label, str(status)).inc()


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Every 422: `{"error": "invalid request: <fields>", "detail": [{"field", "msg", "type"}]}`."""
    count_error(request, 422)
    return error_answer(422, validation_error(exc.errors()))


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Every other error (4xx, a 503): the message in `error` (and `detail`), the headers (Retry-After)."""
    count_error(request, exc.status_code)
    return error_answer(exc.status_code, http_error(exc.detail), exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Starlette's HTTPException is FastAPI's base class: its handler also shapes the router's own
    404 (no such route) and 405 answers."""
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)


__all__ = ["count_error", "count_refusal", "error_answer", "install_error_handlers", "json_answer", "replica_metrics"]
