"""Which tokenizer a file holds, and loading it (:func:`load_tokenizer`): a GGUF's vocabulary, a HuggingFace
``tokenizer.json``, a SentencePiece ``tokenizer.model`` or Meta's tiktoken ``tokenizer.model`` (the classes are
in :mod:`.tokenizer` and :mod:`.tiktoken_vocab`; this module is the one that knows them all)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tokenizers

from .errors import ModelFileError, UnsupportedError, one_line
from .gguf_vocab import CONTROL, NORMAL, gguf_byte_level, gguf_sentencepiece, read_gguf_fields
from .tiktoken_vocab import TiktokenTokenizer, looks_like_tiktoken
from .tokenizer import STOP_TEXTS, HFTokenizer, SentencePieceTokenizer, Tokenizer, chat_template_of
def load_tokenizer(path: str | Path | None, *, gguf_fields: Mapping[str, Any] | None = None) -> Tokenizer:
    """The tokenizer in ``path``: a SentencePiece or tiktoken ``tokenizer.model``, an HF ``tokenizer.json``,
    a ``.gguf`` (its embedded vocabulary; ``gguf_fields``, if given, is its metadata already parsed into
    python values), or a directory holding tokenizer.json or tokenizer.model.  ``path`` may be None when
    ``gguf_fields`` is given.
    """
    if path is None:
        if gguf_fields is None:
            raise ModelFileError("no tokenizer: neither a tokenizer file nor GGUF metadata was given")
        return _from_gguf_fields(gguf_fields, "GGUF metadata")
    path = Path(path)
    if gguf_fields is not None:
        return _from_gguf_fields(gguf_fields, str(path))
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise ModelFileError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: tokenizer file not found") from None
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read tokenizer file ({one_line(e)})") from None
    if head[:4] == b"GGUF":
        return _from_gguf_fields(read_gguf_fields(path), str(path))
    if path.suffix == ".json" or head.lstrip()[:1] == b"{":
        return _from_tokenizer_json(path)
    if path.suffix == ".gguf":
        raise ModelFileError(f"{path}: not a GGUF file (no GGUF magic)")
    config = _read_json(path.parent / "tokenizer_config.json")
    if looks_like_tiktoken(head):
        add_bos = config.get("add_bos_token")
        return TiktokenTokenizer(path, add_bos=add_bos if isinstance(add_bos, bool) else None,
                                 chat_template=chat_template_of(config, path.parent))
    return SentencePieceTokenizer(path, config)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file beside the tokenizer; {} when absent."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not a readable JSON file ({one_line(e)})") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{path}: expected a JSON object")
    return value


# --- tokenizer.json


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _from_tokenizer_json(path: Path) -> Tokenizer:
    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text)
        tk = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # OSError, JSONDecodeError, or the library's own Exception on a bad spec
        raise ModelFileError(f"{path}: not a readable tokenizer.json ({one_line(e)})") from None
    directory = path.parent
    config = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")
    generation = _read_json(directory / "generation_config.json")

    def special_id(name: str) -> int | None:
        content = _token_content(config.get(name)) or _token_content(special_map.get(name))
        return tk.token_to_id(content) if content else None

    bos_id, eos_id = special_id("bos_token"), special_id("eos_token")
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):  # no flag: does the post-processor put BOS in front?
        first = tk.encode("a", add_special_tokens=True).ids[:1]
        add_bos = bos_id is not None and first == [bos_id] != tk.encode("a", add_special_tokens=False).ids[:1]
    added = tk.get_added_tokens_decoder()
    stops = {i for i, t in added.items() if t.special and t.content in STOP_TEXTS}
    extra = generation.get("eos_token_id")
    stops |= {i for i in (extra if isinstance(extra, list) else [extra]) if isinstance(i, int)}
    return HFTokenizer(tk, kind="tokenizer.json", source=str(path), spelling=_spelling(spec.get("decoder")),
                       vocab_size=max(tk.get_vocab(with_added_tokens=True).values(), default=-1) + 1,
                       bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, stop_ids=stops,
                       chat_template=chat_template_of(config, directory))


def _spelling(decoder: Any) -> str:
    """How a tokenizer.json's pieces spell bytes, judged from its decoder."""
    text = json.dumps(decoder)
    if '"ByteLevel"' in text:
        return "byte-level"
    if '"ByteFallback"' in text or '"Metaspace"' in text or "\u2581" in text or "\\u2581" in text:
        return "sentencepiece"
    return "other"


# --- GGUF


def _from_gguf_fields(fields: Mapping[str, Any], source: str) -> Tokenizer:
    model = fields.get("tokenizer.ggml.model")
    if model is None:
        raise ModelFileError(f"{source}: no embedded tokenizer (tokenizer.ggml.model missing); "
                             "give a tokenizer file instead")
    if model not in ("gpt2", "llama"):
        raise UnsupportedError(f"{source}: unsupported GGUF tokenizer model {model!r} (supported: 'gpt2', 'llama')")
    tokens = [str(t) for t in fields.get("tokenizer.ggml.tokens") or ()]
    n = len(tokens)
    if not n:
        raise ModelFileError(f"{source}: GGUF tokenizer has no tokens (tokenizer.ggml.tokens)")
    types = [int(t) for t in fields.get("tokenizer.ggml.token_type") or [NORMAL] * n]
    if len(types) != n:
        raise ModelFileError(f"{source}: {len(types)} token types for {n} tokens")

    def token_id(key: str, default: int | None = None) -> int | None:
        value = fields.get(f"tokenizer.ggml.{key}", default)
        if value is None:
            return None
        if not 0 <= int(value) < n:
            raise ModelFileError(f"{source}: tokenizer.ggml.{key} = {value} is outside the vocabulary (size {n})")
        return int(value)

    spm = model == "llama"
    if spm:  # llama.cpp's defaults for SentencePiece files that leave the ids out
        bos, eos = token_id("bos_token_id", 1), token_id("eos_token_id", 2)
        tk = gguf_sentencepiece(fields, tokens, types, token_id("unknown_token_id", 0), source)
    else:
        bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
        tk = gguf_byte_level(fields, tokens, types, source)
    stops = {i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL and t in STOP_TEXTS}
    stops |= {i for i in (token_id("eot_token_id"), token_id("eom_token_id")) if i is not None}
    add_bos = fields.get("tokenizer.ggml.add_bos_token", spm)
    template = fields.get("tokenizer.chat_template")
    return HFTokenizer(tk, kind=f"gguf-{model}", source=source, spelling="sentencepiece" if spm else "byte-level",
                       vocab_size=n, bos_id=bos, eos_id=eos, add_bos=bool(add_bos), stop_ids=stops,
                       chat_template=template if isinstance(template, str) else None)
