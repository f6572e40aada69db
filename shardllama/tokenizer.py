"""Text <-> token ids, on top of the engine (which only ever sees ids).

Four sources, one interface (:class:`Tokenizer`):

- a SentencePiece ``tokenizer.model`` (Meta's LLaMA 1/2 checkpoints), run by the ``sentencepiece`` package;
- a tiktoken ``tokenizer.model`` (Meta's Llama 3 checkpoints), run by ``tiktoken``: :mod:`.tiktoken_vocab`;
- an HF ``tokenizer.json``, run by the ``tokenizers`` package, with ``tokenizer_config.json`` /
  ``special_tokens_map.json`` / ``generation_config.json`` beside it read for BOS, EOS, stop ids and the
  chat template;
- the vocabulary embedded in a GGUF file.  llama.cpp stores the pieces, not a tokenizer, so a
  ``tokenizers.Tokenizer`` is assembled from them the way llama.cpp runs them: ``gpt2`` (byte-level BPE:
  tokens + merges, split first by a regex chosen by ``tokenizer.ggml.pre``) or ``llama`` (SentencePiece
  BPE: tokens + scores, ``<0xNN>`` byte tokens, ``▁`` for spaces, a space prefixed to each run of text).

Text passed to :meth:`Tokenizer.encode` may contain control tokens written out (``<|im_start|>``, ``<s>``),
as a rendered chat template does; they become their ids, like llama.cpp's ``parse_special`` and HF's
default.  :meth:`Tokenizer.decode` renders control tokens as nothing, like SentencePiece and llama.cpp.
"""

from __future__ import annotations

import abc
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece
import tokenizers

from .errors import ModelFileError, UnsupportedError, one_line
from .gguf_vocab import BYTE_PIECE, CHAR_BYTES, CONTROL, NORMAL, gguf_byte_level, gguf_sentencepiece, read_gguf_fields
from .stream_decode import StreamDecoder  # re-exported: part of this module's API

log = logging.getLogger(__name__)

# Control tokens that end a turn, recognised by their text as llama.cpp does (llama-vocab.cpp, "EOG" ids).
STOP_TEXTS = frozenset({
    "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>",
    "<end_of_turn>", "<EOT>", "<end_of_utterance>",
})



class Tokenizer(abc.ABC):
    """Text <-> ids.  Subclasses fill the attributes and implement ``_encode``, ``_decode``, ``_piece_bytes``."""

    kind: str  # "sentencepiece", "tiktoken", "tokenizer.json", "gguf-gpt2" or "gguf-llama"
    source: str  # the file it came from, for messages
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool  # whether encode() prepends BOS by default (from the model's metadata)
    stop_ids: frozenset[int]  # EOS and the other control tokens that end a turn
    chat_template: str | None  # jinja source, carried for the chat layer, not rendered here

    def encode(self, text: str, bos: bool | None = None, *, special: bool = True) -> list[int]:
        """Ids of ``text``, with BOS first if ``bos`` (None: ``self.add_bos``).

        ``special``: control tokens written in the text (``<|im_end|>``) become their ids; pass False for
        untrusted text, where they are tokenized as plain characters.
        """
        ids = self._encode(text, special)
        if self.add_bos if bos is None else bos:
            if self.bos_id is None:
                raise UnsupportedError(f"{self.source}: the tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; control tokens (BOS, EOS...) render as nothing, unknown ids are skipped."""
        return self._decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def token_text(self, id: int) -> str:
        """One token as printable text: ``" world"``, ``"<|im_end|>"``, a lone byte as ``"\\xe4"``."""
        id = int(id)
        if not 0 <= id < self.vocab_size:
            return ""
        return self._piece_bytes(id).decode("utf-8", "backslashreplace")

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.kind} {self.source} vocab={self.vocab_size} bos={self.bos_id} "
                f"eos={self.eos_id} add_bos={self.add_bos} stop={sorted(self.stop_ids)}>")

    def _init_common(self, kind: str, source: str, vocab_size: int, bos_id: int | None, eos_id: int | None,
                     add_bos: bool | None, stop_ids: set[int], chat_template: str | None) -> None:
        self.kind, self.source, self.vocab_size = kind, source, vocab_size
        for name, value in (("BOS", bos_id), ("EOS", eos_id)):
            if value is not None and not 0 <= value < vocab_size:
                raise ModelFileError(f"{source}: {name} id {value} is outside the vocabulary (size {vocab_size})")
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = bool(add_bos) and bos_id is not None
        self.stop_ids = frozenset(i for i in stop_ids | {eos_id} if i is not None and 0 <= i < vocab_size)
        self.chat_template = chat_template

    @abc.abstractmethod
    def _encode(self, text: str, special: bool) -> list[int]: ...

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @abc.abstractmethod
    def _piece_bytes(self, id: int) -> bytes: ...


class SentencePieceTokenizer(Tokenizer):
    """A ``tokenizer.model``, run by the sentencepiece package."""

    def __init__(self, path: Path, config: Mapping[str, Any]):
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except Exception as e:  # OSError / RuntimeError on a file that is not a model proto
            raise ModelFileError(f"{path}: not a readable SentencePiece model ({one_line(e)})") from None
        self._sp = sp
        n = sp.get_piece_size()
        control = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
        pieces = sorted({sp.id_to_piece(i) for i in control} - {""}, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, pieces))) if pieces else None
        self._special_ids = {sp.id_to_piece(i): i for i in control}
        stops = {i for i in control if sp.id_to_piece(i) in STOP_TEXTS}
        bos, eos = sp.bos_id(), sp.eos_id()
        add_bos = config.get("add_bos_token")
        self._init_common("sentencepiece", str(path), n, bos if bos >= 0 else None, eos if eos >= 0 else None,
                          add_bos if isinstance(add_bos, bool) else True, stops, _chat_template(config, path.parent))

    def _encode(self, text: str, special: bool) -> list[int]:
        if not special or self._special_re is None:
            return self._sp.encode(text)
        ids: list[int] = []
        start = 0
        # Each stretch between control tokens gets its own dummy-prefix space, as in llama.cpp.
        for m in self._special_re.finditer(text):
            if m.start() > start:
                ids += self._sp.encode(text[start:m.start()])
            ids.append(self._special_ids[m.group()])
            start = m.end()
        if start < len(text):
            ids += self._sp.encode(text[start:])
        return ids

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def _piece_bytes(self, id: int) -> bytes:
        piece = self._sp.id_to_piece(id)
        if self._sp.is_byte(id):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("▁", " ").encode()


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer``: from a tokenizer.json, or assembled from a GGUF vocabulary.

    ``spelling`` says how its pieces map to bytes, for token_text(): "byte-level" (GPT-2's table),
    "sentencepiece" (``▁`` and ``<0xNN>``) or "other" (ask the decoder).
    """

    def __init__(self, tk: tokenizers.Tokenizer, *, kind: str, source: str, spelling: str, vocab_size: int,
                 bos_id: int | None, eos_id: int | None, add_bos: bool | None, stop_ids: set[int],
                 chat_template: str | None):
        self._tk = tk
        self._plain_tk: tokenizers.Tokenizer | None = None  # a copy that reads control tokens as text
        self._spelling = spelling
        self._special = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        self._init_common(kind, source, vocab_size, bos_id, eos_id, add_bos, stop_ids, chat_template)

    def _encode(self, text: str, special: bool) -> list[int]:
        tk = self._tk
        if not special:
            if self._plain_tk is None:
                self._plain_tk = tokenizers.Tokenizer.from_str(tk.to_str())
                self._plain_tk.encode_special_tokens = True
            tk = self._plain_tk
        # BOS is ours to add: a post-processor in tokenizer.json would add it a second time.
        return tk.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self._tk.decode(ids, skip_special_tokens=True)

    def _piece_bytes(self, id: int) -> bytes:
        piece = self._tk.id_to_token(id)
        if piece is None:
            return b""
        if id in self._special:
            return piece.encode()
        if self._spelling == "byte-level":
            if all(c in CHAR_BYTES for c in piece):
                return bytes(CHAR_BYTES[c] for c in piece)
            return piece.encode()
        if self._spelling == "sentencepiece":
            m = BYTE_PIECE.fullmatch(piece)
            return bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode()
        return self._tk.decode([id], skip_special_tokens=False).encode()


# ---------------------------------------------------------------------------------------------------------
# Loading


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
    from .tiktoken_vocab import TiktokenTokenizer, looks_like_tiktoken  # here: that module imports this one

    if looks_like_tiktoken(head):
        add_bos = config.get("add_bos_token")
        return TiktokenTokenizer(path, add_bos=add_bos if isinstance(add_bos, bool) else None,
                                 chat_template=_chat_template(config, path.parent))
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


def _chat_template(config: Mapping[str, Any], directory: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) else None


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
                       chat_template=_chat_template(config, directory))


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
