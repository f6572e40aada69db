"""Prefill precision (kernels.gemm): bf16 inputs with f32 sums against the f32 path, in the reference model and
in the sharded engine, the setting's validation, and its fallback on CPUs without bf16 arithmetic.

Every test names the precision it runs: tests/conftest.py pins SHARDLLAMA_PREFILL_PRECISION=f32, and the
bf16 tests ask for bf16 explicitly and skip where this CPU lacks AVX-512 BF16 / AMX-BF16 (there bf16 falls
back to f32, which the fallback tests check with the capability check patched).
"""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from shardllama import protocol as P
from shardllama.config import ModelArgs
from shardllama.coordinator import Coordinator
from shardllama.errors import UsageError, WorkerError
from shardllama.kernels import gemm
from shardllama.model import Transformer, random_weights
from shardllama.kv_cache import blocks_for, contiguous_tables
from tests.helpers import seq_cache

pytestmark = pytest.mark.skipif(not gemm.available(), reason="this torch has no oneDNN linear")
needs_bf16 = pytest.mark.skipif(not gemm.bf16_supported(), reason="this CPU has neither AVX-512 BF16 nor AMX-BF16 "
                                "(or this torch's oneDNN lacks bf16): bf16 prefill falls back to f32 here")

# bf16 logits of the tiny model against f32 ones, relative to the largest f32 logit: a few bf16 roundings
# (2^-8 each) of the layer outputs; measured 1e-4 (f32 weights) to 7e-4 (f16 weights).
LOGIT_TOLERANCE = 1e-2
# The sharded engine against the reference at the same precision, relative to the largest logit, as
# test_tensor_parallel compares them: f32 to rounding; each worker's partial sums rounded to f16 (f16
# weights) or to bf16 (bf16 prefill) before they are added up.
SHARDED_TOLERANCE = {("f32", torch.float32): 1e-4, ("f32", torch.float16): 1e-2, ("bf16", torch.float32): 5e-2}


@pytest.fixture
def fresh(monkeypatch):
    """gemm's lazily-decided process state, reset for one test and restored after it."""
    monkeypatch.setattr(gemm, "_default", None)
    monkeypatch.setattr(gemm, "_noted", False)


def tiny(dtype=torch.float32, seed=5) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=48)
    weights = random_weights(args, dtype, seed=seed)
    weights["output.weight"] = weights["output.weight"] * 20  # logits of ~10, not ~0.5: top-1 means something
    return args, weights


def prompt(n: int = 32) -> torch.Tensor:
    return torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(0))


def all_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    return model.forward(tokens, seq_cache(model), all_logits=True)[0]  # (T, vocab)


# ---- the product --------------------------------------------------------------------------------------


@needs_bf16
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(9, 80), k=st.integers(1, 300), n=st.integers(1, 200), lead=st.sampled_from([(), (2,), (1, 3)]),
       dtype=st.sampled_from([torch.float16, torch.float32]), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_bf16_product_is_the_f32_sum_of_bf16_rounded_inputs(rows, k, n, lead, dtype, transposed, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, rows, k, generator=g).to(dtype)
    w = (torch.randn(k, n, generator=g) * 0.1).to(dtype).t() if transposed else \
        (torch.randn(n, k, generator=g) * 0.1).to(dtype)
    assert gemm.applies(x, w)
    with gemm.using("bf16") as used:
        assert used == "bf16" and gemm.precision() == "bf16"
        got = gemm.linear(x, w)
    assert gemm.precision() == "f32"  # the block is over: the pinned default again
    # The oracle: the rounded inputs, multiplied exactly and summed in f32 by torch; then one bf16 rounding
    # (2^-8: two bf16 steps allow for the other order of the sums) and x's dtype.
    want = F.linear(x.bfloat16().float(), w.bfloat16().float())
    assert got.dtype == dtype and got.shape == (*lead, rows, n)
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-5 * k**0.5)


def test_f32_is_still_the_exact_path():
    x, w = torch.randn(16, 64).half(), (torch.randn(48, 64) * 0.1).half()
    with gemm.using("f32"):
        got = gemm.linear(x, w)
    assert torch.equal(got, gemm._onednn(x.float(), w.float()).half())


def test_using_nests_and_restores():
    assert gemm.precision() == "f32"
    with gemm.using("f32"):
        with gemm.using(None):  # the process default
            assert gemm.precision() == "f32"
        assert gemm.precision() == "f32"
    assert getattr(gemm._thread, "precision", None) is None


# ---- the reference model ------------------------------------------------------------------------------


@needs_bf16
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32 weights", "f16 weights"])
def test_bf16_prefill_logits_and_top1_agree_with_f32(dtype):
    args, weights = tiny(dtype)
    tokens = prompt()
    f32 = all_logits(Transformer(args, weights, prefill_precision="f32"), tokens)
    model = Transformer(args, weights, prefill_precision="bf16")
    assert model.prefill_precision == "bf16"
    bf16 = all_logits(model, tokens)
    scale = float(f32.abs().max())
    err = float((bf16 - f32).abs().max())
    assert 0 < err <= LOGIT_TOLERANCE * scale, f"max error {err:.3g}, scale {scale:.3g}"  # 0: bf16 never ran
    # Same most likely token wherever f32's lead over its runner-up exceeds twice the tolerance.
    top2 = f32.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * LOGIT_TOLERANCE * scale
    assert int(clear.sum()) >= len(tokens[0]) // 2  # enough positions for the check to mean something
    assert torch.equal(bf16.argmax(-1)[clear], f32.argmax(-1)[clear])


# ---- the sharded engine -------------------------------------------------------------------------------


def _sharded_against_reference(precision: str, dtype: torch.dtype, whole_pass: bool) -> torch.Tensor:
    """The sharded engine (2 workers) at ``precision`` against the reference at the same precision: a
    32-token prompt's logits (every position: the GEMM path) and greedy decode steps after it."""
    args, weights = tiny(dtype)
    tokens = prompt()
    ref = Transformer(args, weights, prefill_precision=precision)
    cache = seq_cache(ref)
    tolerance = SHARDED_TOLERANCE[precision, dtype]
    with Coordinator(args, weights, n_workers=2, dtype=dtype, max_seq_len=args.max_seq_len,
                     prefill_precision=precision, whole_pass=whole_pass) as c:
        assert c.prefill_precision == precision
        table = contiguous_tables(torch.tensor([0]), blocks_for(args.max_seq_len))
        got = c.forward(tokens, torch.tensor([0]), table, all_logits=True)[0]
        want = ref.forward(tokens, cache, all_logits=True)[0]
        scale = float(want.abs().max())
        err = float((got - want).abs().max())
        assert err <= tolerance * scale, f"prefill: max error {err:.3g}, scale {scale:.3g}"
        for i in range(4):  # decode steps read the keys and values the prefill wrote
            token = torch.tensor([[int(want[-1].argmax())]])
            got_step = c.forward(token, torch.tensor([32 + i]), table)[0]
            want = ref.forward(token, cache, start=32 + i)
            assert int(got_step.argmax()) == int(want[0].argmax())
            torch.testing.assert_close(got_step, want[0], rtol=0, atol=tolerance * scale)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32 weights", "f16 weights"])
def test_sharded_f32_prefill_equals_the_reference(dtype):
    _sharded_against_reference("f32", dtype, whole_pass=True)


@needs_bf16
@pytest.mark.parametrize("whole_pass", [True, False], ids=["whole pass", "coordinator rounds"])
def test_sharded_bf16_prefill_equals_the_reference_and_reaches_the_workers(whole_pass):
    got = _sharded_against_reference("bf16", torch.float32, whole_pass)
    # The workers really computed in bf16: their logits are ~1e-4 (relative) off the f32 ones, where f32
    # workers agree with the f32 reference to ~1e-7.
    args, weights = tiny(torch.float32)
    f32 = all_logits(Transformer(args, weights, prefill_precision="f32"), prompt())
    assert float((got - f32).abs().max()) > 1e-5 * float(f32.abs().max())


# ---- the setting --------------------------------------------------------------------------------------


def test_bad_values_are_one_line_errors_naming_their_source(fresh, monkeypatch):
    with pytest.raises(UsageError, match=r"^--prefill-precision must be one of f32, bf16, got 'f16'$"):
        gemm.check("f16")
    with pytest.raises(UsageError, match="--prefill-precision"):
        Transformer(*tiny(), prefill_precision="fp8")
    monkeypatch.setenv(gemm.ENV, "fp8")
    with pytest.raises(UsageError, match=f"^{gemm.ENV} must be one of f32, bf16, got 'fp8'$"):
        gemm.resolve(None)


def test_environment_sets_the_process_default_and_code_overrides_it(fresh, monkeypatch):
    monkeypatch.setattr(gemm, "bf16_supported", lambda: True)
    monkeypatch.setenv(gemm.ENV, "BF16")
    assert gemm.default() == "bf16" and gemm.precision() == "bf16"
    monkeypatch.setenv(gemm.ENV, "f32")
    assert gemm.default() == "bf16"  # read once, on first use
    gemm.set_default("f32")
    assert gemm.precision() == "f32"
    gemm.set_default(None)  # as the environment says, read again
    assert gemm.default() == "f32"


def test_config_without_a_valid_precision_is_refused():
    body = {"rank": 0, "n_workers": 1, "args": {}, "dtype": "f32", "max_seq_len": 8, "n_blocks": 1, "block_size": 16,
            "threads": 1, "spin_us": 0, "segment": None, "reduce": None, "timeout": 1.0}
    frame = bytes(P.Header(P.Kind.CONFIG).pack()) + json.dumps(body).encode()
    with pytest.raises(P.BadFrame, match="prefill_precision"):
        P.WorkerConfig.unpack(frame)


def test_a_worker_refuses_a_bad_precision(monkeypatch):
    config = Coordinator._config
    monkeypatch.setattr(Coordinator, "_config",
                        lambda self, rank: dataclasses.replace(config(self, rank), prefill_precision="f16"))
    args, weights = tiny()
    with pytest.raises(WorkerError, match="prefill_precision must be one of f32, bf16, got 'f16'"):
        Coordinator(args, weights, n_workers=1, max_seq_len=args.max_seq_len)


# ---- the fallback -------------------------------------------------------------------------------------


def test_bf16_falls_back_to_f32_with_one_note_where_unsupported(fresh, monkeypatch, caplog):
    monkeypatch.setattr(gemm, "bf16_supported", lambda: False)
    args, weights = tiny(torch.float16)
    tokens = prompt()
    f32 = all_logits(Transformer(args, weights, prefill_precision="f32"), tokens)
    with caplog.at_level(logging.WARNING, logger="shardllama.kernels"):
        model = Transformer(args, weights, prefill_precision="bf16")
        assert model.prefill_precision == "f32"
        assert torch.equal(all_logits(model, tokens), f32)
        with gemm.using("bf16") as used:
            assert used == "f32" and gemm.precision() == "f32"
        with Coordinator(args, weights, n_workers=2, dtype=torch.float16, max_seq_len=args.max_seq_len,
                         prefill_precision="bf16") as c:
            assert c.prefill_precision == "f32" and c._config(0).prefill_precision == "f32"
            table = contiguous_tables(torch.tensor([0]), blocks_for(args.max_seq_len))
            got = c.forward(tokens, torch.tensor([0]), table, all_logits=True)[0]
    notes = [r.getMessage() for r in caplog.records if r.name == "shardllama.kernels"]
    assert len(notes) == 1 and "AVX-512 BF16 or AMX-BF16" in notes[0] and "f32" in notes[0], notes
    torch.testing.assert_close(got, f32, rtol=0, atol=1e-2 * float(f32.abs().max()))  # f16 partial sums
