"""bench.py is an entry point nothing else runs: this smoke test keeps it running. The tiny random
Llama and BEIR folder of test_qpeft.py, one query pair and one training step per path, a
matmul peak over one small size; a few seconds. The speed figures themselves are not checked
(timings belong in bench.py's own runs, never in tests), only that every section ran."""

import json

import pytest

import bench
import runtime
from test_qpeft import write_beir, write_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def test_bench_runs_to_its_table(tiny_dir, tmp_path, monkeypatch, capsys):
    data_dir = write_beir(tmp_path / "beir", ["train", "dev", "test"])
    real_peak = bench.matmul_peak
    monkeypatch.setattr(
        bench, "matmul_peak", lambda dtype, device: real_peak(dtype, device, (256,), 1e8)
    )

    def no_compiler(llm):  # compiling takes minutes; bench.py reports it and goes on
        raise RuntimeError("no compiler in this test")

    monkeypatch.setattr(runtime, "compile_blocks", no_compiler)
    argv = ["--model", str(tiny_dir), "--data", str(data_dir), "--dtype", "float32"]
    bench.main(argv + ["--queries", "2", "--depth", "2", "--train-steps", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    figures = json.loads(out.splitlines()[-1])
    for key in ("peak_gflops", "score_pairs_per_s", "train_pairs_per_s", "train_speedup_vs_naive"):
        assert figures[key] > 0, key
    for row in ("train qpeft-a (fast)", "train qpeft-a (naive)", "score zeroshot (SDPA)"):
        assert row in out, row
    assert figures["score_packed_vs_sdpa"] > 0 and figures["train_packed_vs_sdpa"] > 0
    assert "torch.compile failed here, no compiled row: RuntimeError" in out
