"""Model configuration: one frozen object that everything takes.

Built from Meta ``params.json``, HF ``config.json`` or GGUF metadata by the ``from_*`` constructors;
derived sizes (``head_dim``, ``n_rep``) are properties, computed from the stored fields.
Per-worker sizes live in the sharding plan, never here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from . import rope
from .errors import ModelFileError, UnsupportedError


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int  # FFN width (w1/w3 rows, w2 columns)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048  # the context the model was trained for
    tie_embeddings: bool = False  # output head shares tok_embeddings
    # RoPE scaling (shardllama.rope): one divisor per rotary frequency (head_dim // 2), or None for plain
    # rotary; rope_scaling says what they came from, for messages.
    rope_freq_factors: tuple[float, ...] | None = None
    rope_scaling: str | None = None

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelFileError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ModelFileError(f"model config: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ModelFileError(
                f"model config: n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ModelFileError(f"model config: head_dim {self.head_dim} must be even for rotary embeddings")
        if self.rope_freq_factors is not None:  # a JSON list (workers, shard manifests) becomes a tuple again
            object.__setattr__(self, "rope_freq_factors", tuple(float(f) for f in self.rope_freq_factors))
            if len(self.rope_freq_factors) != self.head_dim // 2:
                raise ModelFileError(f"model config: {len(self.rope_freq_factors)} rope frequency factors for "
                                     f"head_dim {self.head_dim} (expected {self.head_dim // 2})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (1 for multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (what workers and shard manifests receive); ``ModelArgs(**d)`` rebuilds it."""
        d = dataclasses.asdict(self)
        if d["rope_freq_factors"] is not None:
            d["rope_freq_factors"] = list(d["rope_freq_factors"])
        return d

    # ---- constructors -------------------------------------------------------------------------------

    @classmethod
    def from_params_json(cls, params: Mapping[str, Any] | str | Path, vocab_size: int | None = None,
                         rope_override: Mapping[str, float] | None = None) -> "ModelArgs":
        """Meta's params.json (LLaMA 1/2/3).  LLaMA-1 writes ``vocab_size: -1``: pass the real size.
        ``use_scaled_rope`` carries no numbers: Meta's are used, ``rope_override`` (--rope-scaling) on top."""
        where = "params.json"
        if not isinstance(params, Mapping):
            where = str(params)
            params = _read_json(Path(params))
        try:
            dim = int(params["dim"])
            n_heads = int(params["n_heads"])
            n_layers = int(params["n_layers"])
        except KeyError as e:
            raise ModelFileError(f"params.json: missing key {e.args[0]!r}") from None
        vocab = int(params.get("vocab_size", -1))
        if vocab <= 0:
            if vocab_size is None:
                raise ModelFileError("params.json: vocab_size is -1; it must come from the checkpoint")
            vocab = vocab_size
        # FFN width, exactly as Meta's FeedForward computes it.
        hidden = int(2 * (4 * dim) / 3)
        if params.get("ffn_dim_multiplier") is not None:
            hidden = int(float(params["ffn_dim_multiplier"]) * hidden)
        multiple_of = int(params.get("multiple_of", 256))
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        theta = float(params.get("rope_theta", 10000.0))
        factors, scaling = rope.from_meta(params, dim // n_heads, theta, rope_override, where)
        return cls(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(params.get("n_kv_heads") or n_heads),
            vocab_size=vocab,
            hidden_dim=hidden,
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=theta,
            max_seq_len=int(params.get("max_seq_len", 2048)),
            rope_freq_factors=factors,
            rope_scaling=scaling,
        )

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | str | Path) -> "ModelArgs":
        """HF ``config.json`` of a ``LlamaForCausalLM``."""
        where = "config.json"
        if not isinstance(config, Mapping):
            where = str(config)
            config = _read_json(Path(config))
        archs = config.get("architectures") or ["LlamaForCausalLM"]
        model_type = config.get("model_type", "llama")
        if "LlamaForCausalLM" not in archs and model_type != "llama":
            raise UnsupportedError(f"{where}: unsupported architecture {archs[0]!r} (only LlamaForCausalLM)")
        # transformers < 5 writes rope_scaling, 5.x rope_parameters (which also holds rope_theta).
        scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
        if not isinstance(scaling, Mapping):
            raise ModelFileError(f"{where}: rope_scaling must be an object, got {scaling!r}")
        try:
            n_heads = int(config["num_attention_heads"])
            theta = float(config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
            head_dim = config.get("head_dim")
            if head_dim is not None and int(head_dim) != int(config["hidden_size"]) // n_heads:
                raise UnsupportedError(f"{where}: head_dim {head_dim} != hidden_size / num_attention_heads")
            factors, described = rope.from_hf(scaling, int(config["hidden_size"]) // n_heads, theta, where)
            args = cls(
                dim=int(config["hidden_size"]),
                n_layers=int(config["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
                vocab_size=int(config["vocab_size"]),
                hidden_dim=int(config["intermediate_size"]),
                norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                max_seq_len=int(config.get("max_position_embeddings", 2048)),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                rope_freq_factors=factors,
                rope_scaling=described,
            )
        except KeyError as e:
            raise ModelFileError(f"{where}: missing key {e.args[0]!r}") from None
        return args

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any], *, vocab_size: int, tie_embeddings: bool,
                         rope_freqs: list[float] | None = None) -> "ModelArgs":
        """GGUF metadata as a plain ``{key: value}`` dict (architecture ``llama``); ``rope_freqs``: the values
        of a ``rope_freqs.weight`` tensor (Llama 3.1's scaling, as llama.cpp's converter stores it)."""
        arch = fields.get("general.architecture")
        if arch != "llama":
            raise UnsupportedError(f"GGUF: unsupported architecture {arch!r} (only 'llama')")

        def get(key: str, default: Any = None) -> Any:
            value = fields.get(f"llama.{key}", default)
            if value is None:
                raise ModelFileError(f"GGUF: missing metadata key 'llama.{key}'")
            return value

        dim = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        rope_dims = fields.get("llama.rope.dimension_count")
        if rope_dims is not None and int(rope_dims) != dim // n_heads:
            raise UnsupportedError(f"GGUF: partial rotary (rope.dimension_count {rope_dims}) is not supported")
        for key in ("attention.key_length", "attention.value_length"):  # Mistral Nemo-style wider heads
            size = fields.get(f"llama.{key}")
            if size is not None and int(size) != dim // n_heads:
                raise UnsupportedError(f"GGUF: llama.{key} {size} differs from embedding_length / head_count "
                                       f"({dim // n_heads}); heads of another width are not supported")
        factors, scaling = rope.from_gguf(fields, rope_freqs, dim // n_heads, "GGUF")
        return cls(
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            vocab_size=int(fields.get("llama.vocab_size", vocab_size)),
            hidden_dim=int(get("feed_forward_length")),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            max_seq_len=int(get("context_length", 2048)),
            tie_embeddings=tie_embeddings,
            rope_freq_factors=factors,
            rope_scaling=scaling,
        )


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a JSON object")
    return data
