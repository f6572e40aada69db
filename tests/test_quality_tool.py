"""tools/quality.py end to end on a tiny random GGUF: the rows it names (``auto`` resolved as the CLI resolves
it), the decode-step pass, and ``--min-top1`` as a check (its exit status)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import load_tool

make_gguf = load_tool("make_gguf")
quality = load_tool("quality")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("quality")
    args = make_gguf.random_args("tiny", n_layers=1, vocab_size=400)
    return make_gguf.write_random(d / "tiny.gguf", args, "f16", progress=False)


def _run(tiny: Path, tmp_path: Path, *extra: str) -> tuple[int, dict]:
    text = tmp_path / "text.txt"
    text.write_text("The river bank was bright with the first sun of spring, and the Mole sang.")
    code = quality.main(["--model-path", str(tiny), "--baseline", "f32", "--text", str(text), "--tokens", "2",
                         "--out-dir", str(tmp_path), *extra])
    return code, json.loads((tmp_path / "quality-tiny.json").read_text())


def test_auto_is_named_with_what_it_became_and_the_decode_pass_compares_with_the_baseline(tiny, tmp_path):
    code, out = _run(tiny, tmp_path, "--dtypes", "auto", "--decode-text", "--min-top1", "0")
    assert code == 0
    rows = {r["dtype"]: r for r in out["rows"]}
    assert rows["auto"]["weights"] == "f16" and rows["f32"]["weights"] == "f32"  # an f16 file: auto keeps f16
    assert rows["f32"]["decode_top1_agreement"] == 1.0  # the baseline against itself
    assert 0.0 <= rows["auto"]["decode_top1_agreement"] <= 1.0
    assert out["checks"][0].startswith("PASS auto (f16 weights): top-1 agreement with f32 text ")
    md = (tmp_path / "quality-tiny.md").read_text()
    assert "| auto (f16) |" in md and "decode-step top-1 = f32 |" in md


def test_min_top1_fails_the_run_below_the_target(tiny, tmp_path):
    code, out = _run(tiny, tmp_path, "--dtypes", "f32", "int8", "--min-top1", "1.01")  # no row can reach 101%
    assert code == 1
    assert [c.split(" (")[0] for c in out["checks"]] == ["FAIL int8"]


def test_verdicts_need_every_pass_at_the_target():
    rows = {"f32": {"text_top1_agreement": 1.0, "weights": "f32"},
            "auto": {"text_top1_agreement": 0.995, "decode_top1_agreement": 0.985, "weights": "gguf"},
            "int8": {"text_top1_agreement": 0.992, "decode_top1_agreement": None, "weights": "int8"}}
    assert quality.verdicts(rows, "f32", 0.99) == [
        "FAIL auto (gguf weights): top-1 agreement with f32 text 99.5%, decode steps 98.5% (target >= 99%)",
        "PASS int8 (int8 weights): top-1 agreement with f32 text 99.2% (target >= 99%)"]
