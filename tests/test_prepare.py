"""Opening a model before loading it (runtime.prepare): the dtype a quantized file gets, the default
context, and every check that must fail before a single weight is read.  "Before" is asserted on evidence,
not time: the checkpoint's ``load`` is replaced by one that fails the test if it is ever called."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import gguf
import pytest
import torch

from shardllama import cli, qblocks, quant, runtime
from shardllama.errors import ModelFileError
from shardllama.loading.base import Checkpoint
from shardllama.model import random_weights
from shardllama.runtime import DEFAULT_CONTEXT, prepare
from tests.test_loading import ARGS, write_gguf, write_hf

Q = gguf.GGMLQuantizationType


@pytest.fixture
def no_weight_read(monkeypatch):
    def load(self, name, dtype):
        raise AssertionError(f"weight {name} was read")

    monkeypatch.setattr(Checkpoint, "load", load)


def test_quantized_file_keeps_its_blocks_and_says_so(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "q.gguf", random_weights(ARGS), ARGS, Q.Q8_0)
    monkeypatch.setattr(qblocks.kernel, "why_not_here", lambda: None)  # a CPU with AVX-512, whichever this is
    with prepare(path) as p:
        assert p.dtype == qblocks.GGUF
        assert any("Q8_0 weights computed as stored" in n for n in p.notes)
    with prepare(path, dtype="f32") as p:  # --dtype still decides
        assert p.dtype == torch.float32 and not p.notes
    with prepare(write_gguf(tmp_path / "f.gguf", random_weights(ARGS), ARGS, Q.F16)) as p:
        assert p.dtype == torch.float16 and not p.notes


def test_default_context_is_the_trained_one_at_most_4096(tmp_path):
    with prepare(write_gguf(tmp_path / "short.gguf", random_weights(ARGS), ARGS.replace(max_seq_len=512))) as p:
        assert p.max_seq_len == 512
    with prepare(write_gguf(tmp_path / "long.gguf", random_weights(ARGS), ARGS.replace(max_seq_len=131072))) as p:
        assert p.max_seq_len == DEFAULT_CONTEXT == 4096


def test_context_beyond_the_trained_one_is_a_warning_naming_both(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", random_weights(ARGS), ARGS.replace(max_seq_len=512))
    with prepare(path, max_seq_len=2000) as p:
        assert p.max_seq_len == 2000
        [note] = p.notes
        assert "--max-seq-len 2000" in note and "512" in note and "no rope scaling" in note


def run_main(capsys, *argv) -> tuple[int, list[str]]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def test_prompt_too_long_fails_before_any_weight_is_read(capsys, demo_gguf, no_weight_read):
    code, err = run_main(capsys, "--model-path", demo_gguf, "--prompt", "word " * 40, "--max-seq-len", "16", "-q")
    assert code == 1
    assert len(err) == 1 and "longer than --max-seq-len 16" in err[0]


def test_bad_rope_scaling_flag_fails_before_any_weight_is_read(tmp_path, capsys, no_weight_read):
    path = write_gguf(tmp_path / "m.gguf", random_weights(ARGS), ARGS)
    code, err = run_main(capsys, "--model-path", path, "--prompt", "x", "--rope-scaling", "speed=3", "-q")
    assert code == 2 and len(err) == 1 and "--rope-scaling" in err[0]
    code, err = run_main(capsys, "--model-path", path, "--prompt", "x", "--rope-scaling", "factor=2", "-q")
    assert code == 2 and len(err) == 1 and "states its own rope scaling" in err[0]


def test_tokenizer_larger_than_the_model_names_both_files(tmp_path, capsys, demo_gguf, no_weight_read):
    """A 49 152-token tokenizer beside a 100-row embedding: ids past the table would crash mid-run."""
    model = write_hf(tmp_path / "m", random_weights(ARGS))
    code, err = run_main(capsys, "--model-path", model, "--tokenizer-path", demo_gguf, "--prompt", "x", "-q")
    assert code == 1 and len(err) == 1
    assert str(demo_gguf) in err[0] and str(model) in err[0] and "49152" in err[0] and "100" in err[0]


def test_smaller_tokenizer_is_fine(tmp_path):
    """Padded vocabularies are normal: a model with more embedding rows than tokens opens."""
    path = write_gguf(tmp_path / "m.gguf", random_weights(ARGS.replace(vocab_size=128)), ARGS.replace(vocab_size=128))
    # write_gguf names as many tokens as embedding rows; a separate 100-token tokenizer is smaller.
    tok = write_gguf(tmp_path / "tok.gguf", random_weights(ARGS), ARGS)
    with prepare(path, tokenizer_path=tok) as p:
        assert p.tokenizer.vocab_size == 100 and p.args.vocab_size == 128


def test_missing_tokenizer_is_a_model_file_error(tmp_path, capsys):
    model = write_hf(tmp_path / "m", random_weights(ARGS))
    with pytest.raises(ModelFileError, match="no tokenizer found"):
        prepare(model)
    code, err = run_main(capsys, "--model-path", model, "--prompt", "x", "-q")
    assert code == 1 and len(err) == 1 and str(model) in err[0]


def test_without_the_block_kernels_a_quantized_file_is_widened_to_f16_or_int8(tmp_path, monkeypatch):
    # A CPU without AVX-512: torch's dequantize-then-multiply is all the blocks would have, ~10x slower, so
    # auto widens them to f16 (the file's numbers nearly exactly), or int8 where f16 would not fit.
    path = write_gguf(tmp_path / "q.gguf", random_weights(ARGS), ARGS, Q.Q4_0)
    lacks = "the kernels that compute on a GGUF's own blocks need AVX-512, which this CPU lacks"
    monkeypatch.setattr(qblocks.kernel, "why_not_here", lambda: lacks)
    with prepare(path) as p:
        assert p.dtype == torch.float16
        assert p.notes == [f"q.gguf: Q4_0 weights widened to f16 ({runtime.f16_bytes(ARGS) / 1e9:.1f} GB): {lacks} "
                           "(pass --dtype gguf, int8 or f16 to choose)"]
    f16 = runtime.f16_bytes(ARGS)
    for available, dtype, said in ((0.75 * f16 / runtime.WIDEN_SHARE, quant.INT8, "converted to int8 rows"),
                                   (0.25 * f16 / runtime.WIDEN_SHARE, qblocks.GGUF, "kept as blocks")):
        monkeypatch.setattr(runtime.psutil, "virtual_memory", lambda a=available: SimpleNamespace(available=a))
        with prepare(path) as p:  # f16 would take too much of the memory available; int8 too, the second time
            assert p.dtype == dtype and said in p.notes[0] and lacks in p.notes[0]
    with prepare(path, dtype="gguf") as p:  # asked for: the blocks, whatever they cost here
        assert p.dtype == qblocks.GGUF and not p.notes
    monkeypatch.setattr(qblocks.kernel, "why_not_here", lambda: "the quantized-block kernels are turned off")
    with prepare(path) as p:  # the reason said is the one that holds
        assert p.dtype == qblocks.GGUF and "turned off" in p.notes[0] and "AVX-512" not in p.notes[0]


def test_notes_are_said_unless_quiet(tmp_path, capsys, caplog):
    path = write_gguf(tmp_path / "q.gguf", random_weights(ARGS), ARGS, Q.Q8_0)
    common = ["--model-path", path, "--prompt", "x", "--max-new-tokens", "1", "--workers", "0", "--no-echo"]
    with caplog.at_level(logging.WARNING):
        assert run_main(capsys, *common)[0] == 0
        assert "q.gguf: Q8_0 weights" in caplog.text  # computed as stored, or widened where no AVX-512
        caplog.clear()
        assert run_main(capsys, *common, "-q") == (0, [])
        assert caplog.text == ""


def test_unsupported_rope_scaling_is_one_line_before_any_weight_is_read(tmp_path, capsys, no_weight_read):
    import json

    model = write_hf(tmp_path / "m", random_weights(ARGS))
    config = json.loads((model / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    (model / "config.json").write_text(json.dumps(config))
    code, err = run_main(capsys, "--model-path", model, "--prompt", "x", "-q")
    assert code == 1 and len(err) == 1 and "rope scaling 'yarn' is not supported" in err[0] and "config.json" in err[0]
