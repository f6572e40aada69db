"""Shared test helpers: tiny transformers models and their weights in our (Meta) names."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from shardllama.config import ModelArgs
from shardllama.model import Transformer
from shardllama.kv_cache import KVCache, blocks_for


def seq_cache(model: Transformer, rows: int = 1) -> KVCache:
    """A block cache with room for ``rows`` sequences of ``max_seq_len`` in the contiguous layout that
    ``Transformer.forward`` assumes without tables (row b in blocks b * n .. b * n + n - 1)."""
    return model.new_cache(rows * blocks_for(model.max_seq_len))


def hf_to_meta(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Rename a transformers LlamaForCausalLM state dict to Meta names and rotary layout.

    Written independently of the loaders on purpose: the model test must not depend on the code the
    loader tests check.
    """
    hd = args.head_dim

    def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:  # rotate-half -> adjacent pairs
        return w.view(n_heads, 2, hd // 2, -1).transpose(1, 2).reshape(w.shape)

    sd = state_dict
    w = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if not args.tie_embeddings:
        w["output.weight"] = sd["lm_head.weight"]
    for i in range(args.n_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        w[q + "attention.wq.weight"] = unpermute(sd[p + "self_attn.q_proj.weight"], args.n_heads)
        w[q + "attention.wk.weight"] = unpermute(sd[p + "self_attn.k_proj.weight"], args.n_kv_heads)
        w[q + "attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        w[q + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        w[q + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        w[q + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        w[q + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        w[q + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        w[q + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    return w


TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` imported as module ``name`` (tools/ is not a package; its scripts import each other
    by name, so the module is registered under it)."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def library_or_skip(lib: ModuleType | None, what: str, why: str) -> ModuleType:
    """A compiled kernel library ``lib`` where it loaded; else the test skips, saying that ``what`` is
    unavailable and ``why`` -- or fails, where SHARDLLAMA_REQUIRE_KERNELS=1 (a CI that must run the kernels)."""
    if lib is None:
        message = f"{what} unavailable: {why}"
        if os.environ.get("SHARDLLAMA_REQUIRE_KERNELS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return lib
