"""RoPE scaling (Llama 3.1's ``llama3`` and ``linear``): tiny random models made by transformers, read back
from config.json, from a Meta params.json with ``use_scaled_rope`` and from a GGUF carrying
``rope_freqs.weight``, must give transformers' logits; the sharded engine the reference's; and the same
weights without the scaling must give clearly different logits (so these tests can fail).

The scaling is made strong on purpose: head_dim 16, theta 10000 and an original context of 32 put the
rotary wavelengths (6 to 20 000 positions) on both sides of the llama3 band, so most frequencies change.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from shardllama.config import ModelArgs
from shardllama.errors import UnsupportedError, UsageError
from shardllama.loading import load_weights, open_checkpoint
from shardllama.model import Transformer
from tests.helpers import hf_to_meta, seq_cache
from tests.test_loading import write_gguf, write_meta

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.2)
THETA = 10000.0
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
LINEAR = {"rope_type": "linear", "factor": 4.0}
TOKENS = torch.tensor([[1, 17, 42, 99, 3, 3, 64, 8, 0, 55, 21, 70, 5, 6, 7, 88, 12, 31, 44, 2, 9, 61, 33, 47]])


def hf_model(scaling: dict | None) -> "transformers.LlamaForCausalLM":
    params = {"rope_theta": THETA, **(scaling or {"rope_type": "default"})}
    config = transformers.LlamaConfig(**BASE, rope_parameters=params)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def our_logits(args: ModelArgs, weights) -> torch.Tensor:
    model = Transformer(args, weights, max_seq_len=64)
    return model.forward(TOKENS, seq_cache(model), all_logits=True)


def llamacpp_rope_freqs(scaling: dict, head_dim: int) -> list[float]:
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf.py computes it (written out here on purpose,
    independently of shardllama.rope)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / THETA ** (i / head_dim))
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


@pytest.fixture(scope="module", params=["llama3", "linear"])
def scaled(request):
    scaling = LLAMA3 if request.param == "llama3" else LINEAR
    model = hf_model(scaling)
    return scaling, model, hf_logits(model)


def test_config_json_as_transformers_saves_it(tmp_path, scaled):
    scaling, model, ref = scaled
    model.save_pretrained(tmp_path)
    with open_checkpoint(tmp_path) as ckpt:
        args, weights = ckpt.args, load_weights(ckpt, torch.float32)
    assert args.rope_scaling.startswith(scaling["rope_type"])
    torch.testing.assert_close(our_logits(args, weights), ref, rtol=1e-4, atol=1e-4)
    # The same weights with plain rotary: clearly another model, so the comparison above can fail.
    plain = our_logits(args.replace(rope_freq_factors=None, rope_scaling=None), weights)
    assert (plain - ref).abs().max() > 0.1


def test_config_json_in_the_older_rope_scaling_spelling(tmp_path, scaled):
    """Llama 3.1's own config.json: ``rope_scaling`` beside ``rope_theta`` (transformers < 5)."""
    scaling, model, ref = scaled
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(rope_theta=THETA, rope_scaling={"type" if scaling is LINEAR else "rope_type": scaling["rope_type"],
                                                   **{k: v for k, v in scaling.items() if k != "rope_type"}})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with open_checkpoint(tmp_path) as ckpt:
        torch.testing.assert_close(our_logits(ckpt.args, load_weights(ckpt, torch.float32)), ref, rtol=1e-4, atol=1e-4)


def meta_params(**extra) -> dict:
    return {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 100, "multiple_of": 32,
            "ffn_dim_multiplier": 0.5, "norm_eps": 1e-5, "rope_theta": THETA, **extra}


def test_meta_use_scaled_rope_takes_metas_numbers_and_says_so(tmp_path, caplog):
    """params.json says only ``use_scaled_rope`` (and ``rope_scaling_factor``): Meta's low 1, high 4 and
    original context 8192 are used, and named on stderr."""
    model = hf_model({**LLAMA3, "factor": 16.0, "original_max_position_embeddings": 8192})
    args = ModelArgs.from_params_json(meta_params())
    assert args.hidden_dim == 96
    write_meta(tmp_path, hf_to_meta(model.state_dict(), args), params=meta_params(use_scaled_rope=True,
                                                                                   rope_scaling_factor=16))
    with caplog.at_level(logging.WARNING), open_checkpoint(tmp_path) as ckpt:
        ours = our_logits(ckpt.args, load_weights(ckpt, torch.float32))
    assert "factor 16" in caplog.text and "original_max_position_embeddings 8192" in caplog.text
    torch.testing.assert_close(ours, hf_logits(model), rtol=1e-4, atol=1e-4)


def test_meta_rope_scaling_flag_overrides_the_numbers(tmp_path):
    model = hf_model(LLAMA3)
    args = ModelArgs.from_params_json(meta_params())
    write_meta(tmp_path, hf_to_meta(model.state_dict(), args), params=meta_params(use_scaled_rope=True))
    with open_checkpoint(tmp_path, rope_override={"original_max_position_embeddings": 32}) as ckpt:
        assert ckpt.args.rope_scaling.startswith("llama3 (factor 8")
        ours = our_logits(ckpt.args, load_weights(ckpt, torch.float32))
    torch.testing.assert_close(ours, hf_logits(model), rtol=1e-4, atol=1e-4)


def test_gguf_rope_freqs_tensor(tmp_path):
    model = hf_model(LLAMA3)
    args = ModelArgs.from_params_json(meta_params())
    weights = hf_to_meta(model.state_dict(), args)
    freqs = torch.tensor(llamacpp_rope_freqs(LLAMA3, args.head_dim))
    path = write_gguf(tmp_path / "m.gguf", {**weights, "rope_freqs.weight": freqs}, args)
    with open_checkpoint(path) as ckpt:
        assert ckpt.args.rope_scaling == "rope_freqs.weight"
        ours = our_logits(ckpt.args, load_weights(ckpt, torch.float32))
    torch.testing.assert_close(ours, hf_logits(model), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_workers", [1, 2, 3])
def test_sharded_engine_equals_the_reference_with_scaling(n_workers):
    from shardllama.coordinator import Coordinator
    from shardllama.kv_cache import blocks_for, contiguous_tables

    model = hf_model(LLAMA3)
    args = ModelArgs.from_hf_config({**BASE, "rope_theta": THETA, "rope_scaling": LLAMA3, "num_attention_heads": 4})
    weights = hf_to_meta(model.state_dict(), args)
    ref = our_logits(args, weights)
    with Coordinator(args, weights, n_workers=n_workers, max_seq_len=64) as backend:
        got = backend.forward(TOKENS, torch.tensor([0]), contiguous_tables(torch.tensor([0]), blocks_for(64)),
                              all_logits=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, hf_logits(model), rtol=1e-4, atol=1e-4)


# ---- refusals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "longrope"])
def test_other_hf_kinds_are_refused_by_name(kind):
    with pytest.raises(UnsupportedError, match=f"rope scaling '{kind}' is not supported"):
        ModelArgs.from_hf_config({**BASE, "rope_scaling": {"rope_type": kind, "factor": 2.0}})


def test_gguf_yarn_is_refused_by_name():
    fields = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
              "llama.block_count": 2, "llama.feed_forward_length": 96, "llama.rope.scaling.type": "yarn",
              "llama.rope.scaling.factor": 4.0}
    with pytest.raises(UnsupportedError, match="'yarn'"):
        ModelArgs.from_gguf_fields(fields, vocab_size=100, tie_embeddings=True)
    linear = ModelArgs.from_gguf_fields({**fields, "llama.rope.scaling.type": "linear"}, vocab_size=100,
                                        tie_embeddings=True)
    assert linear.rope_freq_factors == (4.0,) * 8


def test_rope_scaling_flag_is_refused_where_the_checkpoint_states_its_own(tmp_path):
    hf_model(LLAMA3).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="--rope-scaling"):
        open_checkpoint(tmp_path, rope_override={"factor": 2.0})


def test_args_travel_as_json_and_compare_equal():
    """Workers and shard manifests get ModelArgs as JSON: the factors come back as the same tuple."""
    args = ModelArgs.from_hf_config({**BASE, "rope_theta": THETA, "rope_scaling": LLAMA3})
    again = ModelArgs(**json.loads(json.dumps(args.to_dict())))
    assert again == args and isinstance(again.rope_freq_factors, tuple)
    assert args.rope_freq_factors[0] == 1.0 and args.rope_freq_factors[-1] == 8.0
