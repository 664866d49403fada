"""Tokenizer and chat template rebuilt from the model file itself."""

from __future__ import annotations

import datetime
import json
from functools import lru_cache

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .model.weights import TokenizerSpec

# Split patterns of the pre-tokenizers llama.cpp names in ``tokenizer.ggml.pre``; anything not
# listed uses GPT-2's own pattern (ByteLevel with use_regex).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CONTROL, USER_DEFINED = 3, 4
DEFAULT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    pass


def _byte_level_pre(pre: str):
    if pre in ("llama-bpe", "llama3", "falcon3", "smaug-bpe"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre == "smollm":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE files carry scores, not merges: a merge a+b exists when a, b and a+b are
    all pieces, ranked by the score of a+b (higher first)."""
    index = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, i in index.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in index and right in index:
                ranked.append((-scores[i], index[left], index[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_hf_tokenizer(spec: TokenizerSpec) -> HFTokenizer:
    if spec.model == "hf":
        return HFTokenizer.from_str(spec.tokenizer_json)
    vocab = {t: i for i, t in enumerate(spec.tokens)}
    if spec.model == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in spec.merges]
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=spec.pre in ("llama-bpe", "llama3")))
        tok.pre_tokenizer = _byte_level_pre(spec.pre)
        tok.decoder = decoders.ByteLevel()
    elif spec.model == "llama":
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=_spm_merges(spec.tokens, spec.scores), byte_fallback=True, fuse_unk=True, unk_token="<unk>" if "<unk>" in vocab else None))
        prefix = [normalizers.Prepend("▁")] if spec.add_space_prefix else []
        tok.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([
            decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *([decoders.Strip(" ", 1, 0)] if prefix else []),
        ])
    else:
        raise ValueError(f"tokenizer model {spec.model!r} is not supported (gpt2, llama)")
    specials = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(spec.tokens, spec.token_types)
        if kind in (CONTROL, USER_DEFINED)
    ]
    tok.add_special_tokens(specials)
    return tok


class Tokenizer:
    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        self.hf = build_hf_tokenizer(spec)
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self.bos_id = spec.bos_id
        self.eos_id = spec.eos_id
        self.stop_ids = frozenset(i for i in [spec.eos_id, *spec.extra_stop_ids] if i is not None)
        self.bos_token = self.hf.id_to_token(spec.bos_id) if spec.bos_id is not None else ""
        self.eos_token = self.hf.id_to_token(spec.eos_id) if spec.eos_id is not None else ""
        self._template = _compile_template(spec.chat_template or DEFAULT_TEMPLATE)
        self._byte_level = spec.model == "gpt2" or (spec.model == "hf" and "ByteLevel" in spec.tokenizer_json)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if (self.spec.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (what OpenAI's logprobs ``bytes`` reports)."""
        piece = self.hf.id_to_token(token_id) or ""
        if self._byte_level:
            table = _unicode_to_byte()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
            return piece.encode()
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])
        return piece.replace("▁", " ").encode()

    def token_text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except TemplateError as e:
            raise ChatTemplateError(str(e)) from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt)
        # The template writes BOS itself when the model wants one.
        return self.encode(text, add_bos=False if self.bos_token and text.startswith(self.bos_token) else None)


def _raise(message: str):
    raise TemplateError(message)


def _compile_template(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    return env.from_string(source)


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}
