"""Bad input, as a new user makes it: each case builds a tiny dataset, model folder or module, runs
the command line, and expects exit code 2 with one line naming the file:line, flag, key or query at
fault (no traceback). The last cases are odd but valid input: counted warnings, and "n/a" for a
paired test on one query. About 10 s on 2 CPU cores."""

import json
import shutil

import pytest

import cli
from test_qpeft import QUERY_TEXT, tiny_args, write_beir, write_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def edit(path, change):
    path.write_text(change(path.read_text()))


def model_copy(tiny_dir, tmp_path, change_config):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    change_config(config)
    (folder / "config.json").write_text(json.dumps(config))
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
