"""The quantized-block kernels (shardllama.kernels.blocks, blocks.cpp) against gguf.quants and torch.

Dequantization is exactly defined (one f16 widening, a product or two, each rounded once), so it must match
``gguf.quants.dequantize`` bit for bit, whatever the bytes (valid f16 scales: no NaN or inf).  Products are
compared with the exact (f64) product of the dequantized weights, within what f32 sums of K terms in any order
may lose, so no CPU's rounding is built in.  Where the library cannot be built here the kernel tests skip
(SHARDLLAMA_REQUIRE_KERNELS=1 makes that a failure); the fallback tests always run.
"""

from __future__ import annotations


import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from shardllama import kernels
from shardllama.kernels import blocks as B
from tests import gguf_ref_quants
from tests.helpers import library_or_skip

TYPES = list(B.SUPPORTED)
SCALES = {  # byte offsets of each type's f16 scales (d, and m / dmin where there is one)
    Q.Q4_0: (0,), Q.IQ4_NL: (0,), Q.Q8_0: (0,), Q.Q5_0: (0,), Q.Q4_1: (0, 2), Q.Q5_1: (0, 2),
    Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
}


@pytest.fixture(scope="module")
def lib():
    why = "disabled by SHARDLLAMA_KERNELS" if not kernels.enabled() else "it could not be built, or no AVX-512"
    return library_or_skip(B.library(), "the quantized-block kernels are", why)


def quantized(qtype: Q, N: int, K: int, seed: int = 0) -> torch.Tensor:
    """(N, K // bs, ts) blocks of random weights, quantized by gguf (or tests/gguf_ref_quants for the types
    gguf cannot quantize)."""
    w = np.random.default_rng(seed).standard_normal((N, K)).astype(np.float32)
    bs, ts = B.SUPPORTED[qtype]
    return torch.from_numpy(gguf_ref_quants.quantize(w, qtype).copy()).view(N, K // bs, ts)


def random_bytes(qtype: Q, N: int, K: int, seed: int = 0) -> torch.Tensor:
    """Random blocks: every byte random except the f16 scales, which are finite (normal values as f16)."""
    bs, ts = B.SUPPORTED[qtype]
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 256, (N, K // bs, ts), dtype=torch.uint8, generator=g)
    for at in SCALES[qtype]:
        b[:, :, at:at + 2] = torch.randn(N, K // bs, 1, generator=g).half().view(torch.uint8)
    return b


def gguf_dequantize(blocks: torch.Tensor, qtype: Q) -> torch.Tensor:
    N = blocks.shape[0]
    return torch.from_numpy(gguf.quants.dequantize(blocks.contiguous().view(N, -1).numpy(), qtype))


def check_product(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y = x @ w.T within f32 summation's error: (K + 64) units of 2^-23 of sum |x||w| per output."""
    exact = x.double() @ w.double().T
    tol = (w.shape[1] + 64) * 2.0**-23 * (x.abs().double() @ w.abs().double().T) + 1e-30
    assert y.dtype == torch.float32 and y.shape == exact.shape
    err = (y.double() - exact).abs()
    assert bool((err <= tol).all()), f"max error {float(err.max()):.3g}, worst ratio {float((err / tol).max()):.3g}"


# ---- dequantization: bit-exact ----------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("make", [quantized, random_bytes])
def test_dequantize_is_bit_exact(lib, qtype, make):
    bs, _ = B.SUPPORTED[qtype]
    blocks = make(qtype, 11, 4 * bs)
    assert torch.equal(B.dequantize(blocks, qtype), gguf_dequantize(blocks, qtype))
    cut = blocks.narrow(1, 1, 2)[2:9]  # a worker's block-column cut of a row slice: row stride > 2 blocks
    assert not cut.is_contiguous()
    assert torch.equal(B.dequantize(cut, qtype), gguf_dequantize(cut, qtype))
    out = torch.full((7, 2 * bs), float("nan"))
    lib.dequantize(cut, int(qtype), out)
    assert torch.equal(out, gguf_dequantize(cut, qtype))


def test_dequantize_without_the_library_is_the_same(lib, monkeypatch):
    blocks = random_bytes(Q.Q4_K, 5, 512)
    ref = B.dequantize(blocks, Q.Q4_K)
    monkeypatch.setattr(B, "_library", False)
    assert torch.equal(B.dequantize(blocks, Q.Q4_K), ref)


# ---- products ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_linear_against_the_exact_product(lib, qtype):
    bs, _ = B.SUPPORTED[qtype]
    g = torch.Generator().manual_seed(1)
    for N, nb in ((7, 1), (33, 3), (1, 2)):
        for make in (quantized, random_bytes):
            blocks = make(qtype, N, nb * bs, seed=N)
            w = gguf_dequantize(blocks, qtype)
            for M in (1, 2, 3, 4, 5, 6, 7, 8, 9, 33):
                x = torch.randn(M, nb * bs, generator=g)
                check_product(B.linear(x, blocks, qtype), x, w)
            for variant in (0, 1, 2) if lib.has_bf16() else (0, 1):  # every kernel, whichever linear picks
                if variant == 2 and qtype == Q.Q8_0:
                    continue
                x = torch.randn(3, nb * bs, generator=g)
                check_product(lib.matvec(x, blocks, int(qtype), variant), x, w)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_column_chunks(lib, qtype):
    """The kernel sums a row in chunks of columns (so that x stays in L1): any chunk gives the product."""
    bs, _ = B.SUPPORTED[qtype]
    step = 16 if bs == 32 else 2
    blocks = random_bytes(qtype, 5, 5 * step * bs)
    w = gguf_dequantize(blocks, qtype)
    for M in (1, 3, 8):
        x = torch.randn(M, 5 * step * bs)
        for chunk in (step, 2 * step, 4 * step):
            for variant in (0, 1, 2) if lib.has_bf16() and qtype != Q.Q8_0 and M <= 4 else (0, 1):
                check_product(lib.matvec(x, blocks, int(qtype), variant, -1, chunk), x, w)
    with pytest.raises(RuntimeError, match="chunk must be a multiple"):
        lib.matvec(x, blocks, int(qtype), -1, -1, step + 1)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.Q5_1], ids=lambda t: t.name)
@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_shard_cuts_add_up(lib, qtype, parts):
    """Row cuts give the whole product's rows; block-column cuts give partial sums that add up to it."""
    bs, _ = B.SUPPORTED[qtype]
    nb = 5
    blocks = quantized(qtype, 19, nb * bs, seed=parts)
    w = gguf_dequantize(blocks, qtype)
    for M in (1, 4, 12):
        x = torch.randn(M, nb * bs)
        whole = B.linear(x, blocks, qtype)
        rows = torch.tensor_split(torch.arange(19), parts)
        y = torch.cat([B.linear(x, blocks[r[0]:r[-1] + 1], qtype) for r in rows if len(r)], dim=1)
        torch.testing.assert_close(y, whole, rtol=0, atol=0)  # each row is computed alone either way
        total = torch.zeros(M, 19, dtype=torch.float64)
        for c in torch.tensor_split(torch.arange(nb), parts):
            b0, n = int(c[0]), len(c)
            part = B.linear(x[:, b0 * bs:(b0 + n) * bs], blocks.narrow(1, b0, n), qtype)
            check_product(part, x[:, b0 * bs:(b0 + n) * bs], w[:, b0 * bs:(b0 + n) * bs])
            total += part.double()
        check_product(total.float(), x, w)


def test_linear_keeps_leading_dims_and_dtype(lib):
    blocks = quantized(Q.Q8_0, 6, 64)
    w = gguf_dequantize(blocks, Q.Q8_0)
    x = torch.randn(2, 3, 64)
    y = B.linear(x, blocks, Q.Q8_0)
    assert y.shape == (2, 3, 6)
    check_product(y.view(6, 6), x.view(6, 64), w)
    xb = x.bfloat16()
    assert B.linear(xb, blocks, Q.Q8_0).dtype == torch.bfloat16
    assert B.linear(torch.randn(0, 64), blocks, Q.Q8_0).shape == (0, 6)


def test_bad_input_is_named(lib):
    blocks = quantized(Q.Q4_0, 4, 64)
    with pytest.raises(ValueError, match="x has 32 columns, the weight 64"):
        B.linear(torch.randn(1, 32), blocks, Q.Q4_0)
    with pytest.raises(ValueError, match="Q4_0 wants uint8"):
        B.linear(torch.randn(1, 64), blocks.view(4, 36), Q.Q4_0)
    with pytest.raises(ValueError, match="type 10 is not one of"):
        B.dequantize(blocks, Q.Q2_K)
    with pytest.raises(RuntimeError, match="unsupported GGML type"):
        lib.matvec(torch.randn(1, 64), blocks, 99)


# ---- without the library: the torch path ---------------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q6_K], ids=lambda t: t.name)
def test_disabled_kernels_give_the_reference(qtype, monkeypatch):
    bs, _ = B.SUPPORTED[qtype]
    blocks = quantized(qtype, 9, 2 * bs)
    x = torch.randn(3, 2 * bs)
    ref = F.linear(x, gguf_dequantize(blocks, qtype))
    assert torch.equal(B.reference_linear(x, blocks, qtype), ref)
    monkeypatch.setattr(kernels, "_enabled", None)
    monkeypatch.setenv("SHARDLLAMA_KERNELS", "0")
    assert B.library() is None and not B.runs_here()
    assert torch.equal(B.linear(x, blocks, qtype), ref)
    assert torch.equal(B.dequantize(blocks, qtype), gguf_dequantize(blocks, qtype))
    kernels.enable(False)
    assert torch.equal(B.linear(x, blocks, qtype), ref)
    big = quantized(qtype, B.TILE_ROWS + 5, bs)  # more rows than a tile: dequantized a tile at a time
    x = torch.randn(3, bs)
    check_product(B.linear(x, big, qtype), x, gguf_dequantize(big, qtype))


def test_a_failed_build_falls_back(monkeypatch):
    def fail(*a, **k):
        raise B.build.BuildError("compiling blocks.cpp failed: error: no compiler")

    monkeypatch.setattr(B, "_library", None)
    monkeypatch.setattr(kernels, "_enabled", True)
    monkeypatch.setattr(B.build, "load", fail)
    blocks = quantized(Q.Q8_0, 5, 64)
    x = torch.randn(2, 64)
    assert B.library() is None
    assert not B.runs_here()  # so --dtype auto widens a quantized file rather than use the slow path
    assert torch.equal(B.linear(x, blocks, Q.Q8_0), B.reference_linear(x, blocks, Q.Q8_0))


def test_runs_here_says_what_loading_finds():
    # runs_here judges from the CPU's flags without building; loading the library must agree with it, on a
    # CPU with AVX-512 (it loads) and without (it is refused), and where SHARDLLAMA_KERNELS turned it off.
    assert B.runs_here() == (B.library() is not None)
    assert B.runs_here() == (B.library() is not None)  # and after loading, from what it found


# ---- quantizing: bit-exact with gguf -----------------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0], ids=lambda t: t.name)
@pytest.mark.parametrize("path", ["library", "torch"])
def test_quantize_is_gguf_bit_for_bit(qtype, path, monkeypatch):
    if path == "torch":
        monkeypatch.setattr(B, "_library", False)
    elif B.library() is None:
        pytest.skip("the quantized-block kernels are unavailable")
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 256, generator=g) * torch.logspace(-6, 3, 40).unsqueeze(1)
    w[3] = 0  # a zero row
    w[5, :32] = 0  # a zero block
    w[7, 32:64] = 1.0  # all equal
    w[8, 0], w[8, 1] = -3.0, 3.0  # the largest magnitude twice, with both signs: the first decides Q4_0's sign
    w[9, 64:96] = torch.arange(32) - 15.5  # halves: rounding ties
    w[10] = w[10].half().float()  # values f16 holds exactly
    w[11] = torch.randint(-300, 300, (256,), generator=g) / 2.0  # many ties
    w[12, :32] = 1e-30  # scales below f16's range
    got = B.quantize(w, qtype)
    assert got.shape == (40, 8, B.SUPPORTED[qtype][1]) and got.dtype == torch.uint8
    assert np.array_equal(got.view(40, -1).numpy(), gguf.quants.quantize(w.numpy(), qtype))
    for dtype in (torch.float16, torch.bfloat16):  # 16-bit weights quantize as their exact f32 values
        assert torch.equal(B.quantize(w.to(dtype), qtype), B.quantize(w.to(dtype).float(), qtype))


def test_quantize_refuses_what_it_cannot():
    with pytest.raises(ValueError, match="only Q8_0, Q4_0, not Q4_K"):
        B.quantize(torch.randn(2, 256), Q.Q4_K)
    with pytest.raises(ValueError, match="K a multiple of 32"):
        B.quantize(torch.randn(2, 48), Q.Q8_0)


def test_the_pair_kernel_when_chosen(lib):
    """Where calibration picks the bf16-pair kernel (AMD), linear goes through it; forced here on any CPU with
    AVX-512 BF16, it stays within the same bound (x keeps 16 significant bits: far inside it)."""
    if not lib.has_bf16():
        with pytest.raises(RuntimeError, match="lacks AVX-512 BF16"):
            lib.set_pairs_up_to(2)
        return
    before = lib.pairs_up_to()
    blocks = quantized(Q.Q4_K, 9, 512)
    w = gguf_dequantize(blocks, Q.Q4_K)
    try:
        lib.set_pairs_up_to(2)
        for M in (1, 2, 3):
            x = torch.randn(M, 512)
            check_product(B.linear(x, blocks, Q.Q4_K), x, w)
        check_product(B.linear(x[:1, :256], blocks[:, :1], Q.Q4_K), x[:1, :256], w[:, :256])
    finally:
        lib.set_pairs_up_to(before)
    with pytest.raises(RuntimeError, match="0..4 rows"):
        lib.set_pairs_up_to(5)
