"""The model runtime: loading, quantized layers, spans of blocks, KV caches, the two ends."""
