"""torchrun on the CPU: 2 processes (gloo) against 1, on the tiny random Llama and the tiny BEIR
folder of test_qpeft.py. Reranking is sharded by passage batch and must write byte-identical run
files; training splits each batch's queries between the processes and must follow the same loss
trajectory; a run interrupted in one process resumes in two. Every process runs one thread, so
that the matmuls round the same way in both set-ups. About 30 s on 2 CPU cores."""

import json
import os
import subprocess
import sys

import pytest
import torch

import cli
import train
from conftest import ROOT
from test_qpeft import write_beir, write_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def run_qpeft(args, processes):
    """qpeft.py in `processes` processes (torchrun --standalone) or plainly; one thread each."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher = torchrun + [f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        launcher + ["qpeft.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def common(tiny_dir, data_dir):
    # token budget 64: the 10 test candidates fall into several passage batches to share out
    flags = "--dtype float32 --depth 5 --token-budget 64 --queries-per-batch 2 --dev-queries 2"
    flags += " --eval-every 1 --dropout 0.0"
    return ["--model", str(tiny_dir), "--data", str(data_dir), *flags.split()]


def test_two_processes_rerank_to_byte_identical_runs(tiny_dir, tmp_path):
    data_dir = write_beir(tmp_path / "beir", ["train", "dev", "test"])
    trained = tmp_path / "trained"
    train_flags = ["--methods", "qpeft-r", "--steps", "1", "--out", str(trained)]
    run_qpeft(common(tiny_dir, data_dir) + train_flags, 1)
    for method, extra in (
        ("zeroshot", ["--methods", "zeroshot"]),
        ("qpeft-r", ["--adapter", str(trained / "qpeft-r")]),
    ):
        outs = [tmp_path / f"{method}-{n}" for n in (1, 2)]
        for n, out in zip((1, 2), outs):
            done = run_qpeft(common(tiny_dir, data_dir) + extra + ["--out", str(out)], n)
        assert "2 processes" in (outs[1] / "log.txt").read_text()
        assert done.stdout.count("total wall time") == 1
        for name in ("bm25", method):
            one, two = [(out / f"{name}.test.trec").read_bytes() for out in outs]
            assert one == two and one.count(b"\n") == 10, name


def history(out, name="qpeft-a"):
    return json.loads((out / name / "adapter_config.json").read_text())["training"]["history"]


# queries_per_batch 1: the second process has no query to score
@pytest.mark.parametrize("queries_per_batch", ["2", "1"])
def test_two_processes_train_like_one_with_the_same_global_batch(
    tiny_dir, tmp_path, queries_per_batch
):
    data_dir = write_beir(tmp_path / "beir", ["train", "dev", "test"])
    args = common(tiny_dir, data_dir) + ["--methods", "zeroshot,qpeft-a", "--steps", "3"]
    args += ["--queries-per-batch", queries_per_batch]
    for n in (1, 2):
        run_qpeft(args + ["--out", str(tmp_path / f"p{n}")], n)
    one, two = history(tmp_path / "p1"), history(tmp_path / "p2")
    assert [h["step"] for h in two] == [0, 1, 2, 3]
    for measure in ("train_loss", "dev_loss", "pointwise", "hinge", "accuracy", "ndcg_cut_10"):
        assert [h.get(measure) for h in two] == pytest.approx(
            [h.get(measure) for h in one], abs=1e-5
        ), measure
    # only rank 0 wrote: one log line per step, one module
    assert (tmp_path / "p2" / "log.txt").read_text().count("qpeft-a: step 3 (epoch") == 1


def test_an_interrupted_run_resumes_in_two_processes(tiny_dir, tmp_path, monkeypatch):
    data_dir = write_beir(tmp_path / "beir", ["train", "dev", "test"])
    args = common(tiny_dir, data_dir) + ["--methods", "qpeft-a", "--steps", "4"]
    run_qpeft(args + ["--out", str(tmp_path / "straight")], 1)

    class Interrupted(Exception):
        pass

    real_forward, calls = train.TrainingLoss.forward, []

    def forward_then_crash(*a, **k):  # the 3rd training batch never finishes
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted
        return real_forward(*a, **k)

    monkeypatch.setattr(train.TrainingLoss, "forward", forward_then_crash)
    torch.set_num_threads(1)
    out = tmp_path / "interrupted"
    with pytest.raises(Interrupted):
        cli.main(args + ["--out", str(out)])
    assert (out / "qpeft-a.resume.json").exists()
    run_qpeft(args + ["--out", str(out), "--resume"], 2)
    assert "qpeft-a: resumed at step 2" in (out / "log.txt").read_text()
    resumed, straight = history(out), history(tmp_path / "straight")
    assert [h["step"] for h in resumed] == [0, 1, 2, 3, 4]
    for measure in ("train_loss", "dev_loss", "ndcg_cut_10"):
        assert [h.get(measure) for h in resumed] == pytest.approx(
            [h.get(measure) for h in straight], abs=1e-5
        )
