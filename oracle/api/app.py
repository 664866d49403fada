"""The aiohttp application: one route table serves both ``/v1/...`` and unprefixed paths and
generates ``/openapi.json``; a middleware turns every failure into an OpenAI error body."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiohttp import web
from pydantic import BaseModel
from redis.exceptions import RedisError
from pydantic.json_schema import models_json_schema

from . import embeddings, response_schemas, responses, routes, schemas, scouts
from .dashboard import dashboard
from .auth import ANONYMOUS, presented_key
from .errors import APIError
from .metrics import Metrics
from .state import OracleState

access_log = logging.getLogger("oracle.access")
log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    streams: bool = False


ROUTES = [
    Route("POST", "/chat/completions", routes.chat_completions, "Create a chat completion",
          schemas.ChatCompletionRequest, schemas.ChatCompletion, streams=True),
    Route("POST", "/completions", routes.completions, "Create a completion (legacy)",
          schemas.CompletionRequest, schemas.Completion, streams=True),
    Route("GET", "/models", routes.list_models, "List models", response=schemas.ModelList),
    Route("GET", "/models/{model}", routes.get_model, "Retrieve a model", response=schemas.ModelCard),
]
ROUTES += [
    Route("GET", "/chat/completions", routes.list_stored, "List stored chat completions", response=schemas.StoredList),
    Route("GET", "/chat/completions/{completion_id}", routes.get_stored, "Retrieve a stored chat completion",
          response=schemas.StoredCompletion),
    Route("POST", "/chat/completions/{completion_id}", routes.update_stored, "Update a stored chat completion's metadata",
          schemas.MetadataUpdate, schemas.StoredCompletion),
    Route("DELETE", "/chat/completions/{completion_id}", routes.delete_stored, "Delete a stored chat completion",
          response=schemas.Deleted),
    Route("GET", "/chat/completions/{completion_id}/messages", routes.stored_messages,
          "List the messages of a stored chat completion", response=schemas.StoredMessageList),
]
ROUTES += [
    Route("POST", "/embeddings", embeddings.create_embeddings, "Create embeddings (pooled final hidden states)",
          embeddings.EmbeddingRequest, embeddings.EmbeddingList),
    Route("POST", "/responses", responses.create_response, "Create a model response (Responses API)",
          response_schemas.ResponseRequest, response_schemas.ResponseObject, streams=True),
    Route("GET", "/responses/{response_id}", responses.get_response, "Retrieve a stored response",
          response=response_schemas.ResponseObject),
    Route("DELETE", "/responses/{response_id}", responses.delete_response, "Delete a stored response",
          response=response_schemas.ResponseDeleted),
    Route("GET", "/responses/{response_id}/input_items", responses.input_items, "List a stored response's input items",
          response=response_schemas.InputItemList),
]
ROUTES.append(Route("GET", "/cluster/status", routes.cluster_status, "Swarm coverage, Scouts and load (admin)",
                    response=schemas.ClusterStatus))
ROUTES += [
    Route("GET", "/scouts", scouts.list_reputation, "Every Scout's golden-ticket reputation (admin)",
          response=schemas.ScoutReputationList),
    Route("GET", "/scouts/bans", scouts.list_bans, "Banned Scouts (admin)", response=schemas.ScoutReputationList),
    Route("GET", "/scouts/{peer_id}", scouts.get_scout, "One Scout's reputation and the evidence of its failures (admin)",
          response=schemas.ScoutReputationDetail),
    Route("POST", "/scouts/{peer_id}/unban", scouts.unban, "Trust a Scout again: active, clean window (admin)",
          response=schemas.ScoutReputation),
    Route("POST", "/scouts/{peer_id}/reset", scouts.reset, "Forget a Scout's reputation (admin)",
          response=schemas.ScoutReputationDeleted),
]
UNVERSIONED = [Route("GET", "/health", routes.health, "Liveness and readiness", response=schemas.Health),
               Route("GET", "/swarm", routes.swarm_info, "How a Scout joins: the Oracle's libp2p addresses (public)",
                     response=schemas.SwarmInfo)]
PUBLIC_PATHS = {"/health", "/openapi.json", "/dashboard", "/swarm"}  # the dashboard checks its key itself
SHARDS_PREFIX = "/shards/"  # the model's shard files, public like the model itself


def error_status_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request.headers.get("X-Request-Id") or f"req_{uuid.uuid4().hex[:24]}"
    request["request_id"] = request_id
    started = time.perf_counter()
    metrics = request.app[routes.STATE].metrics
    try:
        response = await handler(request)
    except APIError as e:
        response = e.response()
    except RedisError as e:
        if metrics is not None:
            metrics.redis_errors.inc()
        log.warning("Redis error in %s %s (request id %s): %s", request.method, request.path, request_id, e)
        response = APIError(503, f"The store is unreachable right now; retry shortly (request id {request_id})",
                            type="server_error", code="store_unavailable", headers={"Retry-After": "2"}).response()
    except web.HTTPException as e:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status)
        message = {
            404: f"Unknown route: {request.method} {request.path}",
            413: f"Request body too large (limit {request.app['max_body_bytes']} bytes)",
        }.get(e.status, e.reason)
        response = APIError(e.status, message, type=error_status_type(e.status), code=code).response()
    except Exception:
        log.exception("internal error in %s %s (request id %s)", request.method, request.path, request_id)
        response = APIError(500, f"Internal server error (request id {request_id})", type="server_error", code="internal_error").response()
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    if metrics is not None:
        metrics.requests.labels(route, request.method, str(response.status)).inc()
        metrics.request_seconds.labels(route).observe(time.perf_counter() - started)
        if response.status == 429:
            metrics.rate_limited.inc()
    access_log.info("%s %s %d %.1fms", request.method, request.path, response.status, (time.perf_counter() - started) * 1000,
                    extra={"request_id": request_id})
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Sets request["key"] (the caller) and charges one request against its limits."""
    public = request.path in PUBLIC_PATHS or (request.path == "/metrics" and request.app["public_metrics"])
    if public or request.path.startswith(SHARDS_PREFIX) or request.match_info.http_exception is not None:
        return await handler(request)
    state: OracleState = request.app[routes.STATE]
    if state.auth is None:
        request["key"] = ANONYMOUS
        return await handler(request)
    key = await state.auth.verify(presented_key(request))
    request["key"] = key
    if state.rate_limits is not None:
        request["ratelimit"] = await state.rate_limits.charge(key, requests=1)
    return await handler(request)


async def add_ratelimit_headers(request: web.Request, response: web.StreamResponse) -> None:
    decision = request.get("ratelimit")
    if decision is not None:
        for name, value in decision.headers().items():
            response.headers.setdefault(name, value)


def openapi_document(model_id: str) -> dict:
    models = {m for r in ROUTES + UNVERSIONED for m in (r.request, r.response) if m is not None} | {schemas.ErrorResponse}
    refs, defs = models_json_schema([(m, "serialization") for m in models], ref_template="#/components/schemas/{model}")
    paths: dict = {}
    for r in ROUTES + UNVERSIONED:
        op: dict = {"summary": r.summary, "operationId": f"{r.method.lower()}{r.path.replace('/', '_').replace('{', '').replace('}', '')}"}
        params = [p.strip("{}") for p in r.path.split("/") if p.startswith("{")]
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params]
        if r.request is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[(r.request, "serialization")]}}}
        ok = {"application/json": {"schema": refs[(r.response, "serialization")]}}
        if r.streams:
            ok["text/event-stream"] = {"schema": {"type": "string", "description": "SSE chunks when stream=true"}}
        error = {"content": {"application/json": {"schema": refs[(schemas.ErrorResponse, "serialization")]}}}
        op["responses"] = {"200": {"description": "OK", "content": ok}, "default": {"description": "Error", **error}}
        for prefix in ("/v1", "") if r in ROUTES else ("",):
            paths.setdefault(prefix + r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Shard Oracle", "version": "0.1.0", "description": f"OpenAI-compatible API serving {model_id}"},
        "paths": paths,
        "security": [{"bearer": []}],
        "components": {"schemas": defs.get("$defs", {}), "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def create_app(state: OracleState, max_body_bytes: int = 4 << 20, shard_dir: Path | None = None,
               public_metrics: bool = False) -> web.Application:
    app = web.Application(middlewares=[errors_middleware, auth_middleware], client_max_size=max_body_bytes)
    app.on_response_prepare.append(add_ratelimit_headers)
    app[routes.STATE] = state
    app["max_body_bytes"] = max_body_bytes
    app["public_metrics"] = public_metrics
    if state.metrics is None:
        state.metrics = Metrics()
        state.metrics.watch(state)
        state.scheduler.on_step = state.metrics.batch.observe

    async def metrics(request: web.Request) -> web.Response:
        if not public_metrics and not request["key"].is_admin:
            raise APIError(403, "Metrics need an admin key (or serve --public-metrics)", type="permission_error",
                           code="admin_required")
        return web.Response(body=state.metrics.exposition(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/dashboard", dashboard)
    for r in ROUTES:
        for prefix in ("/v1", ""):
            app.router.add_route(r.method, prefix + r.path, r.handler)
    for r in UNVERSIONED:
        app.router.add_route(r.method, r.path, r.handler)
    document = json.dumps(openapi_document(state.model_ids[0]))

    async def openapi(_: web.Request) -> web.Response:
        return web.Response(text=document, content_type="application/json")

    app.router.add_get("/openapi.json", openapi)
    if shard_dir is not None:
        # Scouts download the blocks of their span from here (and check every sha256).
        app.router.add_static(SHARDS_PREFIX.rstrip("/"), shard_dir, show_index=False, follow_symlinks=False)

    async def start_scheduler(_: web.Application) -> None:
        state.scheduler.start()

    async def drain(_: web.Application) -> None:
        await state.scheduler.close()

    app.on_startup.append(start_scheduler)
    app.on_shutdown.append(drain)
    return app
