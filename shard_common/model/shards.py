"""The shard format: a model converted once into content-addressed files a Scout can fetch
block by block.

    <dir>/manifest.json      format, source sha256, config, tokenizer, and for every file its
                             sha256 and size; which file holds each block and the two ends
    <dir>/block-007.safetensors   one block's tensors in stored (quantized) form
    <dir>/ends.safetensors        token embedding, final norm, LM head

Tensors keep their GGML bytes; each file's safetensors metadata records every tensor's type and
logical shape. A file whose sha256 does not match the manifest is never loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from .config import ModelConfig
from .qtensor import QTensor
from .weights import ModelWeights, TokenizerSpec

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"


class CorruptShard(ValueError):
    """A shard file is missing, truncated or altered."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def block_file(index: int) -> str:
    return f"block-{index:03d}.safetensors"


ENDS_FILE = "ends.safetensors"


def _write(path: Path, tensors: dict[str, QTensor]) -> None:
    arrays, meta = {}, {}
    for name, t in tensors.items():
        data = np.ascontiguousarray(t.data)
        arrays[name] = data.view(np.uint8).reshape(data.shape[0], -1) if data.ndim else data.view(np.uint8)
        meta[name] = json.dumps({"type": t.qtype.name, "shape": list(t.shape), "dtype": str(data.dtype)})
    save_file(arrays, str(path), metadata=meta)


def _read(path: Path) -> dict[str, QTensor]:
    out = {}
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
        for name in f.keys():
            info = json.loads(meta[name])
            raw = f.get_tensor(name)
            data = raw.view(np.dtype(info["dtype"]))
            if info["type"] in ("F32", "F16", "BF16"):
                data = data.reshape(info["shape"])
            out[name] = QTensor(QT[info["type"]], tuple(info["shape"]), data)
    return out


def convert(weights: ModelWeights, source_sha: str, root: Path, progress: bool = True) -> Path:
    """Write the shard set for ``weights`` under ``root/<source_sha[:16]>``; a complete, valid set
    already there is reused. Returns the manifest's path."""
    out = Path(root) / source_sha[:16]
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("source_sha256") == source_sha and all(
                    verify_file(out, name, info) for name, info in manifest["files"].items()):
                return manifest_path
        except (ValueError, KeyError, CorruptShard):
            pass
        log.warning("shard set in %s is incomplete or corrupt: converting again", out)
    out.mkdir(parents=True, exist_ok=True)
    config = weights.config
    groups = {block_file(i): {k: v for k, v in weights.tensors.items() if k.startswith(f"blk.{i}.")} for i in range(config.n_layers)}
    groups[ENDS_FILE] = {k: v for k, v in weights.tensors.items() if not k.startswith("blk.")}
    files = {}
    for name, tensors in tqdm(groups.items(), desc="converting to shards", unit="file", disable=not progress):
        _write(out / name, tensors)
        files[name] = {"sha256": sha256_file(out / name), "size": (out / name).stat().st_size}
    manifest = {
        "format": FORMAT,
        "name": weights.name,
        "source_sha256": source_sha,
        "config": config.to_dict(),
        "tokenizer": dataclasses.asdict(weights.tokenizer),
        "blocks": [block_file(i) for i in range(config.n_layers)],
        "ends": ENDS_FILE,
        "files": files,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest))
    tmp.replace(manifest_path)  # the manifest appears last: a set with a manifest is complete
    return manifest_path


def set_id(manifest_path: Path) -> str:
    """A shard set's id: what Oracles and Scouts compare to know they mean the same model."""
    return json.loads(Path(manifest_path).read_text())["source_sha256"][:16]


def verify_file(directory: Path, name: str, info: dict) -> bool:
    path = Path(directory) / name
    return path.is_file() and path.stat().st_size == info["size"] and sha256_file(path) == info["sha256"]


def load(manifest_path: Path, start: int, end: int, with_ends: bool = False) -> ModelWeights:
    """Weights holding blocks [start, end) (and the ends if asked), every file checked first."""
    manifest_path = Path(manifest_path)
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise CorruptShard(f"{manifest_path}: unknown shard format {manifest.get('format')}")
    directory = manifest_path.parent
    names = manifest["blocks"][start:end] + ([manifest["ends"]] if with_ends else [])
    tensors: dict[str, QTensor] = {}
    for name in names:
        if not verify_file(directory, name, manifest["files"][name]):
            raise CorruptShard(f"{directory / name} is missing or does not match its sha256")
        tensors.update(_read(directory / name))
    return ModelWeights(
        config=ModelConfig.from_dict(manifest["config"]), tensors=tensors,
        tokenizer=TokenizerSpec(**manifest["tokenizer"]), name=manifest["name"],
    )


def fetch(base_url: str, cache_root: Path, start: int, end: int, with_ends: bool = False, progress: bool = True,
          attempts: int = 3, headers: dict[str, str] | None = None) -> Path:
    """Download the manifest and the files for blocks [start, end) from ``base_url`` (an Oracle's
    ``/shards``) into ``cache_root/<source sha>``; files already there and valid are kept, a
    corrupt or truncated one is fetched again. Returns the local manifest's path."""
    import urllib.request

    def get(url: str):
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60)

    with get(f"{base_url}/{MANIFEST}") as r:
        manifest = json.loads(r.read())
    directory = Path(cache_root) / manifest["source_sha256"][:16]
    directory.mkdir(parents=True, exist_ok=True)
    names = manifest["blocks"][start:end] + ([manifest["ends"]] if with_ends else [])
    missing = [n for n in names if not verify_file(directory, n, manifest["files"][n])]
    total = sum(manifest["files"][n]["size"] for n in missing)
    with tqdm(total=total, unit="B", unit_scale=True, desc="downloading shards", disable=not progress or not missing) as bar:
        for name in missing:
            info = manifest["files"][name]
            for attempt in range(1, attempts + 1):
                part = directory / (name + ".part")
                with get(f"{base_url}/{name}") as r, open(part, "wb") as f:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
                part.replace(directory / name)
                if verify_file(directory, name, info):
                    break
                log.warning("%s failed its sha256 check (attempt %d of %d)", name, attempt, attempts)
                bar.update(-info["size"])
            else:
                raise CorruptShard(f"{name} from {base_url} never matched its sha256")
    manifest_path = directory / MANIFEST
    manifest_path.write_text(json.dumps(manifest))
    return manifest_path
