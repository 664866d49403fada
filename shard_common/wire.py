"""Binary frames on the data plane: a fixed prelude, a JSON header, raw tensor bytes.

    prelude  2s magic b"SH" | B version | B kind | I header length | Q body length   (big-endian)
    header   UTF-8 JSON of the kind's message (at most MAX_HEADER bytes)
    body     raw little-endian tensor bytes (at most MAX_BODY bytes)

Every size is checked before anything is read, so a malformed or hostile frame costs at most a
prelude's worth of reading before it is refused.
"""

from __future__ import annotations

import asyncio
import struct

import torch
from pydantic import ValidationError

from .link_sim import LINK
from .protocol import MESSAGES, Kind, Message

MAGIC = b"SH"
VERSION = 1
PRELUDE = struct.Struct(">2sBBIQ")
MAX_HEADER = 64 * 1024
MAX_BODY = 512 * 1024 * 1024
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
# int8 on the wire: every run of INT8_BLOCK values of the last dimension shares one fp16 scale
# (max |x| / 127); the scales travel first, then the int8 values. ~1.06 bytes per value.
INT8_BLOCK = 32


class FrameError(ValueError):
    """The peer sent something that is not a valid frame; the connection should be dropped."""


async def write_frame(writer: asyncio.StreamWriter, kind: Kind, message: Message, body: bytes = b"") -> None:
    header = message.model_dump_json().encode()
    head = PRELUDE.pack(MAGIC, VERSION, int(kind), len(header), len(body)) + header
    if LINK.active:  # benchmarks: the frame travels a simulated WAN link (link_sim.py)
        LINK.send(writer, head + body)
        return
    writer.write(head)
    if body:
        writer.write(body)
    await writer.drain()


async def read_frame(reader: asyncio.StreamReader) -> tuple[Kind, Message, bytes]:
    prelude = await reader.readexactly(PRELUDE.size)
    magic, version, kind, header_len, body_len = PRELUDE.unpack(prelude)
    if magic != MAGIC or version != VERSION:
        raise FrameError(f"not a shard frame (magic {magic!r}, version {version})")
    try:
        kind = Kind(kind)
    except ValueError:
        raise FrameError(f"unknown message kind {kind}") from None
    if header_len > MAX_HEADER or body_len > MAX_BODY:
        raise FrameError(f"frame too large (header {header_len}, body {body_len} bytes)")
    header = await reader.readexactly(header_len)
    body = await reader.readexactly(body_len) if body_len else b""
    try:
        return kind, MESSAGES[kind].model_validate_json(header), body
    except ValidationError as e:
        raise FrameError(f"malformed {kind.name} header: {e.errors()[0]['msg']}") from None


def tensor_to_bytes(t: torch.Tensor, dtype: str) -> bytes:
    if dtype == "int8":
        return _int8_to_bytes(t)
    t = t.detach().to(device="cpu", dtype=DTYPES[dtype]).contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _int8_to_bytes(t: torch.Tensor) -> bytes:
    if t.shape[-1] % INT8_BLOCK:
        raise ValueError(f"int8 wire format needs a last dimension divisible by {INT8_BLOCK}, not {t.shape[-1]}")
    blocks = t.detach().float().cpu().reshape(-1, INT8_BLOCK)
    scales = (blocks.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-8).half()
    values = torch.round(blocks / scales.float()).clamp(-127, 127).to(torch.int8)
    return scales.numpy().tobytes() + values.numpy().tobytes()


def through_wire(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """``t`` as it arrives after travelling in ``dtype`` (what the far side computes with)."""
    if dtype == "float32":
        return t.float()
    return tensor_from_bytes(tensor_to_bytes(t, dtype), dtype, tuple(t.shape)).float()


def wire_size(shape: tuple[int, ...], dtype: str) -> int:
    n = torch.Size(shape).numel()
    if dtype == "int8":
        return n + n // INT8_BLOCK * 2
    return n * torch.finfo(DTYPES[dtype]).bits // 8


def tensor_from_bytes(body: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype not in DTYPES:
        raise FrameError(f"unknown dtype {dtype!r}")
    if dtype == "int8" and (not shape or shape[-1] % INT8_BLOCK):
        raise FrameError(f"int8 tensors need a last dimension divisible by {INT8_BLOCK}, not {tuple(shape)}")
    expected = wire_size(shape, dtype)
    if len(body) != expected:
        raise FrameError(f"tensor body has {len(body)} bytes, {tuple(shape)} {dtype} needs {expected}")
    if dtype == "int8":
        n_scales = torch.Size(shape).numel() // INT8_BLOCK
        scales = torch.frombuffer(bytearray(body[: 2 * n_scales]), dtype=torch.float16).float().reshape(-1, 1)
        values = torch.frombuffer(bytearray(body[2 * n_scales:]), dtype=torch.int8).float().reshape(-1, INT8_BLOCK)
        return (values * scales).reshape(shape)
    torch_dtype = DTYPES[dtype]
    raw_dtype = torch.int16 if torch_dtype == torch.bfloat16 else torch_dtype
    t = torch.frombuffer(bytearray(body), dtype=raw_dtype)
    if torch_dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t.reshape(shape)
