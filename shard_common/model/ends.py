"""The two ends of the model the Oracle keeps: token embedding, and final norm + LM head."""

from __future__ import annotations

import torch

from .layers import rms_norm
from .linear import make_linear
from .memory import release_after_build
from .runtime import Runtime
from .weights import ModelWeights


class ModelEnds:
    def __init__(self, weights: ModelWeights, runtime: Runtime):
        tensors = weights.ends()
        self.config = weights.config
        self.runtime = runtime
        # The embedding stays in stored form; a step only dequantizes the rows it looks up.
        self.embedding = tensors["token_embd"]
        self.norm = tensors["output_norm"].dequantize().to(runtime.device)
        # The native int8 matmul (batched rows read the head's weights once) where the native
        # kernels run; the blocks' own Q8_0 weights stay on torch's kernel, as on the eager path.
        self.head = make_linear(tensors["output"], None, runtime.device, runtime.dtype, runtime.dense, "output",
                                native=runtime.native_ops)
        release_after_build(tensors.values())

    @torch.inference_mode()
    def embed(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long).cpu().numpy()
        if ids.size and (ids.min() < 0 or ids.max() >= self.embedding.rows):
            raise ValueError(f"token id out of range [0, {self.embedding.rows})")
        rows = self.embedding.take_rows(ids).dequantize()
        if self.config.embed_scale != 1.0:
            rows = rows * self.config.embed_scale
        return rows.to(self.runtime.device)

    def _normed(self, hidden: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden.to(self.runtime.device), self.norm, self.config.norm_eps, self.runtime.dtype)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [T, vocab] on the CPU (where sampling runs) for hidden states [T, d_model]."""
        return self.head(self._normed(hidden)).float().cpu()

    @torch.inference_mode()
    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 final hidden states [T, d_model] (after the final norm): what embeddings pool."""
        return self._normed(hidden).float().cpu()
