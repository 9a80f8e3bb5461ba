"""data.py: BM25 by hand, the dataset loader on tiny folders and on msmarco_small, training pairs,
batching. Runs in a few seconds on CPU."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from data import (
    BM25,
    TrainExample,
    bm25_tokens,
    hard_negative_pool,
    list_negative_pool,
    load_dataset,
    merge_datasets,
    ranked,
    token_budget_batches,
    tokenize_texts,
    train_batches,
    training_examples,
)

MSMARCO_SMALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "msmarco_small"
TRAIN_EXTRA = MSMARCO_SMALL.parent / "msmarco_train_extra"


def test_bm25_by_hand():
    corpus = {"d1": "Cat cat dog.", "d2": "The cat", "d3": "dog, bird", "d4": "fish"}
    # tokens: d1 [cat cat dog] dl 3; d2 [cat] dl 1 ("the" is a stop word); d3 [dog bird] dl 2;
    # d4 [fish] dl 1.  N = 4, avgdl = 7/4 = 1.75.
    # idf(cat) = log(1 + (4 - 2 + 0.5) / (2 + 0.5)) = log 2
    # idf(bird) = log(1 + 3.5 / 1.5) = log(10/3)
    # norm(dl) = k1 (1 - b + b dl / avgdl) = 0.9 (0.6 + 0.4 dl / 1.75):
    #   dl 3 -> 1.157142857, dl 1 -> 0.745714286, dl 2 -> 0.951428571
    # query "cat bird":
    #   d1: log 2 * 2 / (2 + 1.157142857)  = 0.693147181 * 0.633484163 = 0.439097761
    #   d2: log 2 * 1 / (1 + 0.745714286)  = 0.693147181 * 0.572831424 = 0.397056486
    #   d3: log(10/3) * 1 / (1 + 0.951428571) = 1.203972804 * 0.512445095 = 0.616969958
    #   d4: no term matches, not returned
    assert bm25_tokens("The cat's, DOG!") == ["cat", "s", "dog"]
    hits = BM25(corpus).search("cat bird", 10)
    assert [d for d, _ in hits] == ["d3", "d1", "d2"]
    for (_, score), expected in zip(hits, [0.616969958, 0.439097761, 0.397056486]):
        assert score == pytest.approx(expected, abs=1e-6)
    assert hits[1][1] == pytest.approx(
        math.log(2) * 2 / (2 + 0.9 * (0.6 + 0.4 * 3 / 1.75)), abs=1e-12
    )
    # A term repeated in the query counts that many times (Anserini's bag-of-words query).
    bm25 = BM25(corpus)
    assert bm25.scores("cat cat") == pytest.approx(2 * bm25.scores("cat"))
    assert BM25(corpus).search("cat bird", 2) == hits[:2]


def test_bm25_ties_like_trec_eval():
    # Equal scores: docid descending (string order), also across the top-k cut.
    bm25 = BM25({"a": "x y", "c": "x y", "b": "x y", "d": "z"})
    assert [d for d, _ in bm25.search("x", 10)] == ["c", "b", "a"]
    assert [d for d, _ in bm25.search("x", 2)] == ["c", "b"]
    assert bm25.search("nothing here", 5) == []


def write_folder(root, corpus, queries, qrels, runs=None):
    """A tiny BEIR folder. corpus/queries: lists of dicts (or raw strings, written as is);
    qrels: {split: [(qid, docid, grade)]}; runs: {file name: [(qid, docid, score)]}."""

    def jsonl(name, rows):
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        (root / name).write_text("\n".join(lines) + "\n")

    jsonl("corpus.jsonl", corpus)
    jsonl("queries.jsonl", queries)
    (root / "qrels").mkdir()
    for split, rows in qrels.items():
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{g}" for q, d, g in rows]
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    if runs:
        (root / "runs").mkdir()
        for name, rows in runs.items():
            lines = [f"{q} Q0 {d} {r} {s} test" for r, (q, d, s) in enumerate(rows, 1)]
            (root / "runs" / name).write_text("\n".join(lines) + "\n")
    return root


CORPUS = [
    {"_id": "p1", "title": "Cats", "text": "cats purr"},
    {"_id": "p2", "title": "", "text": "dogs bark"},
    {"_id": "p3", "title": "", "text": "cats and dogs"},
    {"_id": "p4", "title": "", "text": "fish swim"},
]


def test_loader_with_split_field_and_runs(tmp_path):
    queries = [
        {"_id": "q1", "text": "do cats purr", "split": "train"},
        {"_id": "q2", "text": "dogs", "split": "test"},
    ]
    qrels = {"train": [("q1", "p1", 1)], "test": [("q2", "p2", 3), ("q2", "p9", 2)]}  # p9: no text
    runs = {
        "train.bm25.trec": [("q1", "p3", 5.0), ("q1", "p1", 5.0), ("q1", "p4", 1.0)],
        "test.bm25.trec": [("q2", "p2", 2.0), ("q2", "p3", 1.0)],
    }
    ds = load_dataset(write_folder(tmp_path, CORPUS, queries, qrels, runs))
    assert ds.splits == ["test", "train"]
    assert ds.corpus["p1"] == "Cats cats purr"  # the title joined, if any
    assert ds.corpus["p2"] == "dogs bark"
    # Tied scores: docid descending (trec_eval), whatever the rank column says; then cut to depth.
    assert ds.candidates("train", 2) == {"q1": ["p3", "p1"]}
    assert ds.first_stage("test", 10) == {"q2": {"p2": 2.0, "p3": 1.0}}
    assert (ds.relevance_level("train"), ds.relevance_level("test")) == (1, 2)
    with pytest.raises(ValueError, match="no split 'dev'"):
        ds.candidates("dev", 10)


def test_loader_only_test_split_no_split_field_no_run(tmp_path):
    queries = [{"_id": "q1", "text": "cats and dogs"}, {"_id": "q2", "text": "fish"}]
    ds = load_dataset(
        write_folder(tmp_path, CORPUS, queries, {"test": [("q1", "p3", 1), ("q2", "p4", 1)]})
    )
    assert ds.splits == ["test"] and ds.runs == {}
    # No run: BM25 over the folder's own corpus; only matching passages, best first
    # (p1 "Cats cats purr" has cats twice and beats p2 "dogs bark").
    assert ds.candidates("test", 2) == {"q1": ["p3", "p1"], "q2": ["p4"]}
    assert ds.candidates("test", 2)["q1"] == [
        d for d, _ in BM25(ds.corpus).search("cats and dogs", 2)
    ]


GOOD_QUERIES = [{"_id": "q1", "text": "cats"}]


ONE_LABEL = {"test": [("q1", "p1", 1)]}


def bad(message, error=ValueError, corpus=CORPUS, queries=GOOD_QUERIES, qrels=ONE_LABEL, runs=None):
    """A folder that differs from a good one where the keywords say, and the error it must raise."""
    return corpus, queries, qrels, runs, error, message


@pytest.mark.parametrize(
    "corpus, queries, qrels, runs, error, message",
    [
        bad(r"corpus\.jsonl:2: bad JSON", corpus=CORPUS[:1] + ['{"_id": "p2", "text": ']),
        bad(
            r"corpus\.jsonl:5: duplicate _id 'p2'",
            corpus=CORPUS + [{"_id": "p2", "title": "", "text": "again"}],
        ),
        bad(r"queries\.jsonl:1: need string fields _id, text", queries=[{"_id": "q1"}]),
        bad(
            r"test\.tsv:3: query 'q7' has no text",
            qrels={"test": [("q1", "p1", 1), ("q7", "p1", 1)]},
        ),
        bad(
            r"test\.tsv:2: grade 'high' is not an integer",
            qrels={"test": [("q1", "p1", "high")]},
        ),
        bad(
            r"test\.bm25\.trec:2: passage 'p8' is not in the corpus",
            runs={"test.bm25.trec": [("q1", "p1", 2), ("q1", "p8", 1)]},
        ),
        bad(
            r"test\.bm25\.trec:2: passage 'p1' listed twice",
            runs={"test.bm25.trec": [("q1", "p1", 2), ("q1", "p1", 1)]},
        ),
        bad(
            r"test\.bm25\.trec:1: score 'x' is not a number",
            runs={"test.bm25.trec": [("q1", "p1", "x")]},
        ),
        bad(r"qrels", FileNotFoundError, qrels={}),
    ],
)
def test_loader_rejects_bad_data(tmp_path, corpus, queries, qrels, runs, error, message):
    with pytest.raises(error, match=message):
        load_dataset(write_folder(tmp_path, corpus, queries, qrels, runs))


def test_loader_missing_file_names_the_path(tmp_path):
    folder = write_folder(tmp_path, CORPUS, GOOD_QUERIES, {"test": [("q1", "p1", 1)]})
    (folder / "queries.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=str(folder / "queries.jsonl")):
        load_dataset(folder)


@pytest.fixture(scope="module")
def small():
    if not MSMARCO_SMALL.exists():
        pytest.skip(f"{MSMARCO_SMALL} not present")
    return load_dataset(MSMARCO_SMALL)


def test_msmarco_small(small):
    sizes = {s: len(small.qrels[s]) for s in small.splits}
    assert sizes == {"train": 580, "dev": 60, "dev.graded": 40, "test": 43}
    assert len(small.corpus) == 15034
    test = small.candidates("test", 100)
    assert all(len(docids) == 100 for docids in test.values())
    assert test["264014"][0] == "5611210"
    assert all(docids == list(ranked(small.runs["test"][q])) for q, docids in test.items())
    assert small.relevance_level("test") == 2 and small.relevance_level("dev") == 1
    assert small.relevance_level("dev.graded") == 2
    # The graded dev labels were collected on the dev run's 20 candidates, so they share it.
    graded = small.candidates("dev.graded", 20)
    assert graded == {q: small.candidates("dev", 20)[q] for q in graded}


def test_training_examples(small):
    a = training_examples(small, seed=0)
    assert len(a) == 580 and a == training_examples(small, seed=0)
    assert a != training_examples(small, seed=1)
    ranking = small.candidates("train", 30)
    for ex in a:
        judged = small.qrels["train"][ex.qid]
        assert judged[ex.positive_docid] >= 1
        assert judged.get(ex.hard_negative_docid, 0) < 1
        if ex.qid.startswith("splade-toy"):  # train_hard_negatives.jsonl's neg[0]: the triples' one
            assert ex.negative_source == "official"
            assert ex.hard_negative_docid == small.official_negatives[ex.qid][0]
        else:  # sparse labels: an unlabelled hit at BM25 ranks 11-20, never the top 10
            assert ex.negative_source == "band"
            assert ex.hard_negative_docid in ranking[ex.qid][10:20]
    if TRAIN_EXTRA.exists():  # its official negatives; a query's pair ignores the other folders
        extra = load_dataset(TRAIN_EXTRA)
        merged = training_examples(merge_datasets(small, extra), seed=0)
        assert len(merged) == 580 + 894 and merged[:580] == a
        assert all(
            e.negative_source == "official"
            and e.hard_negative_docid in extra.official_negatives[e.qid]
            for e in merged[580:]
        )


def test_hard_negative_pool_by_hand():
    """Official negatives first, then hits judged non-relevant, then the unjudged ranks 11-20."""
    ranking = [f"d{i}" for i in range(1, 25)]  # BM25 order: d1 is rank 1
    ds = SimpleNamespace(
        official_negatives={"q1": ["x", "d1", "gone"]}, corpus={"x", "d1"} | set(ranking)
    )
    # q1: official "x" (the judged-relevant d1 and "gone", not in the corpus, are dropped)
    assert hard_negative_pool(ds, "q1", {"d1": 1}, ranking) == ("official", ["x"])
    # q2: no official negative; d3 and d30 are judged 0, d30 is not in the top 20
    assert hard_negative_pool(ds, "q2", {"d2": 1, "d3": 0, "d30": 0}, ranking) == ("judged", ["d3"])
    # q3: only a positive is judged: the unjudged band, ranks 11-20, minus the positive d12
    band = ["d11", "d13", "d14", "d15", "d16", "d17", "d18", "d19", "d20"]
    assert hard_negative_pool(ds, "q3", {"d12": 1}, ranking) == ("band", band)
    # q4: a list too short to reach rank 11: any unjudged top-20 hit
    assert hard_negative_pool(ds, "q4", {"d1": 1}, ranking[:3]) == ("top-20", ["d2", "d3"])


def test_list_negative_pool_by_hand():
    """The listwise pool takes every kind of evidence at once, each negative once."""
    ranking = [f"d{i}" for i in range(1, 25)]
    ds = SimpleNamespace(
        official_negatives={"q1": ["x", "d12", "gone"]}, corpus={"x"} | set(ranking)
    )
    band = ["d11", "d13", "d14", "d15", "d16", "d17", "d18", "d19", "d20"]
    # official x and d12 (d12 is in the band too: listed once), the judged-0 d3 (d30 is below
    # the top 20, the judged-relevant d2 is no negative), then the band
    pool = list_negative_pool(ds, "q1", {"d2": 1, "d3": 0, "d30": 0}, ranking)
    assert pool == ["x", "d12", "d3", "d11"] + band[1:]
    # nq_small: every candidate judged; the answer-free top-20 hits and nothing judged relevant
    judged = {d: int(d in ("d1", "d5")) for d in ranking}
    assert list_negative_pool(ds, "q2", judged, ranking) == [
        d for d in ranking[:20] if d not in ("d1", "d5")
    ]
    # a list too short to reach rank 11: its unjudged hits
    assert list_negative_pool(ds, "q3", {"d1": 1}, ranking[:3]) == ["d2", "d3"]


def test_training_examples_skips_queries_without_negative(tmp_path, capsys):
    queries = [{"_id": "q1", "text": "cats"}, {"_id": "q2", "text": "dogs"}]
    qrels = {"train": [("q1", "p1", 1), ("q2", "p2", 1), ("q2", "p3", 1)]}
    runs = {"train.x.trec": [("q1", "p1", 3), ("q1", "p3", 2), ("q2", "p2", 2), ("q2", "p3", 1)]}
    ds = load_dataset(write_folder(tmp_path, CORPUS, queries, qrels, runs))
    assert training_examples(ds) == [TrainExample("q1", "p1", "p3")]
    skipped = "skipped 0 queries without a positive that has text and 1 without"
    assert skipped in capsys.readouterr().err


def test_train_batches():
    examples = [TrainExample(f"q{i}", f"p{i}", f"n{i}") for i in range(10)]
    batches = train_batches(examples, 4, seed=0, epoch=0)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(ex.qid for b in batches for ex in b) == sorted(ex.qid for ex in examples)
    assert batches == train_batches(examples, 4, seed=0, epoch=0)
    assert batches != train_batches(examples, 4, seed=0, epoch=1)


def test_token_budget_batches():
    lengths = [5, 30, 7, 7, 100, 12, 1, 30, 8, 9]
    batches = token_budget_batches(lengths, 40)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 40 or len(b) == 1 for b in batches)
    assert [4] in batches  # the over-long item alone
    assert batches[0] == [6, 0, 2, 3, 8]  # shortest first, ties in index order: 5 * 8 = 40
    assert batches == token_budget_batches(lengths, 40)
    assert len(token_budget_batches([10] * 100, 50)) == 20  # never everything in one batch
    assert token_budget_batches([], 10) == []


def test_tokenize_texts_keeps_the_start():
    class CharTokenizer:
        def encode(self, text, limit=None):  # tokenizer.Tokenizer's interface
            return [ord(c) for c in text][:limit]

    out = tokenize_texts(CharTokenizer(), {"a": "Title. Body text", "b": "hi"}, max_tokens=6)
    assert out == {"a": [ord(c) for c in "Title."], "b": [ord("h"), ord("i")]}
    assert tokenize_texts(CharTokenizer(), {"a": "abc"}) == {"a": [97, 98, 99]}


def test_ranked_compares_scores_as_float32_like_trec_eval():
    # 1.0000000003 and 1.0000000001 are the same float32: a tie, so docid descending decides
    # ("b" > "a"), although in float64 "a" scores higher.
    assert list(ranked({"a": 1.0000000003, "b": 1.0000000001, "c": 2.0})) == ["c", "b", "a"]
