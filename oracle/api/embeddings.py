"""``/v1/embeddings``: vectors from the model's final hidden states.

Each input becomes a prefill-only sequence (``Sequence.pooling``) on the same scheduler as
generation, so embeddings batch with everything else and run over the swarm unchanged. The
vector is the mean over the input's tokens of the final-norm hidden states (``--embedding-pooling
last``: the last token's), L2-normalized.
"""

from __future__ import annotations

import base64
from typing import Literal

import torch
from aiohttp import web
from pydantic import Field

from oracle.engine.sampler import SamplingParams
from oracle.engine.sequence import Sequence

from .errors import APIError, bad_request
from .generation import run_to_end, submit
from .routes import check_model, parse, reserve_tokens, settle_tokens
from .schemas import Schema
from .state import STATE

MAX_INPUTS = 256


class EmbeddingRequest(Schema):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        x = self.input
        if isinstance(x, str):
            return [x]
        if x and all(isinstance(t, int) for t in x):
            return [list(x)]
        return list(x)


class EmbeddingUsage(Schema):
    prompt_tokens: int
    total_tokens: int


class Embedding(Schema):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 with encoding_format=base64


class EmbeddingList(Schema):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def encode(vector: torch.Tensor, fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(vector.to(torch.float32).numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()


async def create_embeddings(request: web.Request) -> web.Response:
    state = request.app[STATE]
    req: EmbeddingRequest = await parse(request, EmbeddingRequest)
    model = check_model(state, req.model)
    inputs = req.inputs()
    if not inputs:
        raise bad_request("input must not be empty", "input", "invalid_value")
    if len(inputs) > MAX_INPUTS:
        raise bad_request(f"at most {MAX_INPUTS} inputs per request", "input", "invalid_value")
    width = state.scheduler.engine.ends.config.d_model
    if req.dimensions is not None and req.dimensions > width:
        raise bad_request(f"dimensions must be at most {width}, this model's hidden size", "dimensions", "invalid_value")
    tok = state.tokenizer
    encoded = []
    for i, item in enumerate(inputs):
        ids = tok.encode(item) if isinstance(item, str) else item
        if not ids:
            raise bad_request(f"input[{i}] is empty", "input", "invalid_value")
        if any(not 0 <= t < tok.vocab_size for t in ids):
            raise bad_request(f"input[{i}] contains a token id outside the vocabulary", "input", "invalid_value")
        if len(ids) > state.context_length:
            raise APIError(400, f"This model's maximum context length is {state.context_length} tokens, however input[{i}] has "
                           f"{len(ids)} tokens. Please reduce the length of the input.", param="input", code="context_length_exceeded")
        encoded.append(ids)
    prompt_tokens = sum(len(ids) for ids in encoded)
    reserved = await reserve_tokens(request, prompt_tokens)
    seqs = [Sequence(ids, SamplingParams(max_tokens=1), tok, state.context_length, pooling=state.embedding_pooling) for ids in encoded]
    job = submit(state.scheduler, seqs)
    await run_to_end(job, request, state.scheduler, state.metrics)
    await settle_tokens(request, reserved, prompt_tokens)
    data = []
    for i, s in enumerate(seqs):
        vector = s.embedding
        if req.dimensions is not None:
            # Shorter vectors as OpenAI gives them: the first dimensions, re-normalized.
            vector = torch.nn.functional.normalize(vector[: req.dimensions], dim=0)
        data.append(Embedding(index=i, embedding=encode(vector, req.encoding_format)))
    body = EmbeddingList(data=data, model=model, usage=EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens))
    return web.json_response(text=body.model_dump_json())
