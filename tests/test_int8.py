"""int8 weights (shardllama.quant): quantization, the int8 kernel against its oracle, the reference model in
int8 against f32, the sharded engine in int8 against the reference in int8, and the command line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from shardllama import kernels, model, quant
from shardllama.config import ModelArgs
from shardllama.convert import full_weights
from shardllama.coordinator import Coordinator
from shardllama.errors import ModelFileError, UsageError
from shardllama.model import Transformer, random_weights
from shardllama.kv_cache import blocks_for, contiguous_tables
from shardllama.quant import Int8Weight, dequantize, quantize, reference_linear
from shardllama.sharding import plan, shard, unshard, worker_weights
from tests.test_cli import run_cli
from tests.helpers import library_or_skip, seq_cache
from tests.test_tensor_parallel import greedy

# ---- quantize / dequantize -----------------------------------------------------------------------------


@st.composite
def matrices(draw):
    N, K = draw(st.integers(1, 40)), draw(st.integers(1, 70))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e4, 1e30]))
    w = torch.randn(N, K, generator=g) * scale
    kind = draw(st.sampled_from(["gaussian", "outlier", "zero rows", "integers", "f16", "bf16"]))
    if kind == "outlier":  # one large weight per row: the rest share few levels
        w[:, 0] *= 1000
    elif kind == "zero rows":
        w[torch.rand(N, generator=g) < 0.5] = 0
    elif kind == "integers":  # already on the grid: exact
        w = torch.randint(-127, 128, (N, K), generator=g).float() * scale
    elif kind == "f16":
        w = (w / scale).half()
    elif kind == "bf16":
        w = w.bfloat16()
    return w


@settings(max_examples=300, deadline=None)
@given(matrices())
def test_quantize_properties(w):
    q, scale = quantize(w)
    wf = w.float()
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.dtype == torch.float32 and scale.shape == w.shape[:1]
    assert int(q.abs().max()) <= 127  # symmetric: -128 never appears
    amax = wf.abs().amax(1)
    assert torch.equal(scale, amax / 127)
    nonzero = amax > 0
    assert bool((q[nonzero].abs().amax(1) == 127).all()), "every nonzero row uses the full range"
    assert not q[~nonzero].any() and not scale[~nonzero].any(), "zero rows stay exact zeros"
    # rounding to nearest: at most half a step from the weight (plus f32 rounding of the division)
    err = (dequantize(Int8Weight(q, scale)).double() - wf.double()).abs()
    assert bool((err <= scale.double()[:, None] * (0.5 + 1e-5) + 1e-45).all())
    assert bool((torch.sign(q) * torch.sign(wf) >= 0).all()), "never the wrong sign"


@settings(max_examples=200, deadline=None)
@given(matrices(), st.integers(0, 39), st.integers(1, 40), st.integers(-20, 20))
def test_quantize_commutes_with_rows_and_powers_of_two(w, start, length, e):
    """What sharding and the kernel's scaling rely on: rows are independent (a worker's block of rows is
    the block of the whole), and a power-of-two scale of the weights only moves the scales."""
    q, scale = quantize(w)
    part = quantize(w[start : start + length])
    assert torch.equal(part.q, q[start : start + length]) and torch.equal(part.scale, scale[start : start + length])
    big = w.float() * 2.0**e
    normal = 127 * torch.finfo(torch.float32).tiny  # a row's scale (absmax / 127) stays a normal f32: exact
    rows = scale > 0
    if bool(torch.isfinite(big).all()) and all(bool((m.abs().amax(1)[rows] > normal).all()) for m in (w.float(), big)):
        q2, s2 = quantize(big)
        assert torch.equal(q2, q) and torch.equal(s2, scale * 2.0**e)


@settings(max_examples=200, deadline=None)
@given(matrices())
def test_quantize_is_idempotent(w):
    """Weights already on an int8 grid come back unchanged."""
    first = quantize(w)
    again = quantize(dequantize(first))
    assert torch.equal(again.q, first.q)
    torch.testing.assert_close(again.scale, first.scale, rtol=2e-7, atol=0)


def test_quantize_on_meta_tensors_gives_the_layout():
    q, scale = quantize(torch.empty(7, 5, device="meta"))
    assert (q.dtype, q.shape, scale.dtype, scale.shape) == (torch.int8, (7, 5), torch.float32, (7,))


# ---- the int8 kernel against its oracle ----------------------------------------------------------------


@pytest.fixture(scope="module")
def lib():
    return library_or_skip(kernels.library(), "the matvec kernel is", "disabled, or it could not be built")


def isas(lib) -> list[int]:
    return [1, 2] if lib.best_isa() == 2 else [1]


def check_int8(y: torch.Tensor, x: torch.Tensor, w: Int8Weight) -> None:
    """y against x @ dequantize(w).T in f64.  The kernel rounds x to f16 after an exact power-of-two scaling
    (relative 2^-11 per element) and sums in f32 in its own order."""
    wd = w.q.double() * w.scale.double()[:, None]
    exact = x.double() @ wd.T
    magnitude = x.abs().double() @ wd.abs().T  # sum |x_k w_k|
    tol = (2.0**-11 + (w.q.shape[1] + 4) * 2.0**-24) * magnitude + 1e-30
    assert y.dtype == torch.float32 and y.shape == exact.shape
    err = (y.double() - exact).abs()
    assert bool((err <= tol).all()), f"max error {err.max():.3g}, worst excess {(err - tol).max():.3g}"
    # the oracle itself, at f32's own accuracy
    oracle_err = (reference_linear(x, w).double() - exact).abs()
    assert bool((oracle_err <= (w.q.shape[1] + 4) * 2.0**-24 * magnitude + 1e-30).all())


@st.composite
def int8_problems(draw):
    N = draw(st.integers(1, 70))
    K = draw(st.one_of(st.integers(1, 70), st.sampled_from([15, 16, 17, 63, 64, 65, 576, 1000, 1536])))
    M = draw(st.one_of(st.integers(1, 9), st.sampled_from([16, 17, 40])))  # decode steps and prompts
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    w = quantize(torch.randn(N, K, generator=g) * draw(st.sampled_from([0.02, 1.0, 1e6])))
    layout = draw(st.sampled_from(["contiguous", "rows of a larger matrix", "columns of a larger matrix", "odd offset"]))
    q = w.q
    if layout == "rows of a larger matrix":  # a worker's row slice of a segment
        q = torch.cat([torch.ones(3, K, dtype=torch.int8), q, torch.ones(2, K, dtype=torch.int8)])[3 : 3 + N]
    elif layout == "columns of a larger matrix":  # row stride > K
        q = torch.cat([q, torch.ones(N, 5, dtype=torch.int8)], dim=1)[:, :K]
    elif layout == "odd offset":  # no alignment at all
        q = torch.cat([torch.ones(1, dtype=torch.int8), q.flatten()])[1:].view(N, K)
    x = torch.randn(M, K, generator=g) * draw(st.sampled_from([1e-20, 1.0, 1e3, 1e20]))
    return x, Int8Weight(q, w.scale)


@settings(max_examples=300, deadline=None)
@given(int8_problems(), st.sampled_from([1, 2]), st.sampled_from([-1, 0, 64, 10**9]), st.sampled_from([1, 2]))
def test_int8_kernel_matches_the_dequantized_linear(lib, problem, isa, prefetch, threads):
    x, w = problem
    if isa not in isas(lib):
        isa = 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_int8(lib.matvec_int8(x, w.q, w.scale, prefetch, isa), x, w)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("N, K", [(64, 4096), (32, 11008), (4096, 64)])
def test_int8_kernel_at_llama_sizes(lib, N, K):
    g = torch.Generator().manual_seed(N + K)
    w = quantize(torch.randn(N, K, generator=g) * 0.02)
    for M in (1, 5, 8, 20):
        x = torch.randn(M, K, generator=g)
        for isa in isas(lib):
            check_int8(lib.matvec_int8(x, w.q, w.scale, -1, isa), x, w)


def test_int8_kernel_shapes_and_nan(lib):
    w = quantize(torch.randn(21, 33))
    for shape in [(33,), (1, 33), (2, 1, 33), (2, 9, 33)]:
        x = torch.randn(shape)
        y = lib.matvec_int8(x, w.q, w.scale)
        assert y.shape == reference_linear(x, w).shape and y.is_contiguous()
        check_int8(y.reshape(-1, 21), x.reshape(-1, 33), w)
    assert lib.matvec_int8(torch.randn(2, 33), w.q[:0], w.scale[:0]).shape == (2, 0)
    x = torch.randn(3, 33)
    x[1, 4] = float("nan")
    y = lib.matvec_int8(x, w.q, w.scale)
    assert bool(y[1].isnan().all()) and not bool(y[[0, 2]].isnan().any())


@pytest.mark.parametrize("bad", ["f16 weight", "f16 x", "scale shape", "f64 scale", "column stride", "width"])
def test_int8_kernel_refuses_what_it_cannot_compute(lib, bad):
    w, x = quantize(torch.randn(8, 16)), torch.randn(1, 16)
    q, scale = w.q, w.scale
    if bad == "f16 weight":
        q = q.half()
    elif bad == "f16 x":
        x = x.half()
    elif bad == "scale shape":
        scale = scale[:7]
    elif bad == "f64 scale":
        scale = scale.double()
    elif bad == "column stride":
        q = quantize(torch.randn(16, 8)).q.T
    else:
        x = torch.randn(1, 15)
    with pytest.raises(RuntimeError, match="matvec_int8"):
        lib.matvec_int8(x, q, scale)


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = kernels.matvec_int8

    def matvec_int8(x, q, scale):
        calls.append(tuple(x.shape))
        return real(x, q, scale)

    monkeypatch.setattr(kernels, "matvec_int8", matvec_int8)
    return calls


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_linear_takes_int8_weights_to_the_kernel(lib, spy, rows):
    """Decode steps and prompts alike."""
    w = quantize(torch.randn(48, 40))
    x = torch.randn(rows, 1, 40)
    y = model.linear(x, w)
    assert spy == [(rows, 1, 40)]
    check_int8(y.view(rows, 48), x.view(rows, 40), w)


def test_linear_without_the_kernel_is_the_oracle(spy):
    w = quantize(torch.randn(48, 40))
    x = torch.randn(3, 40)
    try:
        kernels.enable(False)
        assert torch.equal(model.linear(x, w), F.linear(x, dequantize(w)))
    finally:
        kernels.enable(None)
    assert spy == []


# ---- the reference model in int8 -----------------------------------------------------------------------

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=32)


@pytest.mark.parametrize("tie", [False, True])
def test_int8_model_is_close_to_f32(tie):
    args = ARGS.replace(tie_embeddings=tie)
    weights = random_weights(args, seed=11)
    int8 = full_weights(args, torch.int8, weights.__getitem__)
    assert int8["tok_embeddings.weight"].dtype == torch.float32 and int8["norm.weight"].dtype == torch.float32
    assert int8["output.weight"].dtype == torch.int8 and int8["layers.1.feed_forward.w2.weight"].dtype == torch.int8
    if tie:  # the head is the int8 copy of the embedding
        assert torch.equal(int8["output.weight"], quantize(weights["tok_embeddings.weight"]).q)
    tokens = torch.tensor([[3, 14, 15, 92, 65, 35], [8, 9, 7, 9, 3, 2]])
    f32, q8 = Transformer(args, weights), Transformer(args, int8)
    want = f32.forward(tokens, seq_cache(f32, 2), all_logits=True)
    got = q8.forward(tokens, seq_cache(q8, 2), all_logits=True)
    assert got.dtype == torch.float32
    # int8 rounding moves each weight by up to 1/254 of its row's largest: logits move by ~1% of their range
    err = float((got - want).abs().max())
    assert err <= 0.02 * float(want.abs().max()), err
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.9


def test_int8_model_with_and_without_the_kernel():
    m = Transformer(ARGS, full_weights(ARGS, torch.int8, random_weights(ARGS, seed=12).__getitem__))

    def run() -> tuple[list[int], list[torch.Tensor]]:
        cache = seq_cache(m)
        return greedy(lambda t, s, sl: m.forward(t, cache, s), [5, 17, 42, 7], 6)

    on = run()
    try:
        kernels.enable(False)
        off = run()
    finally:
        kernels.enable(None)
    assert on[0] == off[0]
    for a, b in zip(on[1], off[1]):
        assert float((a - b).abs().max()) <= 1e-3 * float(b.abs().max())


def test_int8_errors_name_the_weight():
    weights = random_weights(ARGS)
    int8 = full_weights(ARGS, torch.int8, weights.__getitem__)
    with pytest.raises(ModelFileError, match=r"'output.weight' is torch.int8: int8 weights are quantized from float"):
        full_weights(ARGS, torch.int8, int8.__getitem__)
    del int8["layers.1.feed_forward.w2.weight_scale"]
    with pytest.raises(ModelFileError, match="w2.weight_scale"):
        Transformer(ARGS, int8)
    weights["layers.0.attention.wk.weight"][3, 1] = float("inf")
    with pytest.raises(ModelFileError, match="wk.weight.*infinities"):
        full_weights(ARGS, torch.int8, weights.__getitem__)


# ---- sharded: the table cuts scales with their rows --------------------------------------------------


def test_shards_of_int8_weights_put_back_together():
    args = ARGS.replace(tie_embeddings=True)
    int8 = full_weights(args, torch.int8, random_weights(args).__getitem__)
    for n in (1, 2, 3):
        specs = plan(args, n)
        for name in worker_weights(args):
            for part in [name] + [name + quant.SCALE_SUFFIX] * (int8[name].dtype == torch.int8):
                pieces = [shard(part, int8[part], s) for s in specs]
                assert torch.equal(unshard(part, pieces, specs), int8[part])
                if part.endswith(("wo.weight_scale", "w2.weight_scale")):  # cut by input columns: whole scales
                    assert all(torch.equal(p, int8[part]) for p in pieces)


@pytest.mark.parametrize("n, tie, whole_pass", [(1, False, None), (2, True, None), (3, False, None), (2, False, False)])
def test_sharded_int8_equals_the_reference_in_int8(n, tie, whole_pass):
    """N workers on int8 shards against the in-process int8 model: prefill of two rows, batched decode,
    greedy tokens; whole passes and the star.  Only the order of f32 sums differs."""
    args = ARGS.replace(tie_embeddings=tie, n_heads=6, n_kv_heads=2, dim=48)
    weights = random_weights(args, seed=n)
    ref = Transformer(args, full_weights(args, torch.int8, weights.__getitem__))
    cache = seq_cache(ref, 2)
    tables = contiguous_tables(torch.tensor([0, 1]), blocks_for(ref.max_seq_len))
    tokens = torch.tensor([[1, 2, 3, 4, 5], [9, 8, 7, 0, 0]])
    lengths, start = torch.tensor([5, 3]), torch.zeros(2, dtype=torch.long)
    with Coordinator(args, weights, n_workers=n, dtype="int8", max_seq_len=32, n_blocks=tables.numel(),
                     whole_pass=whole_pass) as c:
        assert c.dtype == torch.float32 and c.weight_dtype == torch.int8
        got = c.forward(tokens, start, tables, lengths, all_logits=True)
        want = ref.forward(tokens, cache, start, tables, lengths, all_logits=True)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))
        nxt = torch.tensor([[11], [12]])
        got = c.forward(nxt, lengths, tables)
        want = ref.forward(nxt, cache, lengths, tables)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))
        ours = greedy(c.forward, [4, 8, 15, 16], 5)[0]
    ref_cache = seq_cache(ref)
    assert ours == greedy(lambda t, s, sl: ref.forward(t, ref_cache, s), [4, 8, 15, 16], 5)[0]


def test_kept_int8_shards_are_mapped_again(tmp_path):
    from shardllama.shm import clean_kept, list_kept, shard_key

    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"stands for the checkpoint")
    weights = random_weights(ARGS, seed=8)
    key = shard_key(model_file, torch.int8, 2)
    assert key != shard_key(model_file, torch.float32, 2)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    try:
        with Coordinator(ARGS, weights, n_workers=2, dtype="int8", keep_shards=True, model_path=model_file) as c:
            first = c.forward(prompt, torch.tensor([0]), torch.tensor([[0]]))
        assert [(i.dtype, i.n_workers) for i in list_kept() if i.key == key] == [("int8", 2)]

        def must_not_load(name):
            raise AssertionError(f"kept shards were rebuilt (asked for {name})")

        with Coordinator(ARGS, must_not_load, n_workers=2, dtype="int8", keep_shards=True, model_path=model_file) as c:
            assert torch.equal(c.forward(prompt, torch.tensor([0]), torch.tensor([[0]])), first)
    finally:
        clean_kept(key)


def test_coordinator_dtype_errors():
    weights = random_weights(ARGS)
    with pytest.raises(UsageError, match="unknown dtype 'int4'.*int8"):
        Coordinator(ARGS, weights, n_workers=1, dtype="int4")
    with pytest.raises(UsageError, match="unknown dtype torch.int16"):
        Coordinator(ARGS, weights, n_workers=1, dtype=torch.int16)
    with pytest.raises(ModelFileError, match="int8 weights are quantized from float ones"):  # already int8
        Coordinator(ARGS, full_weights(ARGS, torch.int8, weights.__getitem__), n_workers=1, dtype=torch.int8)


# ---- loading and the command line ----------------------------------------------------------------------


def test_prompt_store_keeps_int8_kv_apart_from_f32(tmp_path, caplog):
    """An int8 model's KV states are f32 tensors, saved as the int8 model's: reloaded by an int8 server,
    skipped (one warning) by an f32 one."""
    import logging

    from shardllama.engine.prompt_store import PromptStore, model_identity

    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"weights")

    def store(dtype):
        s = PromptStore(tmp_path / "cache", model_identity(model_file, ARGS), ARGS, dtype, 32)
        return s, s.open(keep=4)

    int8, entries = store(torch.int8)
    assert entries == []
    k = torch.randn(ARGS.n_layers, 3, ARGS.n_kv_heads, ARGS.head_dim)
    int8.save([1, 2, 3], k, k + 1)
    int8.close()
    again, [entry] = store(torch.int8)
    got_k, got_v = again.load(entry)
    assert entry.tokens == (1, 2, 3) and torch.equal(got_k, k) and torch.equal(got_v, k + 1)
    again.close()
    with caplog.at_level(logging.WARNING, logger="shardllama"):
        f32, entries = store(torch.float32)
    f32.close()
    assert entries == [] and "saved with int8 KV states" in caplog.text


def test_server_sizes_the_int8_cache_in_f32():
    from shardllama.backend import LocalBackend
    from shardllama.runtime import kv_bytes_per_token

    for n in (0, 2):
        assert kv_bytes_per_token(ARGS, torch.int8, n) == kv_bytes_per_token(ARGS, torch.float32, n) > 0
    backend = LocalBackend(ARGS, full_weights(ARGS, torch.int8, random_weights(ARGS).__getitem__), max_seq_len=32, n_blocks=2)
    assert backend.kv_bytes_per_token() == kv_bytes_per_token(ARGS, torch.int8)  # the prediction is what it holds


def test_load_weights_int8_and_checkpoints_refuse_int8_loads(tmp_path):
    from shardllama.loading import load_weights, open_checkpoint
    from tests.test_loading import ARGS as TINY, write_gguf

    weights = random_weights(TINY.replace(tie_embeddings=True), seed=6)  # no output.weight: tied
    path = write_gguf(tmp_path / "tied.gguf", weights, TINY.replace(tie_embeddings=True))
    with open_checkpoint(path) as ckpt:
        assert ckpt.args.tie_embeddings
        int8 = load_weights(ckpt, torch.int8)
        f32 = load_weights(ckpt, torch.float32)
        with pytest.raises(UsageError, match="float dtype"):
            ckpt.load("layers.0.attention.wq.weight", torch.int8)
    want = full_weights(TINY.replace(tie_embeddings=True), torch.int8, f32.__getitem__)
    assert int8.keys() == want.keys()
    assert all(torch.equal(int8[k], v) for k, v in want.items())


def test_cli_int8_on_the_demo_model(demo_gguf):
    """The demo model in int8: the reference and two workers write the same greedy text."""
    common = ["--model-path", demo_gguf, "--prompt", "The meaning of life is", "--temperature", "0",
              "--max-new-tokens", "12", "--dtype", "int8", "-q"]
    runs = {n: run_cli(*common, "--workers", n) for n in (0, 2)}
    for r in runs.values():
        assert r.returncode == 0, r.stderr
    assert runs[0].stdout.startswith("The meaning of life is ") and len(runs[0].stdout) > 40
    assert runs[2].stdout == runs[0].stdout


@pytest.mark.parametrize("dtype, stored", [("int8", "F32"), ("gguf", "Q8_0")])
def test_cli_int8_with_remote_workers(tmp_path, dtype, stored):
    """`--listen` with two `shardllama worker --connect` processes that quantize (int8) or cut between blocks
    (a Q8_0 file's own, ``qblocks``) their own slices: the same text as local workers."""
    import gguf

    from tests.test_loading import ARGS as TINY, write_gguf

    model_file = write_gguf(tmp_path / "tiny.gguf", random_weights(TINY, seed=5), TINY,
                            gguf.GGMLQuantizationType[stored])
    common = ["--model-path", model_file, "--prompt", "tok1 tok2 tok3", "--temperature", "0", "--max-new-tokens", "8",
              "--ignore-eos", "-q", "--workers", "2", "--dtype", dtype]
    local = run_cli(*common, timeout=120)
    assert local.returncode == 0, local.stderr
    # CurveZMQ is on by default over tcp: a keypair in a config directory of the test's own, shared by both ends.
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    assert run_cli("keys", env=env, timeout=60).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    coordinator = subprocess.Popen([sys.executable, "-m", "shardllama", *map(str, common), "--listen", endpoint],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                                   env=env)
    remote = [subprocess.Popen([sys.executable, "-m", "shardllama", "worker", "--connect", endpoint, "--model-path",
                                str(model_file)], stdin=subprocess.DEVNULL, env=env) for _ in range(2)]
    try:
        out, err = coordinator.communicate(timeout=120)
        assert coordinator.returncode == 0, err
        assert out == local.stdout
    finally:
        for p in [coordinator, *remote]:
            p.kill()
            p.wait()


@pytest.mark.parametrize("args, fragment", [
    (["--dtype", "int4"], "--dtype"),
    (["--dtype", "INT8"], "--dtype"),
])
def test_cli_bad_dtypes_are_one_line(args, fragment, demo_gguf):
    r = run_cli("--prompt", "x", *args, env={"SHARDLLAMA_CACHE": str(demo_gguf.parent)}, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardllama: error:") and fragment in lines[0], r.stderr
