"""Shard files: converted by the Oracle at start, fetched by Scouts over HTTP, checked by sha256."""

from __future__ import annotations

import pytest
import requests

from oracle.swarm.local_scouts import LocalScout
from shard_common.model import shards


def test_fetch_verify_and_refetch_a_truncated_file(oracle, weights, tmp_path):
    base = oracle.url + "/shards"
    manifest = shards.fetch(base, tmp_path, 3, 7, progress=False)
    part = shards.load(manifest, 3, 7)
    assert sorted(part.tensors) == sorted(k for k in weights.tensors if k.split(".")[1] in {"3", "4", "5", "6"} and k.startswith("blk."))
    for name, t in part.tensors.items():
        assert t.qtype == weights.tensors[name].qtype and (t.data == weights.tensors[name].data).all()
    victim = manifest.parent / shards.block_file(4)
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated
    with pytest.raises(shards.CorruptShard):
        shards.load(manifest, 3, 7)
    shards.fetch(base, tmp_path, 3, 7, progress=False)
    assert shards.verify_file(manifest.parent, victim.name, requests.get(base + "/manifest.json", timeout=5).json()["files"][victim.name])
    shards.load(manifest, 3, 7)


def test_shard_files_are_public_but_nothing_else_is(oracle):
    assert requests.get(oracle.url + "/shards/manifest.json", timeout=5).status_code == 200
    assert requests.get(oracle.url + "/shards/../identity.key", timeout=5).status_code == 404
    assert requests.get(oracle.url + "/v1/models", timeout=5).status_code == 401


def test_scout_downloads_its_span_from_the_oracle(oracle, tmp_path):
    scout = LocalScout((10, 20), tmp_path, ["--oracle-url", oracle.url])
    try:
        assert scout.address.peer_id.startswith("12D3KooW")
        cached = list((tmp_path / "shards").glob("*/block-*.safetensors"))
        assert sorted(p.name for p in cached) == [shards.block_file(i) for i in range(10, 20)]
    finally:
        scout.stop()
