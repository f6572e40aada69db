"""The prefill GEMM (kernels.gemm): exact f16/f32 weights through oneDNN's f32 product, against torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from shardllama.kernels import gemm
from shardllama.model import linear

pytestmark = pytest.mark.skipif(not gemm.available(), reason="this torch has no oneDNN linear")


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(9, 80), k=st.integers(1, 300), n=st.integers(1, 200), lead=st.sampled_from([(), (2,), (1, 3)]),
       dtype=st.sampled_from([torch.float16, torch.float32]), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_equals_the_f32_product_of_the_same_weights(rows, k, n, lead, dtype, transposed, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, rows, k, generator=g).to(dtype)
    w = (torch.randn(k, n, generator=g) * 0.1).to(dtype).t() if transposed else \
        (torch.randn(n, k, generator=g) * 0.1).to(dtype)  # a transposed view is not contiguous
    assert gemm.applies(x, w)
    got = gemm.linear(x, w)
    want = F.linear(x.float(), w.float()).to(dtype)  # the oracle: the same math in torch
    assert got.dtype == dtype and got.shape == (*lead, rows, n)
    tol = {torch.float16: (2e-3, 1e-3), torch.float32: (1e-5, 1e-5 * k**0.5)}[dtype]
    torch.testing.assert_close(got, want, rtol=tol[0], atol=tol[1])


def test_scratch_buffer_is_reused_without_aliasing_results():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g).half()
    big, small = ((torch.randn(n, 64, generator=g) * 0.1).half() for n in (96, 32))
    gemm.release()
    with torch.inference_mode():  # the buffer is made here and written outside it next
        a = gemm.linear(x, big)
    b = gemm.linear(x, small)  # overwrites the start of the scratch buffer that `big` was widened into
    torch.testing.assert_close(a, F.linear(x.float(), big.float()).half(), rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(b, F.linear(x.float(), small.float()).half(), rtol=2e-3, atol=1e-3)
    gemm.release()


def test_model_linear_sends_prefill_rows_here_and_decode_rows_elsewhere(monkeypatch):
    calls = []
    monkeypatch.setattr(gemm, "linear", lambda x, w: calls.append(x.shape) or F.linear(x, w))
    w = torch.randn(8, 4)
    linear(torch.randn(1, 20, 4), w)
    assert calls == [(1, 20, 4)]
    linear(torch.randn(3, 4).bfloat16(), w.bfloat16())  # bf16: torch's own oneDNN path
    linear(torch.randn(1, 2, 4), w)  # a decode step
    assert len(calls) == 1
    for empty in (torch.randn(0, 4), torch.randn(8, 0)):  # a worker without FFN units: no rows, or no columns
        x = torch.randn(1, 20, empty.shape[1])
        assert linear(x, empty).shape == (1, 20, empty.shape[0])
    assert len(calls) == 1
