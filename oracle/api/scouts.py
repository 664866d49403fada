"""Operator endpoints for Scout reputation (admin key): list, bans, one Scout with its evidence,
unban, reset. The state lives in Redis (oracle/trust/reputation.py); the Oracle's running view of
it in PeerHealth (oracle/trust/health.py), told of every operator decision."""

from __future__ import annotations

import time

from aiohttp import web

from .errors import APIError
from .schemas import ScoutReputation, ScoutReputationDeleted, ScoutReputationDetail, ScoutReputationList
from .state import STATE, OracleState



def reputation_store(request: web.Request):
    state: OracleState = request.app[STATE]
    if not request["key"].is_admin:
        raise APIError(403, "Scout reputation needs an admin key", type="permission_error", code="admin_required")
    if state.swarm is None or state.swarm.health.reputation is None:
        raise APIError(404, "This Oracle runs no swarm, so it keeps no Scout reputation", code="not_found")
    return state.swarm.health, state.swarm.health.reputation


def view(record: dict) -> ScoutReputation:
    banned = record["state"] == "banned" and record["ban_until"] > time.time()
    state = record["state"] if record["state"] != "banned" or banned else "quarantined"
    return ScoutReputation(**{**record, "state": state, "ban_until": record["ban_until"] if banned else None})


async def list_reputation(request: web.Request) -> web.Response:
    _, store = reputation_store(request)
    data = [view(r) for r in (await store.list()).values()]
    return web.json_response(text=ScoutReputationList(data=sorted(data, key=lambda r: r.peer_id)).model_dump_json())


async def list_bans(request: web.Request) -> web.Response:
    _, store = reputation_store(request)
    data = [v for v in (view(r) for r in (await store.list()).values()) if v.state == "banned"]
    return web.json_response(text=ScoutReputationList(data=sorted(data, key=lambda r: r.peer_id)).model_dump_json())


async def _one(request: web.Request) -> tuple[object, object, str, dict]:
    health, store = reputation_store(request)
    peer = request.match_info["peer_id"]
    record = (await store.list()).get(peer)
    if record is None:
        raise APIError(404, f"No reputation recorded for Scout '{peer}'", param="peer_id", code="not_found")
    return health, store, peer, record


async def get_scout(request: web.Request) -> web.Response:
    _, store, peer, record = await _one(request)
    taint = request.app[STATE].swarm.taint
    body = ScoutReputationDetail(**view(record).model_dump(), evidence=await store.evidence(peer),
                                 tainted=taint.report(peer) if taint is not None else None)
    return web.json_response(text=body.model_dump_json())


async def unban(request: web.Request) -> web.Response:
    health, store, peer, _ = await _one(request)
    await store.set_state(peer, "active")
    health.set_trust(peer, "active")
    _, _, _, record = await _one(request)
    return web.json_response(text=view(record).model_dump_json())


async def reset(request: web.Request) -> web.Response:
    health, store, peer, _ = await _one(request)
    await store.reset(peer)
    health.set_trust(peer, "active")
    return web.json_response(text=ScoutReputationDeleted(peer_id=peer, deleted=True).model_dump_json())
