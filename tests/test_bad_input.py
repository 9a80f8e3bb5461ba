"""Bad input, as a new user makes it: each case builds a tiny dataset, model folder or module, runs
the command line, and expects exit code 2 with one line naming the file:line, flag, key or query at
fault (no traceback). The last cases are odd but valid input: counted warnings, and "n/a" for a
paired test on one query. About 10 s on 2 CPU cores."""

import json
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import api
import cli
import qpeft
import runtime
import train
from test_qpeft import (
    QUERY_TEXT,
    TOKENIZER_JSON,
    make_reranker,
    tiny_args,
    write_beir,
    write_tiny_llama,
)
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(llm, tokenizer, template) in float32."""
    llm, tokenizer = runtime.load_llm(tiny_dir, dtype=torch.float32)
    return llm, tokenizer, qpeft.Template(tokenizer, qpeft.QPEFTConfig().instruction)


def edit(path, change):
    path.write_text(change(path.read_text()))


def model_copy(tiny_dir, tmp_path, change_config, text=None):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    change_config(config)
    (folder / "config.json").write_text(text or json.dumps(config))
    return folder


# (name, prepare(data_dir, model_dir, tmp_path) -> extra flags, expected message fragment)
CASES = [
    (
        "bad JSON in the corpus",
        lambda d, m, t: edit(d / "corpus.jsonl", lambda s: s.replace('"p3"', '"p3', 1)) or [],
        "corpus.jsonl:3: bad JSON",
    ),
    (
        "queries that are not UTF-8",
        lambda d, m, t: [
            (d / "queries.jsonl").write_bytes(
                (d / "queries.jsonl").read_bytes().replace(b"france", b"fr\xe9nce", 1)
            )
        ][:0],
        "queries.jsonl:1: not valid UTF-8",
    ),
    (
        "an id with a space",
        lambda d, m, t: edit(d / "corpus.jsonl", lambda s: s.replace('"p3"', '"p 3"', 1)) or [],
        "corpus.jsonl:3: _id 'p 3' is empty or holds whitespace",
    ),
    (
        "a qrels grade that is not an integer",
        lambda d, m, t: (
            edit(d / "qrels" / "test.tsv", lambda s: s.replace("\t2\n", "\ttwo\n")) or []
        ),
        "test.tsv:2: grade 'two' is not an integer",
    ),
    (
        "training on a dataset without a train split",
        lambda d, m, t: (d / "qrels" / "train.tsv").unlink() or ["--methods", "qpeft-a"],
        "has no train split",
    ),
    (
        "training on a dataset without a dev split",
        lambda d, m, t: (d / "qrels" / "dev.tsv").unlink() or ["--methods", "qpeft-a"],
        "has no dev split",
    ),
    (
        "a NaN in the first-stage run",
        lambda d, m, t: (
            edit(d / "runs" / "dev.bm25.trec", lambda s: s.replace(" 9.0 bm25", " nan bm25", 1))
            or []
        ),
        "dev.bm25.trec:1: score nan is not finite",
    ),
    (
        "a tokenizer.json that is not JSON",
        lambda d, m, t: ["--model", str(broken_tokenizer(m, t))],
        "tokenizer.json: not valid JSON",
    ),
    ("an unknown split", lambda d, m, t: ["--split", "tset"], "has no split 'tset'"),
    (
        "a model config without hidden_size",
        lambda d, m, t: ["--model", str(model_copy(m, t, lambda c: c.pop("hidden_size")))],
        "config.json: required key 'hidden_size' is missing",
    ),
    (
        "an eos id outside the vocabulary",
        lambda d, m, t: ["--model", str(model_copy(m, t, lambda c: c.update(eos_token_id=10**6)))],
        "the eos token id 1000000 is missing or outside",
    ),
    (
        "a query too long for the model's positions",
        lambda d, m, t: [
            "--model",
            str(model_copy(m, t, lambda c: c.update(max_position_embeddings=40))),
        ],
        "positions (lower --max-query-tokens or --max-passage-tokens)",
    ),
    (
        "a query too long for a Mistral's sliding window (checked before any work)",
        lambda d, m, t: [
            "--model",
            str(model_copy(m, t, lambda c: c.update(model_type="mistral", sliding_window=40))),
        ],
        "more than the model's 40 sliding_window (lower --max-query-tokens",
    ),
    (
        "an adapter config with an unknown field",
        lambda d, m, t: adapter_with(t, m, d, lambda c: c["qpeft"].update(colour="red")),
        "adapter_config.json: not an adapter config (TypeError",
    ),
    (
        "an adapter trained on another model",
        lambda d, m, t: adapter_with(
            t,
            m,
            d,
            lambda c: c.update(base_model_name_or_path="big-llama", base_model_sha256="0" * 64),
        ),
        "trained on big-llama (sha256 000000000000), not on tiny-llama",
    ),
    (
        "an adapter named like a baseline",
        lambda d, m, t: adapter_with(t, m, d, None, name="zeroshot"),
        "two rows would be called 'zeroshot'",
    ),
    (
        "a TREC run line with five columns",
        lambda d, m, t: run_flags(d, t, "s1 Q0 p1 1 9.5 bm25\ns1 Q0 p3 2 9.0\n"),
        "run.trec:2: expected 6 fields 'qid Q0 docid rank score tag', got 5",
    ),
    (
        "a TREC run with a passage missing from the corpus",
        lambda d, m, t: run_flags(d, t, "s1 Q0 p1 1 9.5 bm25\ns1 Q0 p99 2 9.0 bm25\n"),
        "run.trec:2: passage 'p99' is not in the corpus",
    ),
    (
        "--qrels that judge none of the run's queries",
        lambda d, m, t: (
            run_flags(d, t, "t1 Q0 p1 1 9.5 bm25\n") + ["--qrels", str(d / "qrels" / "test.tsv")]
        ),
        "qrels/test.tsv judges none of the queries to rerank",
    ),
    (
        "a run query whose text differs from the training data's",
        lambda d, m, t: (
            run_flags(d, t, "t1 Q0 p1 1 9.5 bm25\n", {"t1": "another text"})
            + ["--methods", "qpeft-a"]
        ),
        "query 't1' has one text in run.trec and another in the training data",
    ),
    (
        "an --adapter folder without its config",
        lambda d, m, t: ["--adapter", str(t / "nowhere")],
        "nowhere: no adapter_config.json there",
    ),
    (
        "a request whose doc is null",
        lambda d, m, t: requests_flags(
            t,
            [
                '{"query": {"qid": "q1", "text": "a"}, "candidates": [{"docid": "d1", '
                '"score": 1, "doc": null}]}'
            ],
        ),
        "requests.jsonl:1: not a rank_llm request",
    ),
    (
        "a request whose qid holds a space",
        lambda d, m, t: requests_flags(
            t, ['{"query": {"qid": "q 1", "text": "a"}, "candidates": []}']
        ),
        "requests.jsonl:1: qid 'q 1' is empty or holds whitespace",
    ),
    (
        "a requests line without candidates",
        lambda d, m, t: requests_flags(
            t,
            [
                '{"query": {"qid": "q1", "text": "a"}, "candidates": []}',
                '{"query": {"qid": "q2", "text": "b"}}',
            ],
        ),
        "requests.jsonl:2: not a rank_llm request",
    ),
    (
        "--heads that do not divide the width",
        lambda d, m, t: ["--heads", "5", "--methods", "qpeft-a"],
        "--heads 5 does not divide the width",
    ),
    # round two: settings from an adapter, flags it would override, files that are not objects
    (
        "an adapter config whose top_k is 0",
        lambda d, m, t: adapter_with(t, m, d, lambda c: c["qpeft"].update(top_k=0)),
        "adapter_config.json: top_k: 0 is out of range (must be >= 1)",
    ),
    (
        "a module flag that --adapter would override",
        lambda d, m, t: adapter_with(t, m, d, None) + ["--max-passage-tokens", "8"],
        "was trained with max_passage_tokens 160, and an adapter keeps its own module settings",
    ),
    (
        "--methods that leave out an --adapter's method",
        lambda d, m, t: adapter_with(t, m, d, None) + ["--methods", "zeroshot,prompt"],
        "holds a qpeft-a module; list qpeft-a to rerank with it",
    ),
    (
        "a config.json that is a list",
        lambda d, m, t: ["--model", str(model_copy(m, t, lambda c: None, text="[1, 2]"))],
        "config.json: not a JSON object (found list)",
    ),
    (
        "a llama3 rope scaling without its frequency factors",
        lambda d, m, t: [
            "--model",
            str(model_copy(m, t, lambda c: c.update(rope_scaling={"rope_type": "llama3"}))),
        ],
        "config.json: the llama3 rope scaling lacks 'factor'",
    ),
    ("an unknown --device", lambda d, m, t: ["--device", "gpu"], "--device gpu: unknown"),
    (
        "--out that is a file",
        lambda d, m, t: (t / "file").write_text("x") and ["--out", str(t / "file")],
        "file: exists and is not a folder",
    ),
    (
        "a metrics.json in --out that is not an object",
        lambda d, m, t: (
            [(t / "o").mkdir(), (t / "o" / "metrics.json").write_text("[]")][:0]
            + ["--out", str(t / "o")]
        ),
        "metrics.json: not a JSON object (found list)",
    ),
]


def broken_tokenizer(tiny_dir, tmp_path):
    folder = model_copy(tiny_dir, tmp_path, lambda c: None)
    (folder / "tokenizer.json").write_text('{"model": ')
    return folder


def adapter_with(tmp_path, model_dir, data_dir, change, name="qpeft-a"):
    """Flags that rerank with a freshly trained (1 step) adapter, its config changed by `change`."""
    out = tmp_path / "trained"
    cli.main(
        [
            "--model",
            str(model_dir),
            "--data",
            str(data_dir),
            "--dtype",
            "float32",
            "--methods",
            "qpeft-a",
            "--steps",
            "1",
            "--queries-per-batch",
            "2",
            "--dev-queries",
            "2",
            "--depth",
            "2",
            "--out",
            str(out),
        ]
    )
    if change:
        config = json.loads((out / "qpeft-a" / "adapter_config.json").read_text())
        change(config)
        (out / "qpeft-a" / "adapter_config.json").write_text(json.dumps(config))
    (out / "qpeft-a").rename(out / name)
    return ["--adapter", str(out / name)]


def run_flags(data_dir, tmp_path, lines, other_text=None):
    """Flags that rerank the TREC run `lines` over the tiny dataset's queries (as tsv, with
    `other_text` {qid: text} changed) and corpus."""
    (tmp_path / "run.trec").write_text(lines)
    texts = {**QUERY_TEXT, **(other_text or {})}
    (tmp_path / "queries.tsv").write_text("".join(f"{q}\t{t}\n" for q, t in texts.items()))
    return [
        "--run",
        str(tmp_path / "run.trec"),
        "--queries",
        str(tmp_path / "queries.tsv"),
        "--corpus",
        str(data_dir / "corpus.jsonl"),
        "--methods",
        "zeroshot",
    ]


def requests_flags(tmp_path, lines):
    (tmp_path / "requests.jsonl").write_text("\n".join(lines) + "\n")
    return ["--requests", str(tmp_path / "requests.jsonl"), "--methods", "zeroshot"]


@pytest.mark.parametrize("case, prepare, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(tiny_dir, tmp_path, capsys, case, prepare, message):
    data_dir = write_beir(tmp_path / "beir", ["train", "dev", "test"])
    flags = prepare(data_dir, tiny_dir, tmp_path)
    capsys.readouterr()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        training = "--depth 2 --steps 1 --queries-per-batch 2 --dev-queries 2"
        cli.main(tiny_args(tiny_dir, data_dir, training) + ["--out", str(out), *flags])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert message in err and "Traceback" not in err, err
    assert not out.exists()  # inputs are read and checked before --out is made


def test_odd_but_valid_input_gives_counted_warnings_and_n_a(tiny_dir, tmp_path):
    """An empty query is skipped with a counted warning; with one test query left, p is n/a and
    everything else is written."""
    data_dir = write_beir(tmp_path / "beir", ["train", "dev", "test"])
    edit(data_dir / "queries.jsonl", lambda s: s.replace('"do plants need water"', '" "'))
    out = tmp_path / "out"
    cli.main(tiny_args(tiny_dir, data_dir, "--depth 2 --methods zeroshot") + ["--out", str(out)])
    log = (out / "log.txt").read_text()
    assert "warning: 1 test queries have no text and are skipped (s2)" in log
    assert "p: n/a, a paired test needs at least 2 queries" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["zeroshot"]["test"]["queries"] == 1
        and metrics["zeroshot"]["test"]["ndcg_cut_10_p_bm25"] is None
    )


# ---- round two: outputs are one transaction, and the paths added since get the same checks ----
def zeroshot_args(tiny_dir, data_dir, out):
    return tiny_args(tiny_dir, data_dir, "--depth 2 --methods zeroshot") + ["--out", str(out)]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_failed_command_leaves_the_earlier_outputs_as_they_were(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    """An error after reranking (here: every test query drops out, which once reached
    statistics.fmean([])) or while writing (a full disk on the third file) changes no file of the
    earlier command's: runs, per-query values and metrics.json are committed together."""
    data_dir = write_beir(tmp_path / "beir", ["train", "dev", "test"])
    out = tmp_path / "out"
    cli.main(zeroshot_args(tiny_dir, data_dir, out))
    before = snapshot(out)
    assert {"zeroshot.test.trec", "zeroshot.test.per-query.tsv", "metrics.json"} <= before.keys()
    # both test queries lose their text: they are skipped, and nothing is left to evaluate
    for query in ("what is the capital of france", "do plants need water"):
        edit(data_dir / "queries.jsonl", lambda s: s.replace(f'"{query}"', '" "'))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(zeroshot_args(tiny_dir, data_dir, out))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no query has both a text" in err, err
    assert "Traceback" not in err
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != "log.txt"} == {
        k: v for k, v in before.items() if k != "log.txt"
    }
    # a full disk on the third file written: nothing renamed, no temporary file left
    data_dir2 = write_beir(tmp_path / "beir2", ["train", "dev", "test"])
    edit(data_dir2 / "corpus.jsonl", lambda s: s.replace("Paris", "Lyon"))
    real_add, calls = cli.ir.Outputs.add, []

    def add_then_fail_third(self, write, path):
        def failing(f):
            raise OSError(28, "No space left on device", str(f))

        calls.append(path)
        real_add(self, failing if len(calls) == 3 else write, path)

    monkeypatch.setattr(cli.ir.Outputs, "add", add_then_fail_third)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(zeroshot_args(tiny_dir, data_dir2, out))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "No space left on device" in err, err
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != "log.txt"} == {
        k: v for k, v in before.items() if k != "log.txt"
    }


def test_two_commands_on_one_out_keep_each_others_rows(tiny_dir, tmp_path, monkeypatch):
    """metrics.json is read and merged when it is written, under a lock: a row another command
    wrote while this one ran stays (the earlier read-at-start merge dropped it)."""
    data_dir = write_beir(tmp_path / "beir", ["train", "dev", "test"])
    out = tmp_path / "out"
    real_rerank = cli.rerank_everywhere

    def rerank_while_another_command_writes(*a, **k):
        cli.save_metrics({"qpeft-a": {"test": {"ndcg_cut_10": 0.5}}}, out)
        return real_rerank(*a, **k)

    monkeypatch.setattr(cli, "rerank_everywhere", rerank_while_another_command_writes)
    cli.main(zeroshot_args(tiny_dir, data_dir, out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["qpeft-a"]["test"] == {"ndcg_cut_10": 0.5}
    assert "test" in metrics["zeroshot"] and "test" in metrics["bm25"]


def test_a_failed_adapter_save_keeps_the_earlier_adapter(tiny, tmp_path, monkeypatch):
    llm, tokenizer, template = tiny
    first = make_reranker("qpeft-r", llm, template, seed=0)
    runtime.save_adapter(first, tmp_path / "a", llm, {})
    before = snapshot(tmp_path / "a")

    def disk_full(tensors, path, *args, **kwargs):  # half a file, then the disk is full
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runtime, "save_file", disk_full)
    with pytest.raises(OSError):
        runtime.save_adapter(
            make_reranker("qpeft-r", llm, template, seed=1), tmp_path / "a", llm, {}
        )
    assert snapshot(tmp_path / "a") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging folder left
    # the folder is replaced whole: one that holds anything else is refused, not emptied
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds 'mine.txt', not only an adapter's files"):
        runtime.save_adapter(first, tmp_path / "notes", llm, {})
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
    loaded = runtime.load_adapter(tmp_path / "a", llm, tokenizer)
    for name, tensor in qpeft.trainable_state(first).items():
        assert torch.equal(qpeft.trainable_state(loaded)[name], tensor), name


def test_resume_files_cannot_tear(tiny, tmp_path, monkeypatch):
    """save_resume writes the tensors of each save to their own file and the JSON last, naming
    them: an interrupted save leaves the previous pair loadable; a JSON and tensors of two
    different saves, or a truncated tensor file, are one-line errors."""
    llm, _, template = tiny
    reranker = make_reranker("qpeft-r", llm, template)
    optimizer = torch.optim.AdamW([p for p in reranker.parameters() if p.requires_grad])
    files = (tmp_path / "m.resume.json", tmp_path / "m.resume.safetensors")
    best = {k: v.detach().clone() for k, v in qpeft.trainable_state(reranker).items()}
    train.save_resume(files, reranker, optimizer, {"step": 5, "best": best}, ["cfg"])
    first_json = files[0].read_text()
    real_save_file = train.save_file

    def half_written(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train, "save_file", half_written)
    with pytest.raises(OSError):
        train.save_resume(files, reranker, optimizer, {"step": 6, "best": best}, ["cfg"])
    assert files[0].read_text() == first_json
    assert train.load_resume(files, reranker, optimizer, ["cfg"])["step"] == 5
    monkeypatch.setattr(train, "save_file", real_save_file)
    train.save_resume(files, reranker, optimizer, {"step": 7, "best": best}, ["cfg"])
    [tensor_file] = tmp_path.glob("m.resume.step*.safetensors")  # the older one is gone
    assert tensor_file.name.startswith("m.resume.step7-")
    # a JSON put back from the step-5 save, beside step 7's tensors: not one save
    meta = json.loads(first_json)
    files[0].write_text(json.dumps({**meta, "tensors": tensor_file.name}))
    with pytest.raises(ValueError, match="is not the save .* describes"):
        train.load_resume(files, reranker, optimizer, ["cfg"])
    files[0].write_text(
        json.dumps(
            {
                **json.loads(first_json),
                "tensors": tensor_file.name,
                "save_id": tensor_file.name.split(".")[2],
            }
        )
    )
    tensor_file.write_bytes(tensor_file.read_bytes()[:100])
    with pytest.raises(ValueError, match="unreadable resume state"):
        train.load_resume(files, reranker, optimizer, ["cfg"])


def test_the_model_fingerprint_sees_the_weights(tiny_dir, tiny, tmp_path):
    """Another checkpoint with the same config and tensor shapes has another fingerprint, so an
    adapter trained on one is refused on the other."""
    llm, tokenizer, template = tiny
    other = model_copy(tiny_dir, tmp_path, lambda c: None)
    assert runtime.model_fingerprint(other) == runtime.model_fingerprint(tiny_dir)
    tensors = load_file(other / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name] * 1.001  # a fine-tune: every byte moves
    save_file(tensors, other / "model.safetensors")
    assert runtime.model_fingerprint(other) != runtime.model_fingerprint(tiny_dir)
    runtime.save_adapter(make_reranker("qpeft-r", llm, template), tmp_path / "a", llm, {})
    other_llm, _ = runtime.load_llm(other, torch.float32)
    with pytest.raises(ValueError, match="--any-base-model loads it anyway"):
        runtime.load_adapter(tmp_path / "a", other_llm, tokenizer)


@pytest.mark.parametrize("kind", ["run", "requests"])
def test_partial_qrels_keep_the_unjudged_queries(tiny_dir, tmp_path, kind):
    """--qrels that judge one of two queries: both are reranked and written; one is evaluated."""
    data_dir = write_beir(tmp_path / "beir", ["train", "dev", "test"])
    (tmp_path / "qrels.tsv").write_text("s1\tp1\t1\n")
    if kind == "run":
        flags = run_flags(
            data_dir,
            tmp_path,
            "s1 Q0 p1 1 9.5 bm25\ns1 Q0 p3 2 9.0 bm25\ns2 Q0 p5 1 9.5 bm25\ns2 Q0 p6 2 9.0 bm25\n",
        )
    else:
        lines = [
            json.dumps(
                {
                    "query": {"qid": q, "text": QUERY_TEXT[q]},
                    "candidates": [
                        {"docid": d, "score": s, "doc": f"text of {d}"} for d, s in docs
                    ],
                }
            )
            for q, docs in (("s1", [("p1", 2.0), ("p3", 1.0)]), ("s2", [("p5", 2.0), ("p6", 1)]))
        ]
        flags = requests_flags(tmp_path, lines)
    out = tmp_path / "out"
    cli.main(
        [
            "--model",
            str(tiny_dir),
            "--dtype",
            "float32",
            "--out",
            str(out),
            *flags,
            "--qrels",
            str(tmp_path / "qrels.tsv"),
        ]
    )
    run = cli.ir.read_run(next(out.glob("zeroshot.*.trec")))
    assert sorted(run) == ["s1", "s2"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["zeroshot"][kind]["queries"] == 1
    if kind == "requests":
        written = (out / "zeroshot.requests.jsonl").read_text().splitlines()
        assert [json.loads(line)["query"]["qid"] for line in written] == ["s1", "s2"]


def test_bom_is_stripped_with_a_warning_in_every_reader(tmp_path, capsys):
    """A UTF-8 byte-order mark never becomes part of the first id or breaks a JSON file."""
    bom = "\ufeff"
    (tmp_path / "run.trec").write_text(bom + "q1 Q0 d1 1 2.0 t\nq1 Q0 d2 2 1.0 t\n")
    (tmp_path / "qrels.txt").write_text(bom + "q1 0 d1 1\n")
    (tmp_path / "qrels.tsv").write_text(bom + "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    (tmp_path / "queries.tsv").write_text(bom + "q1\tsome text\n")
    (tmp_path / "c.json").write_text(bom + '{"a": 1}')
    assert list(cli.ir.read_run(tmp_path / "run.trec")) == ["q1"]
    assert cli.ir.read_qrels(tmp_path / "qrels.txt") == {"q1": {"d1": 1}}
    assert cli.ir.read_qrels(tmp_path / "qrels.tsv") == {"q1": {"d1": 1}}
    assert cli.data.read_texts(tmp_path / "queries.tsv") == {"q1": "some text"}
    assert cli.ir.read_json(tmp_path / "c.json") == {"a": 1}
    err = capsys.readouterr().err
    for name in ("run.trec", "qrels.txt", "qrels.tsv", "queries.tsv", "c.json"):
        assert f"{name}: starts with a UTF-8 byte-order mark; ignored" in err, name


def plain_bpe(ranks, parts):
    """The definition: merge the adjacent pair of lowest rank, leftmost on ties, until none is
    mergeable (one scan of all pairs per merge: quadratic in the word's length)."""
    parts = list(parts)
    while len(parts) > 1:
        rank, i = min(
            (ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:]))
        )
        if rank == float("inf"):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def test_bpe_merges_as_the_definition_and_a_200k_word_is_fast():
    tok = Tokenizer.from_pretrained(TOKENIZER_JSON.parent)
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789+/=ĠĊ"
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400))) for _ in range(50)]
    words += ["a" * 300, "ab" * 200, "Ġthe" * 50]
    for word in words:
        assert tok._merge(list(word)) == plain_bpe(tok.ranks, word), word[:40]
    blob = "".join(rng.choice(alphabet[:-2]) for _ in range(200_000))  # base64-like, one pre-token
    start = time.perf_counter()
    ids = tok.encode(blob)
    assert time.perf_counter() - start < 20  # the quadratic merge took hours
    assert tok.decode(ids) == blob


def test_api_checks_its_arguments_like_the_command_line(tiny_dir, tmp_path):
    ranker = api.load_ranker(str(tiny_dir), device="cpu", dtype="float32")
    cases = [
        (lambda: ranker.score("capital of france", "Paris is the capital"), TypeError, "passages"),
        (lambda: ranker.score("", ["Paris"]), ValueError, "queries: 'q' has no text"),
        (lambda: ranker.rank("q", ["a", "b"], ids=["x"]), ValueError, "ids: 1 ids for 2"),
        (lambda: ranker.rank("q", ["a", "b"], top_k=-1), ValueError, "top_k: -1"),
        (lambda: ranker.rerank({"q": "x"}, {"q": "d1"}, {"d1": "t"}), TypeError, "candidates"),
        (lambda: ranker.rerank({"q": "x"}, {"r": ["d1"]}, {"d1": "t"}), KeyError, "'r'"),
        (lambda: ranker.rerank({"q": "x"}, {"q": ["d2"]}, {"d1": "t"}), KeyError, "'d2'"),
        (lambda: ranker.rerank({"q": 5}, {"q": ["d1"]}, {"d1": "t"}), TypeError, "strings"),
        (
            lambda: api.Ranker(ranker.llm, ranker.tokenizer, ranker.reranker, 0),
            ValueError,
            "token_budget",
        ),
        (lambda: api.load_ranker(str(tiny_dir), device="gpu"), ValueError, "--device gpu"),
        (lambda: api.load_ranker(str(tiny_dir), dtype="int8"), ValueError, "dtype"),
        (
            lambda: api.train_adapter("qpeft-a", "x", model=str(tiny_dir), steps=-1),
            ValueError,
            "steps: -1 is out of range",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            call()
    assert ranker.rank("capital of france", ["Paris", "Berlin"], top_k=1)[0][0] in (0, 1)
    # numpy's numbers are numbers: converted, not refused
    cfg = qpeft.QPEFTConfig(top_k=np.int64(5), dropout=np.float32(0.25))
    assert (cfg.top_k, cfg.dropout) == (5, 0.25) and type(cfg.top_k) is int
