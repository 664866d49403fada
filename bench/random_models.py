"""Random-weight Llama checkpoints, for machines that cannot download a model (the GPU device
machine has no model hub): a byte-level BPE tokenizer trained on a few sentences and padded with
placeholder tokens to the vocabulary size, and transformers' ``LlamaForCausalLM`` at a named
shape with random weights, saved as safetensors. Quantize them at load (``--quantize q4_0``).

    python -m bench.random_models --out DIR tiny 1b 8b
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SHAPES = {
    # name: hidden size, layers, MLP width, query heads, KV heads, vocabulary
    "tiny": (64, 4, 128, 4, 2, 512),
    "1b": (2048, 16, 8192, 32, 8, 32000),
    "8b": (4096, 32, 14336, 32, 8, 32000),
}
TEXT = ("The quick brown fox jumps over the lazy dog. A swarm of Scouts computes the blocks of a model. "
        "The capital of France is Paris. Numbers: 0 1 2 3 4 5 6 7 8 9. ") * 8


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 400), special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.add_tokens([f"<unused{i}>" for i in range(vocab_size - tok.get_vocab_size())])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def write_random_llama(folder: Path, shape: str, seed: int = 0, dtype: torch.dtype | None = None) -> Path:
    """A random Llama checkpoint of ``shape`` in ``folder`` (fp32 for "tiny", bf16 otherwise)."""
    import transformers

    hidden, layers, ffn, heads, kv_heads, vocab = SHAPES[shape]
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder, vocab)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                                      rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    dtype = dtype or (torch.float32 if shape == "tiny" else torch.bfloat16)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its own dtype: an 8B model in fp32 first would take 32 GB
    try:
        model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # a loader that drops a norm fails the comparison
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("shapes", nargs="+", choices=list(SHAPES))
    args = parser.parse_args()
    for shape in args.shapes:
        t0 = time.monotonic()
        path = write_random_llama(Path(args.out) / shape, shape)
        print(f"{shape}: {path} in {time.monotonic() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
