"""bench/accelerator.py runs end to end on the CPU with the tiny shape, so that it cannot rot."""

import json

import jax.numpy as jnp
import pytest

from bench import accelerator
from bench.quantized_memory import step_memory

KINDS = ("bf16", "int8", "int4")
BATCHES = (1,)  # one batch size: the per-batch bookkeeping is the same for each


def test_tiny_run_reports_every_kind_and_batch(tmp_path, capsys):
    out = tmp_path / "summary.json"
    argv = ["--shape", "tiny", "--kinds", *KINDS, "--batches", *map(str, BATCHES), "--new-tokens", "4",
            "--prefill-len", "32", "--long-prefill-len", "64", "--copy-mib", "4", "--fast-compile",
            "--no-memory-table", "--out", str(out)]
    assert accelerator.main(argv) == 0
    summary = json.loads(out.read_text())
    assert not summary["errors"] and not summary["skipped"], (summary["errors"], summary["skipped"])
    assert summary["copy_bandwidth_bytes_per_s"] > 0
    assert summary["int8_cache"]["note"] != "not checked"
    for kind in KINDS:
        entry = summary["kinds"][kind]
        assert entry["weight_bytes_per_step"] > 0
        assert entry["prefill"]["tokens_per_s"] > 0
        assert entry["long_prefill"]["tokens_per_s"] > 0 and entry["long_prefill"]["tokens"] == 64
        for batch in BATCHES:
            decode = entry["decode"][str(batch)]
            assert decode["tokens_per_s"] > 0 and decode["hbm_fraction"] > 0
            assert decode["steps"] == 3  # 4 tokens a row: the prefill's and three decode steps
            assert decode["tokens_per_s"] == pytest.approx(batch * decode["steps_per_s"])
    # quantized weights are read in fewer bytes: int4 < int8 < bf16
    per_step = [summary["kinds"][kind]["weight_bytes_per_step"] for kind in ("int4", "int8", "bf16")]
    assert per_step == sorted(per_step) and len(set(per_step)) == 3
    assert set(summary["ratios"]) == {"int8/bf16 decode batch 1", "int4/bf16 decode batch 1"}
    assert all(ratio > 0 for ratio in summary["ratios"].values())
    printed = capsys.readouterr().out
    assert "== summary ==" in printed and "int8/bf16 decode batch 1" in printed


def test_a_failed_measurement_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(accelerator, "run_decode", broken)
    out = tmp_path / "summary.json"
    argv = ["--shape", "tiny", "--kinds", "bf16", "--batches", "1", "--new-tokens", "2", "--prefill-len", "16",
            "--long-prefill-len", "0", "--copy-mib", "1", "--fast-compile", "--no-memory-table", "--out", str(out)]
    assert accelerator.main(argv) == 0
    summary = json.loads(out.read_text())
    assert summary["errors"] == ["bf16: decode batch 1: RuntimeError: out of memory (simulated)"]
    assert summary["kinds"]["bf16"]["prefill"]["tokens_per_s"] > 0  # measured before the failure
    assert summary["ratios"]["int8/bf16 decode batch 1"] is None


def test_bad_lengths_are_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        accelerator.main(["--shape", "tiny", "--long-prefill-len", "40000"])
    assert exit_info.value.code == 2
    assert "--long-prefill-len must be in [0, 32768]" in capsys.readouterr().err


def test_decode_step_memory_counts_the_quantized_weights():
    config = accelerator.SHAPES["tiny"][0]
    rows = {kind: step_memory(kind, config, 64, jnp.bfloat16, options=accelerator.FAST_COMPILE)
            for kind in ("bf16", "int8")}
    for row in rows.values():
        assert row["argument"] >= row["weight_bytes"] + row["cache_bytes"]
        assert row["total"] > 0
    assert rows["int8"]["weight_bytes"] < rows["bf16"]["weight_bytes"]
    assert rows["int8"]["argument"] < rows["bf16"]["argument"]
