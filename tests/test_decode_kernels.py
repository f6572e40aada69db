"""The decode-step kernels (shardllama.kernels.decode) against the torch code they replace, their oracle.

Each C++ op rounds where the torch code rounds, so results agree to the order of f32 sums: within a few f32
ulps, or one step of f16/bf16 where the result is rounded to it.  The reduction's sum is bit-identical.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from shardllama import allreduce, model
from shardllama.config import ModelArgs
from shardllama.kernels import decode
from shardllama.kv_cache import contiguous_tables
from shardllama.model import Step, Transformer, random_weights, rope_tables
from tests.helpers import library_or_skip, seq_cache

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Where a result is rounded to the dtype, the two paths may land one step apart.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


@pytest.fixture(scope="module")
def lib():
    return library_or_skip(decode.library(), "the decode-step kernels are", "disabled, or not built here")


@contextlib.contextmanager
def library(on: bool):
    """The library in use (on) or torch's ops alone (off) for the duration of a ``with``."""
    saved = decode._library
    decode._library = saved if on else False
    try:
        yield
    finally:
        decode._library = saved


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(576,), (1, 1, 576), (3, 64), (8, 5)])
def test_rms_norm_and_silu_mul_match_torch(lib, dtype, shape):
    g = torch.Generator().manual_seed(len(shape))
    x, w = (torch.randn(shape, generator=g) * 3).to(dtype), torch.randn(shape[-1], generator=g).to(dtype)
    assert decode.elementwise_applies(x, w)
    want = F.rms_norm(x.float(), x.shape[-1:], eps=1e-5).type_as(x) * w
    got = decode.rms_norm(x, w, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(decode.silu_mul(x, w.expand_as(x).contiguous()), F.silu(x) * w, **TOL[dtype])


def test_what_stays_in_torch(lib):
    dim = 16
    assert not decode.elementwise_applies(torch.randn(decode.MAX_ROWS + 1, dim), torch.randn(dim))  # a prompt
    assert not decode.elementwise_applies(torch.randn(2, dim), torch.randn(dim).half())  # mixed dtypes
    assert not decode.elementwise_applies(torch.randn(dim, 2).t(), torch.randn(2))  # not contiguous
    cache = torch.zeros(4, 16, 1, 8)
    assert decode.attention_applies(torch.randn(1, 1, 2, 8), cache)
    assert decode.attention_applies(torch.randn(decode.MAX_ROWS, 1, 2, 8), cache)  # a batch of decode steps
    assert not decode.attention_applies(torch.randn(decode.MAX_ROWS + 1, 1, 2, 8), cache)
    assert not decode.attention_applies(torch.randn(1, 2, 2, 8), cache)  # two tokens
    assert not decode.attention_applies(torch.randn(1, 1, 2, 8).bfloat16(), cache.bfloat16())  # bf16: torch's products


@st.composite
def attention_cases(draw):
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.integers(1, 3))
    hd = draw(st.sampled_from([2, 4, 8, 16, 64]))
    B = draw(st.integers(1, 3))
    positions = draw(st.lists(st.integers(0, 40), min_size=B, max_size=B))
    mapped = draw(st.booleans())  # a worker whose query heads start mid-group passes its own mapping
    layout = "contiguous" if B == 1 and draw(st.booleans()) else "scattered"
    return hkv, hq, hd, positions, mapped, layout, draw(st.sampled_from([torch.float32, torch.float16]))


@settings(max_examples=40, deadline=None)
@given(attention_cases())
def test_one_token_a_rows_attention_matches_torch(lib, case):
    """B rows at their own positions (each its own blocks, or one row on consecutive blocks): the output and
    the keys and values written to the cache."""
    hkv, hq, hd, positions, mapped, layout, dtype = case
    B = len(positions)
    g = torch.Generator().manual_seed(sum(positions) * 7 + hd)
    args = ModelArgs(dim=hq * hd, n_layers=1, n_heads=hq, n_kv_heads=hkv, vocab_size=8, hidden_dim=4)
    bs, n_blocks = 16, 12
    if layout == "contiguous":
        tables = contiguous_tables(torch.tensor([0]), 4)
    else:
        tables = torch.randperm(n_blocks, generator=g)[: 3 * B].view(B, 3)
    step = Step.make(torch.tensor(positions), 1, tables, rope_tables(args, 64), bs)
    assert step.one is not None  # (a scattered table may still happen to be consecutive where a row reads)
    dim = hq * hd
    x = torch.randn(B, 1, dim, generator=g).to(dtype)
    wq, wk, wv = (torch.randn(n * hd, dim, generator=g).div(dim**0.5).to(dtype) for n in (hq, hkv, hkv))
    wo = torch.randn(dim, hq * hd, generator=g).div(dim**0.5).to(dtype)
    cache = torch.randn(2, n_blocks, bs, hkv, hd, generator=g).to(dtype)
    kv_of_q = torch.randint(0, hkv, (hq,), generator=g) if mapped else None
    outs, caches = [], []
    for use_library in (True, False):
        c = cache.clone()
        with library(use_library):
            assert decode.attention_applies(x.view(B, 1, hq, hd), c[0]) == use_library
            outs.append(model.attention(x, wq, wk, wv, wo, c[0], c[1], step, hd, kv_of_q))
        caches.append(c)
    torch.testing.assert_close(outs[0], outs[1], **TOL[dtype])
    torch.testing.assert_close(caches[0], caches[1], **TOL[dtype])  # the tokens' rotated keys and their values


def test_attend_refuses_indices_outside_the_cache(lib):
    cache = torch.zeros(2, 4, 1, 8)
    q, k = torch.zeros(1, 8), torch.zeros(1, 8)
    cis = torch.zeros(1, 4, 2)
    one = torch.tensor([1])

    def attend(write_at, read_at, n_keys=one, kv_of_q=None):
        return decode.attend(q, k, k, cache, cache.clone(), torch.tensor([write_at]), torch.tensor([read_at]),
                             n_keys, cis, kv_of_q)

    assert attend(0, [0]).shape == (1, 8)
    with pytest.raises(RuntimeError, match="write_at"):
        attend(8, [0])
    with pytest.raises(RuntimeError, match="read_at"):
        attend(0, [0, 9], torch.tensor([2]))
    attend(0, [0, 9])  # beyond a row's n_keys nothing is read
    with pytest.raises(RuntimeError, match="n_keys"):
        attend(0, [0], torch.tensor([2]))
    with pytest.raises(RuntimeError, match="kv_of_q"):
        attend(0, [0], kv_of_q=torch.tensor([1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decoding_with_the_library_agrees_with_torch(lib, dtype):
    """A tiny model's prompt and 12 decode steps: logits close, and the same greedy tokens."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=96, max_seq_len=64)
    weights = random_weights(args, dtype, seed=3)
    runs = []
    for use_library in (True, False):
        with library(use_library):
            ref = Transformer(args, weights)
            cache = seq_cache(ref)
            logits = ref.forward(torch.tensor([[1, 5, 9]]), cache)
            seen, tokens = [logits], []
            for i in range(12):
                tokens.append(int(seen[-1].argmax()))
                seen.append(ref.forward(torch.tensor([[tokens[-1]]]), cache, torch.tensor([3 + i])))
        runs.append((tokens, torch.stack(seen)))
    assert runs[0][0] == runs[1][0]
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=1e-4 if dtype == torch.float32 else 3e-2)


def two_workers(dtype: torch.dtype):
    seg = allreduce.create(f"test-{os.getpid()}", 2, capacity=4, dim=8, dtype=dtype)
    return seg, [allreduce.AllReduce(seg, r, timeout=0.3, parent_pid=None) for r in range(2)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_reduction_is_bit_identical_to_torchs(lib, dtype):
    g = torch.Generator().manual_seed(1)
    seg, (w0, w1) = two_workers(dtype)
    try:
        for tkt, use_library in enumerate((True, False, True), start=1):
            h, p0, p1 = (torch.randn(2, 1, 8, generator=g).mul(100).to(dtype) for _ in range(3))
            w1.parts[1][tkt & 1, :16].copy_(p1.reshape(-1))  # worker 1 has published its partial
            w1.flags[1, 0] = tkt
            with library(use_library):
                got = w0(h, p0, tkt)
            want = (h.float() + (p0.float() + p1.float())).to(dtype)
            assert got.shape == h.shape and got.dtype == dtype and torch.equal(got, want)
            assert w0.flags[0, 0] == tkt and torch.equal(w0.parts[0][tkt & 1, :16], p0.reshape(-1))
    finally:
        seg.unlink()
        seg.close()


@pytest.mark.parametrize("use_library", [True, False])
def test_a_missing_partial_is_a_timeout_or_an_abort(lib, use_library):
    seg, (w0, _) = two_workers(torch.float32)
    try:
        with library(use_library):
            h = torch.zeros(1, 1, 8)
            with pytest.raises(TimeoutError, match="worker 1"):
                w0(h, h, allreduce.ticket(1, 0))
            allreduce.abort(seg, 2)
            with pytest.raises(allreduce.Aborted):
                w0(h, h, allreduce.ticket(2, 0))
    finally:
        seg.unlink()
        seg.close()
