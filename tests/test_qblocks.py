"""Block-quantized weights computed in place (shardllama.qblocks): GGUF files of every type with a kernel,
loaded as their blocks, cut between blocks, and the sharded engine equal to the reference for N workers.

The oracle of a quantized file is the same file dequantized to f32 (gguf's numbers): the in-place model must
give its logits up to the order of f32 sums.  Shapes: dim 1024 and FFN 1024, 8 heads of 128 with 2 KV heads,
so wo's and w2's columns are whole 256-weight super-blocks for up to 4 workers.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from shardllama import qblocks
from shardllama.config import ModelArgs
from shardllama.convert import full_weights
from shardllama.coordinator import Coordinator
from shardllama.errors import ModelFileError, UsageError
from shardllama.kernels import blocks as kernel
from shardllama.kv_cache import blocks_for, contiguous_tables
from shardllama.loading import load_weights, open_checkpoint
from shardllama.model import DTYPES, Transformer, random_weights
from shardllama.sharding import max_workers, plan, shard, unshard, worker_weights

from .helpers import seq_cache
from .test_cli import run_cli
from .test_gguf_quants import encode, model_floats, write_model
from .test_tensor_parallel import greedy

Q = gguf.GGMLQuantizationType
ARGS = ModelArgs(dim=1024, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=64, hidden_dim=1024, max_seq_len=64)
TYPES = sorted(kernel.SUPPORTED, key=int)
TOKENS = torch.tensor([[1, 17, 42, 63, 3, 3, 60, 8], [5, 9, 2, 11, 0, 0, 0, 0]])
LENGTHS = torch.tensor([8, 4])


@pytest.fixture(scope="module")
def floats() -> dict[str, np.ndarray]:
    return model_floats(ARGS, seed=3)


def q4_k_m(floats: dict[str, np.ndarray]) -> dict[str, Q]:
    """llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the head, one wv and one w2, and a Q8_0 and a Q5_0 matrix."""
    types = {name: Q.Q4_K for name in floats}
    types.update({"output.weight": Q.Q6_K, "layers.0.attention.wv.weight": Q.Q6_K,
                  "layers.1.feed_forward.w2.weight": Q.Q6_K, "layers.0.attention.wo.weight": Q.Q8_0,
                  "layers.1.feed_forward.w1.weight": Q.Q5_0})
    return types


def write(tmp_path: Path, floats: dict[str, np.ndarray], types: dict[str, Q] | Q) -> Path:
    return write_model(tmp_path / "model.gguf", encode(floats, types), ARGS)


def logits(model: Transformer) -> torch.Tensor:
    return model.forward(TOKENS, seq_cache(model, 2), torch.zeros(2, dtype=torch.long), None, LENGTHS, all_logits=True)


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=rel * float(want.abs().max()))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_a_file_of_each_type_is_computed_on_its_blocks_as_dequantized(tmp_path, floats, qtype):
    path = write(tmp_path, floats, qtype)
    with open_checkpoint(path) as ckpt:
        weights = load_weights(ckpt, qblocks.GGUF)
        f32 = load_weights(ckpt, torch.float32)
    wq = weights["layers.0.attention.wq.weight"]
    assert wq.dtype == torch.uint8 and wq.shape == (1024, 1024 // qblocks.block_size(qtype), gguf.GGML_QUANT_SIZES[qtype][1])
    assert int(weights["layers.0.attention.wq.weight_qtype"]) == qtype
    assert weights["tok_embeddings.weight"].dtype == torch.float32  # a lookup: f32
    assert weights["layers.0.attention_norm.weight"].dtype == torch.float32
    assert torch.equal(qblocks.dequantize(qblocks.linear_weight(weights, "output.weight")), f32["output.weight"])
    close(logits(Transformer(ARGS, weights)), logits(Transformer(ARGS, f32)))


def test_types_without_a_kernel_are_requantized_to_q8_0_and_floats_stay_f32(tmp_path, floats):
    types = {name: Q.Q4_K for name in floats}
    types.update({"layers.0.attention.wq.weight": Q.Q3_K, "layers.1.feed_forward.w3.weight": Q.F16})
    path = write(tmp_path, floats, types)
    with open_checkpoint(path) as ckpt:
        weights = load_weights(ckpt, qblocks.GGUF)
        f32 = load_weights(ckpt, torch.float32)
    assert int(weights["layers.0.attention.wq.weight_qtype"]) == Q.Q8_0
    assert weights["layers.1.feed_forward.w3.weight"].dtype == torch.float32
    assert "layers.1.feed_forward.w3.weight_qtype" not in weights
    close(logits(Transformer(ARGS, weights)), logits(Transformer(ARGS, f32)), rel=2e-2)  # Q8_0 of Q3_K's numbers


def test_block_shards_put_back_together_and_never_cut_a_block(floats):
    weights = {n: torch.from_numpy(x) for n, x in floats.items()}
    stored = full_weights(ARGS, qblocks.Q4, weights.__getitem__)
    for n in (1, 2, 3, 4):
        specs = plan(ARGS, n, qblocks.Q4)
        for name in worker_weights(ARGS):
            for part in (name, name + qblocks.QTYPE_SUFFIX):
                if part in stored:
                    pieces = [shard(part, stored[part], s) for s in specs]
                    assert torch.equal(unshard(part, pieces, specs), stored[part])
        for s in specs:  # wo's and w2's columns: whole Q4_0 blocks of 32
            assert len(s.rows("q_heads")) % 32 == 0 and len(s.rows("ffn")) % 32 == 0
    for s in plan(ARGS, 3, qblocks.GGUF):  # a file's types may be K-quants: whole super-blocks of 256
        assert len(s.rows("q_heads")) % 256 == 0 and len(s.rows("ffn")) % 256 == 0
    with pytest.raises(UsageError, match=r"5 workers cannot each hold whole 256-weight blocks .* use at most 4 workers"):
        plan(ARGS, 5, qblocks.GGUF)
    assert len(plan(ARGS, 5)) == 5  # float weights: any N up to the heads
    spec = plan(ARGS, 8)[1]  # a float plan's cut: 128 columns, half a super-block
    w2 = qblocks.meta((1024, 1024), Q.Q4_K).blocks
    with pytest.raises(UsageError, match=r"feed_forward\.w2\.weight: columns 128\.\.256 cut inside its blocks of 256"):
        shard("layers.0.feed_forward.w2.weight", w2, spec)


@pytest.mark.parametrize("n, whole_pass", [(1, None), (2, None), (3, None), (4, None), (2, False)])
def test_sharded_blocks_equal_the_reference_on_a_q4_k_m_file(tmp_path, floats, n, whole_pass):
    """N workers on the file's own blocks against the in-process model on the same blocks: prefill of two
    rows, batched decode, greedy tokens.  Only the order of f32 sums differs."""
    path = write(tmp_path, floats, q4_k_m(floats))
    with open_checkpoint(path) as ckpt:
        weights = load_weights(ckpt, qblocks.GGUF)
        ref = Transformer(ARGS, weights)
        tables = contiguous_tables(torch.tensor([0, 1]), blocks_for(ref.max_seq_len))
        start = torch.zeros(2, dtype=torch.long)
        load = lambda name: ckpt.load(name, qblocks.GGUF)  # noqa: E731
        with Coordinator(ARGS, load, n_workers=n, dtype="gguf", max_seq_len=64, n_blocks=tables.numel(),
                         whole_pass=whole_pass, block_types=ckpt.block_types()) as c:
            assert c.dtype == torch.float32 and c.weight_dtype == qblocks.GGUF
            shm = c.store.nbytes() - c.store.segments["emb"].nbytes()
            got = c.forward(TOKENS, start, tables, LENGTHS, all_logits=True)
            cache = seq_cache(ref, 2)
            close(got, ref.forward(TOKENS, cache, start, tables, LENGTHS, all_logits=True))
            nxt = torch.tensor([[11], [12]])
            close(c.forward(nxt, LENGTHS, tables), ref.forward(nxt, cache, LENGTHS, tables))
            ours = greedy(c.forward, [4, 8, 15, 16], 5)[0]
    ref_cache = seq_cache(ref)
    assert ours == greedy(lambda t, s, sl: ref.forward(t, ref_cache, s), [4, 8, 15, 16], 5)[0]
    # Shared memory holds the file's blocks (KV heads of wk / wv twice where two workers share one, and
    # segment headers), not a widened copy: at most 1.15x the file's matrix bytes.
    file_bytes = sum(t.n_bytes for t in gguf.GGUFReader(path).tensors if t.name != "token_embd.weight")
    assert shm <= 1.15 * file_bytes, (shm, file_bytes)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_two_workers_on_a_file_of_each_type_equal_the_reference(tmp_path, qtype):
    args = ARGS.replace(dim=512, hidden_dim=512, n_heads=4)  # wo, w2: 512 columns, a super-block a worker
    path = write_model(tmp_path / "model.gguf", encode(model_floats(args, seed=5), qtype), args)
    with open_checkpoint(path) as ckpt:
        ref = Transformer(args, load_weights(ckpt, qblocks.GGUF))
        with Coordinator(args, lambda name: ckpt.load(name, qblocks.GGUF), n_workers=2, dtype="gguf",
                         max_seq_len=64, n_blocks=2 * blocks_for(64), block_types=ckpt.block_types()) as c:
            tables = contiguous_tables(torch.tensor([0, 1]), blocks_for(64))
            close(c.forward(TOKENS, torch.zeros(2, dtype=torch.long), tables, LENGTHS, all_logits=True), logits(ref))


@pytest.mark.parametrize("dtype, target", [("q8", Q.Q8_0), ("q4", Q.Q4_0)])
def test_float_weights_quantized_at_load_to_q8_and_q4(dtype, target):
    args = ARGS.replace(dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2, tie_embeddings=True)
    weights = random_weights(args, seed=4)
    q = full_weights(args, DTYPES[dtype], weights.__getitem__)
    assert int(q["output.weight" + qblocks.QTYPE_SUFFIX]) == target  # a tied head: a quantized copy of its own
    assert q["tok_embeddings.weight"].dtype == torch.float32
    ref, f32 = Transformer(args, q), Transformer(args, weights)
    close(logits(ref), logits(f32), rel=0.05 if dtype == "q8" else 0.3)
    tables = contiguous_tables(torch.tensor([0, 1]), blocks_for(ref.max_seq_len))
    with Coordinator(args, weights, n_workers=2, dtype=dtype, max_seq_len=64,
                     n_blocks=tables.numel()) as c:
        got = c.forward(TOKENS, torch.zeros(2, dtype=torch.long), tables, LENGTHS, all_logits=True)
        close(got, logits(ref))


def test_quantizing_errors_name_the_weight():
    args = ARGS.replace(dim=48, hidden_dim=64, n_heads=4, n_kv_heads=2)  # 48 columns: not whole blocks of 32
    weights = random_weights(args)
    with pytest.raises(ModelFileError, match=r"weight '[a-z0-9_.]+' has 48 columns: not whole "
                                             r"Q8_0 blocks of 32"):
        full_weights(args, qblocks.Q8, weights.__getitem__)
    weights = random_weights(ARGS.replace(dim=256, hidden_dim=256, n_heads=2, n_kv_heads=2))
    weights["layers.1.feed_forward.w3.weight"][3, 5] = float("nan")
    with pytest.raises(ModelFileError, match=r"weight 'layers\.1\.feed_forward\.w3\.weight' holds infinities or NaNs"):
        full_weights(ARGS.replace(dim=256, hidden_dim=256, n_heads=2, n_kv_heads=2), qblocks.Q4, weights.__getitem__)


def test_the_default_number_of_workers_fits_the_block_plan(monkeypatch):
    from shardllama import launch

    monkeypatch.setattr(launch.psutil, "cpu_count", lambda logical=True: 64)
    assert launch.default_workers(ARGS) == ARGS.n_heads == 8  # float weights: one per head
    assert launch.default_workers(ARGS, qblocks.GGUF) == max_workers(ARGS, qblocks.GGUF) == 4  # 256-weight units
    assert len(plan(ARGS, launch.default_workers(ARGS, qblocks.GGUF), qblocks.GGUF)) == 4
    assert launch.default_workers(ARGS, qblocks.Q8) == 8  # Q8_0: 32-weight blocks, one head of 128 each


@pytest.mark.parametrize("qtype", [int(Q.Q8_0), int(Q.Q3_K), 999])  # wrong size, no kernel, no type at all
def test_a_block_type_that_does_not_fit_its_blocks_is_refused(qtype):
    weights = {"w": torch.zeros(4, 2, 18, dtype=torch.uint8), "w_qtype": torch.tensor([qtype], dtype=torch.int32)}
    with pytest.raises(ModelFileError, match=r"weight 'w': blocks of shape \(4, 2, 18\) and type \d+ do not go together"):
        qblocks.linear_weight(weights, "w")
    weights["w_qtype"] = torch.tensor([int(Q.Q4_0)], dtype=torch.int32)
    assert qblocks.linear_weight(weights, "w").shape == (4, 64)


def test_a_loader_of_blocks_without_their_types_is_named(tmp_path, floats):
    path = write(tmp_path, floats, Q.Q4_K)
    with open_checkpoint(path) as ckpt:
        with pytest.raises(UsageError, match=r"was not laid out; a loader that gives quantized blocks needs their types"):
            Coordinator(ARGS, lambda name: ckpt.load(name, qblocks.GGUF), n_workers=1, dtype="gguf", max_seq_len=64)


def test_dtype_gguf_needs_a_quantized_file(tmp_path, floats):
    path = write(tmp_path, floats, Q.F16)
    r = run_cli("--model-path", path, "--prompt", "tok1", "--dtype", "gguf", "--max-new-tokens", "1")
    assert r.returncode == 2 and "--dtype gguf keeps a GGUF file's quantized blocks" in r.stderr


def test_cli_on_a_q4_k_m_file_gives_the_reference_greedy_tokens(tmp_path, floats):
    path = write(tmp_path, floats, q4_k_m(floats))
    # --dtype gguf: the blocks on every CPU (auto would widen them to f16 without AVX-512, whose near-ties may
    # break one way on one process and another on two)
    common = ["--model-path", path, "--prompt", "tok1 tok2 tok3", "--temperature", "0", "--max-new-tokens", "8",
              "--ignore-eos", "--dtype", "gguf"]
    runs = {n: run_cli(*common, "--workers", n, timeout=180) for n in (0, 2)}
    for r in runs.values():
        assert r.returncode == 0, r.stderr
    assert runs[2].stdout == runs[0].stdout and "generated: 8 tokens" in runs[0].stderr
