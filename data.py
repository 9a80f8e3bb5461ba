"""Data for reranking: asset lookup ($QPEFT_HOME), dataset folders, first-stage candidates, BM25,
training pairs, batching.

A dataset is a folder in BEIR layout (see shared/data/*/README.md):
    corpus.jsonl           {"_id", "title", "text"}       one passage per line
    queries.jsonl          {"_id", "text", ...}           a "split" field, if present, is ignored
    qrels/{split}.tsv      "query-id<TAB>corpus-id<TAB>score" (BEIR header optional), integer grades
    runs/{split}.{tag}.trec   optional first stage, TREC run "qid Q0 docid rank score tag"
    train_hard_negatives.jsonl  optional {"_id", "neg": [...], "n_official"}: official negatives
A split exists when qrels/{split}.tsv exists, and its queries are the qids of that file, so
msmarco_small has train, dev, dev.graded and test. Bad data raises ValueError("file:line: what");
the few cases where skipping is the sane choice print a counted warning to stderr.
Credits: BM25 mirrors Lucene's BM25Similarity and Anserini's bag-of-words query; run order is
trec_eval's.
"""

import json
import math
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eval import atomic_save, read_qrels, read_run, text_lines, trec_ranking


def _warn(message):
    print(f"warning: {message}", file=sys.stderr)


def _lines(path):
    """(line number, line) for the non-blank lines of a UTF-8 text file; bytes that are not
    UTF-8 are an error naming the line (eval.text_lines)."""
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    for n, line in text_lines(path):
        if line.strip():
            yield n, line.rstrip("\r\n")


def _read_jsonl(path, fields):
    """{_id: record}; every record needs string `fields`, ids must be unique."""
    records = {}
    for n, line in _lines(path):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: bad JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in fields):
            raise ValueError(f"{path}:{n}: need string fields {', '.join(fields)}")
        if rec["_id"] in records:
            raise ValueError(f"{path}:{n}: duplicate _id {rec['_id']!r}")
        if not rec["_id"] or any(c.isspace() for c in rec["_id"]):  # TREC run lines split on spaces
            raise ValueError(f"{path}:{n}: _id {rec['_id']!r} is empty or holds whitespace")
        records[rec["_id"]] = rec
    return records


def _read_qrels(path, queries, requested_only=False):
    """{qid: {docid: grade}} (eval.read_qrels). Judged passages absent from the corpus are kept on
    purpose: TREC DL qrels judge the full collection, and metrics must be normalised by all of
    them. A query without text is an error, or (requested_only) left out with a counted warning."""
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    unrequested = set()

    def has_text(line_no, qid, docid):
        if qid in queries:
            return True
        if not requested_only:
            raise ValueError(f"{path}:{line_no}: query {qid!r} has no text in the queries")
        unrequested.add(qid)
        return False

    qrels = read_qrels(path, has_text)
    if unrequested:
        _warn(f"{path}: {len(unrequested)} judged queries are not requested and are left out")
    return qrels


def _read_run(path, corpus, queries):
    """{qid: {docid: score}} from a TREC run (eval.read_run); every passage needs text, or it
    cannot be reranked."""
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")

    def has_text(line_no, qid, docid):
        if qid not in queries:
            raise ValueError(f"{path}:{line_no}: query {qid!r} has no text in the queries")
        if docid not in corpus:
            raise ValueError(f"{path}:{line_no}: passage {docid!r} is not in the corpus")

    return read_run(path, has_text)


def ranked(scores):
    """{docid: score} in trec_eval's order: score descending, ties by docid descending (as strings).
    Runs are read by score, not by their rank column, so that the candidates we rerank and the
    BM25 baseline we report are the lists trec_eval sees (the two differ only on tied scores)."""
    return {docid: scores[docid] for docid in trec_ranking(scores)}


@dataclass
class Dataset:
    name: str
    path: Path
    corpus: dict[str, str]  # docid -> "title text" (just text if no title)
    queries: dict[str, str]  # qid -> text, for all splits
    qrels: dict[str, dict[str, dict[str, int]]]  # split -> qid -> docid -> grade
    runs: dict[str, dict[str, dict[str, float]]]  # split -> qid -> docid -> first-stage score
    official_negatives: dict[str, list[str]]  # qid -> the dataset's official negatives, if any

    @property
    def splits(self):
        return sorted(self.qrels)

    def _split(self, split):
        if split not in self.qrels:
            raise ValueError(
                f"{self.name} has no split {split!r} (splits: {', '.join(self.splits)})"
            )
        return self.qrels[split]

    def relevance_level(self, split):
        """Minimum grade that counts as relevant in binary measures (MRR, Recall, HR). TREC DL
        convention: graded qrels (any grade above 1, e.g. DL19's 0-3) use >= 2; binary ones >= 1."""
        return (
            2
            if any(g > 1 for judged in self._split(split).values() for g in judged.values())
            else 1
        )

    @cached_property
    def bm25(self):  # built on first use only: most splits come with a run
        return BM25(self.corpus)

    def first_stage(self, split, depth, qids=None):
        """{qid: {docid: score}} top-`depth` per query of `split` (or of its `qids`), best first:
        the split's run, else BM25 over this corpus computed here (so a folder without runs still
        works)."""
        judged = self._split(split)
        qids = judged if qids is None else qids
        if split not in self.runs:
            return {q: dict(self.bm25.search(self.queries[q], depth)) for q in qids}
        run = self.runs[split]
        if missing := sum(q not in run for q in qids):
            what = f"{missing} of {len(qids)} queries are not in the run (no candidates)"
            _warn(f"{self.name}/{split}: {what}")
        return {q: dict(list(ranked(run.get(q, {})).items())[:depth]) for q in qids}

    def candidates(self, split, depth):
        """{qid: [docid, ...]} in first-stage order, at most `depth` per query."""
        return {q: list(scores) for q, scores in self.first_stage(split, depth).items()}


def find_asset(name_or_path, kind):
    """A model or dataset given as a path, or as a name under $QPEFT_HOME/{kind}/ (kind "models"
    or "data")."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    home = Path(os.environ.get("QPEFT_HOME", "~/.cache/qpeft")).expanduser()
    path = home / kind / str(name_or_path)
    if not path.exists():
        what = {"models": "model", "data": "dataset"}.get(kind, kind)
        raise FileNotFoundError(
            f"{what} '{name_or_path}' not found: no such path, and no {path} "
            f"(set QPEFT_HOME or see README 'Set-up')"
        )
    return path


def load_dataset(name_or_path):
    """A dataset folder given as a path, or as a name under $QPEFT_HOME/data/."""
    path = find_asset(name_or_path, "data")
    # A passage is "title text" when it has a title (BEIR convention), else just its text.
    corpus = {
        i: f"{r['title']} {r['text']}" if r.get("title") else r["text"]
        for i, r in _read_jsonl(path / "corpus.jsonl", ("_id", "text")).items()
    }
    queries = {
        i: r["text"] for i, r in _read_jsonl(path / "queries.jsonl", ("_id", "text")).items()
    }
    qrels = {
        f.name[: -len(".tsv")]: _read_qrels(f, queries)
        for f in sorted((path / "qrels").glob("*.tsv"))
    }
    if not qrels:
        raise FileNotFoundError(f"missing file: {path / 'qrels'}/{{split}}.tsv (no split defined)")
    files = {}  # runs/{split}.{tag}.trec: the tag is the last dot-free part before ".trec"
    for f in sorted((path / "runs").glob("*.trec")):
        files.setdefault(f.name[: -len(".trec")].rsplit(".", 1)[0], []).append(f)
    runs = {}
    for split, found in files.items():
        if split not in qrels:
            _warn(f"{path / 'runs'}: ignoring {found[0].name}: no qrels/{split}.tsv")
            continue
        if len(found) > 1:  # several first stages for one split: the sorted first one, said loudly
            _warn(
                f"{split}: several runs ({', '.join(f.name for f in found)}); using {found[0].name}"
            )
        runs[split] = _read_run(found[0], corpus, queries)
    # A second set of judgments for a split's queries ("dev.graded" for "dev") has the same
    # candidates: the graded labels were collected on exactly that run.
    for split in qrels:
        if split not in runs and split.split(".")[0] in runs:
            runs[split] = runs[split.split(".")[0]]
    return Dataset(path.name, path, corpus, queries, qrels, runs, _read_official_negatives(path))


def _read_official_negatives(path):
    """{qid: [docid]} from train_hard_negatives.jsonl: the first `n_official` of each "neg" list
    (msmarco_train_extra), or neg[0] where "neg_source" says it is the official triples negative
    (msmarco_small's splade-toy queries). Its other lists are BM25 hits minus positives: no better
    than our own rank band, so they are not used."""
    file, negatives = path / "train_hard_negatives.jsonl", {}
    if not file.is_file():
        return negatives
    for n, line in _lines(file):
        try:
            rec = json.loads(line)
            official = (
                rec["n_official"]
                if "n_official" in rec
                else int(str(rec.get("neg_source")).startswith("neg[0]: official"))
            )
            if official:
                negatives[rec["_id"]] = rec["neg"][:official]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ValueError(
                f"{file}:{n}: expected {{'_id', 'neg': [...], 'n_official'}}"
            ) from None
    return negatives


def read_texts(path):
    """{id: text} of a queries or passages file: jsonl {"_id", "text"[, "title"]} (a title goes
    before the text, as in BEIR corpora) or tsv id<TAB>text."""
    path = Path(path)
    if path.suffix == ".jsonl":
        records = _read_jsonl(path, ("_id", "text"))
        return {
            i: f"{r['title']} {r['text']}" if r.get("title") else r["text"]
            for i, r in records.items()
        }
    texts = {}
    for n, line in _lines(path):
        cols = line.split("\t")
        if len(cols) != 2 or not cols[0] or any(c.isspace() for c in cols[0]):
            raise ValueError(f"{path}:{n}: expected 'id<TAB>text', got {line[:60]!r}")
        if cols[0] in texts:
            raise ValueError(f"{path}:{n}: duplicate id {cols[0]!r}")
        texts[cols[0]] = cols[1]
    return texts


def run_dataset(run, queries, corpus, qrels=None):
    """A Dataset of one split, "run": the candidates of a TREC run with the texts of its queries
    and passages, judged by `qrels` when given (else every query has no judgments)."""
    corpus, queries = read_texts(corpus), read_texts(queries)
    scores = _read_run(Path(run), corpus, queries)
    judged = _read_qrels(Path(qrels), queries) if qrels else {q: {} for q in scores}
    return Dataset(
        Path(run).name, Path(run).parent, corpus, queries, {"run": judged}, {"run": scores}, {}
    )


def _request_text(doc):
    """A rank_llm candidate's text: a string, or a dict with contents, text or segment (and
    an optional title, which goes first)."""
    if isinstance(doc, str):
        return doc
    if not isinstance(doc, dict):
        raise TypeError(f"doc is {type(doc).__name__}, not a string or an object")
    body = next(doc[k] for k in ("contents", "text", "segment") if isinstance(doc.get(k), str))
    return f"{doc['title']} {body}" if isinstance(doc.get("title"), str) and doc["title"] else body


def requests_dataset(path, qrels=None):
    """(a Dataset of one split, "requests", the parsed records) from rank_llm's JSONL requests,
    one query per line: {"query": {"text", "qid"}, "candidates": [{"docid", "score", "doc"}]}."""
    path, records = Path(path), []
    queries, corpus, scores = {}, {}, {}
    for n, line in _lines(path):
        try:
            record = json.loads(line)
            qid, text = str(record["query"]["qid"]), record["query"]["text"]
            found = [
                (str(c["docid"]), float(c["score"]), _request_text(c["doc"]))
                for c in record["candidates"]
            ]
            if not isinstance(text, str):
                raise TypeError("query text is not a string")
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: bad JSON ({e.msg})") from None
        except (KeyError, TypeError, ValueError, StopIteration) as e:
            raise ValueError(
                f"{path}:{n}: not a rank_llm request {{query: {{qid, text}}, "
                f"candidates: [{{docid, score, doc}}]}} ({type(e).__name__}: {e})"
            ) from None
        if not qid or any(c.isspace() for c in qid):  # TREC run lines split on spaces
            raise ValueError(f"{path}:{n}: qid {qid!r} is empty or holds whitespace")
        if qid in queries:
            raise ValueError(f"{path}:{n}: query {qid!r} is requested twice")
        queries[qid], scores[qid] = text, {}
        for docid, score, passage in found:
            if not docid or any(c.isspace() for c in docid) or not math.isfinite(score):
                raise ValueError(
                    f"{path}:{n}: candidate {docid!r} has an empty or spaced id, or "
                    f"a score that is not finite ({score})"
                )
            if corpus.setdefault(docid, passage) != passage:
                raise ValueError(
                    f"{path}:{n}: passage {docid!r} has another text than on an earlier line"
                )
            if docid in scores[qid]:
                raise ValueError(f"{path}:{n}: passage {docid!r} listed twice for query {qid!r}")
            scores[qid][docid] = score
        records.append(record)
    judged = {q: {} for q in scores}
    if qrels:  # qrels usually judge more queries than one file requests: those are left out
        judged = _read_qrels(Path(qrels), queries, requested_only=True)
    dataset = Dataset(
        path.name, path.parent, corpus, queries, {"requests": judged}, {"requests": scores}, {}
    )
    return dataset, records


def write_requests(path, records, run, save=atomic_save):
    """rank_llm's format again: each record's candidates reordered best first by `run`
    {qid: {docid: score}}, with those scores (written whole: temp file, then rename)."""
    lines = []
    for record in records:
        scores = run.get(str(record["query"]["qid"]), {})  # a query without candidates: none
        order = {d: i for i, d in enumerate(trec_ranking(scores))}  # the TREC run's order
        candidates = sorted(record["candidates"], key=lambda c: order[str(c["docid"])])
        candidates = [{**c, "score": scores[str(c["docid"])]} for c in candidates]
        lines.append(json.dumps({**record, "candidates": candidates}, ensure_ascii=False))
    save(lambda f: Path(f).write_text("\n".join(lines) + "\n", encoding="utf-8"), path)


def merge_datasets(*datasets):
    """One Dataset over several folders, e.g. msmarco_small + msmarco_train_extra for training.
    A passage or query id may appear twice only with the same text; a (split, query) only once."""
    merged = Dataset("+".join(d.name for d in datasets), datasets[0].path, {}, {}, {}, {}, {})
    for d in datasets:
        merged.official_negatives.update(d.official_negatives)
        for mine, theirs, what in (
            (merged.corpus, d.corpus, "passage"),
            (merged.queries, d.queries, "query"),
        ):
            if (
                clash := next((i for i, t in theirs.items() if mine.get(i, t) != t), None)
            ) is not None:
                raise ValueError(
                    f"merge: {what} {clash!r} has another text in {d.name} than before"
                )
            mine.update(theirs)
        for mine, theirs in ((merged.qrels, d.qrels), (merged.runs, d.runs)):
            for split, per_query in theirs.items():
                if clash := sorted(mine.setdefault(split, {}).keys() & per_query.keys()):
                    raise ValueError(
                        f"merge: query {clash[0]!r} of split {split!r} is in two datasets"
                    )
                mine[split].update(per_query)
    return merged


# Lucene's default English stop words (the 33 of EnglishAnalyzer / StopAnalyzer).
STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such "
    "that the their then there these they this to was will with".split()
)


def bm25_tokens(text):
    """Lowercase, runs of word characters (re \\w+), stop words dropped, no stemming."""
    return [t for t in re.findall(r"\w+", text.lower()) if t not in STOPWORDS]


class BM25:
    """Okapi BM25 as in Lucene 8+/Anserini (k1 0.9, b 0.4): for each query term t, summed with
    the term's count in the query as weight,
        idf(t) * tf / (tf + k1 * (1 - b + b * dl / avgdl)),
        idf(t) = log(1 + (N - df + 0.5) / (df + 0.5))
    Lucene dropped the constant factor (k1 + 1); it also rounds dl to one byte, which we do not,
    so scores can differ from Anserini's in the third digit. The index is a CSR of postings:
    the passages containing term t are doc[start[t]:start[t+1]], with their precomputed weights."""

    def __init__(self, corpus, k1=0.9, b=0.4):
        self.docids = list(corpus)
        self.vocab, terms, docs, tfs, lengths = {}, [], [], [], []
        for d, text in enumerate(
            tqdm(corpus.values(), desc="BM25 index", disable=len(corpus) < 50_000)
        ):
            tokens = bm25_tokens(text)
            lengths.append(len(tokens))
            for term, tf in Counter(tokens).items():
                terms.append(self.vocab.setdefault(term, len(self.vocab)))
                docs.append(d)
                tfs.append(tf)
        terms, order = np.array(terms, dtype=np.int64), np.argsort(terms, kind="stable")
        self.doc = np.array(docs, dtype=np.int64)[order]
        tf = np.array(tfs, dtype=np.float64)[order]
        df = np.bincount(terms, minlength=len(self.vocab))
        self.start = np.concatenate([[0], np.cumsum(df)])
        lengths = np.array(lengths, dtype=np.float64)
        idf = np.log(1 + (len(lengths) - df + 0.5) / (df + 0.5))
        norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1e-9))
        self.weight = np.repeat(idf, df) * tf / (tf + norm[self.doc])

    def scores(self, query):
        """BM25 score of every passage (0 where no term matches), in corpus order."""
        scores = np.zeros(len(self.docids))
        for term, count in Counter(bm25_tokens(query)).items():
            if (t := self.vocab.get(term)) is not None:
                span = slice(self.start[t], self.start[t + 1])
                scores[self.doc[span]] += count * self.weight[span]  # docs within a term are unique
        return scores

    def search(self, query, k):
        """[(docid, score)] of the best k matching passages, ties broken as trec_eval does."""
        scores = self.scores(query)
        hits = np.flatnonzero(scores > 0)
        if len(hits) > k:  # keep everything tied with the k-th score, so the cut is deterministic
            hits = hits[scores[hits] >= np.partition(scores[hits], len(hits) - k)[len(hits) - k]]
        return list(ranked({self.docids[i]: float(scores[i]) for i in hits}).items())[:k]


@dataclass(frozen=True)
class TrainExample:
    qid: str
    positive_docid: str
    hard_negative_docid: str
    negative_source: str = field(default="", compare=False)  # see hard_negative_pool
    # the listwise loss's pool: every first-stage negative of list_negative_pool
    list_negatives: tuple = field(default=(), compare=False)


# Unlabelled BM25 hits ranked 11-20 are the hard-negative pool where nothing better is known. On
# the 40 dev queries of msmarco_small with complete graded labels (qrels/dev.graded.tsv), the share
# of unlabelled candidates that are in fact relevant (grade >= 2) falls with the BM25 rank:
# 0.60 at ranks 1-5, 0.39 at 6-10, 0.34 at 11-15, 0.26 at 16-20.
HARD_NEGATIVE_BAND = (11, 20)


def hard_negative_pool(dataset, qid, judged, ranking):
    """Where a query's hard negative comes from, best evidence first, and the pool:
    'official': the dataset's own negatives (MS MARCO triples); 'judged': first-stage top-20 hits
    that the qrels judge non-relevant (grade < 1; nq_small judges every candidate by has_answer);
    'band': unjudged hits at ranks HARD_NEGATIVE_BAND of the first stage (sparse labels); 'top-20':
    any unjudged top-20 hit, for first-stage lists too short to reach the band."""
    official = dataset.official_negatives.get(qid, [])
    if official := [d for d in official if judged.get(d, 0) < 1 and d in dataset.corpus]:
        return "official", official
    if judged_negatives := [d for d in ranking[:20] if d in judged and judged[d] < 1]:
        return "judged", judged_negatives
    first, last = HARD_NEGATIVE_BAND
    if band := [d for d in ranking[first - 1 : last] if judged.get(d, 0) < 1]:
        return "band", band
    return "top-20", [d for d in ranking[:20] if judged.get(d, 0) < 1]  # short lists only


def list_negative_pool(dataset, qid, judged, ranking):
    """The listwise loss's negatives of a query: all the evidence hard_negative_pool ranks, not
    only the best kind: the official negatives, the top-20 hits judged non-relevant (nq_small:
    answer-free) and the unjudged hits of HARD_NEGATIVE_BAND, each once, in that order; lists
    too short to reach the band give their unjudged top-20 hits instead."""
    first, last = HARD_NEGATIVE_BAND
    official = [d for d in dataset.official_negatives.get(qid, []) if d in dataset.corpus]
    judged_negatives = [d for d in ranking[:20] if d in judged]
    band = ranking[first - 1 : last] if len(ranking) >= first else ranking[:20]
    return list(
        dict.fromkeys(d for d in official + judged_negatives + band if judged.get(d, 0) < 1)
    )


def training_examples(dataset, split="train", seed=0):
    """One (query, positive, hard negative) triple per query of `split` (method.md §5), the hard
    negative from hard_negative_pool; for several folders use merge_datasets. In-batch negatives
    are the trainer's job. Each query draws from its own Random(f"{seed}:{qid}"): its pair does
    not depend on the other queries or folders present. Queries lacking either are skipped and
    counted."""
    level = dataset.relevance_level(split)
    candidates = dataset.candidates(split, 1000)
    examples, no_positive, no_negative = [], 0, 0
    for qid, judged in dataset.qrels[split].items():
        positives = sorted(
            d for d, grade in judged.items() if grade >= level and d in dataset.corpus
        )
        source, negatives = hard_negative_pool(dataset, qid, judged, candidates.get(qid, []))
        no_positive += not positives
        no_negative += bool(positives) and not negatives
        if positives and negatives:
            rng = random.Random(f"{seed}:{qid}")
            pool = tuple(list_negative_pool(dataset, qid, judged, candidates.get(qid, [])))
            positive, negative = rng.choice(positives), rng.choice(negatives)
            examples.append(TrainExample(qid, positive, negative, source, pool))
    if no_positive or no_negative:
        _warn(
            f"{dataset.name}/{split}: skipped {no_positive} queries without a positive that has "
            f"text and {no_negative} without a hard negative"
        )
    return examples


def train_batches(examples, queries_per_batch, seed=0, epoch=0):
    """The examples shuffled (same order for the same seed and epoch) and cut into batches of
    `queries_per_batch` queries; the last batch may be smaller."""
    order = list(examples)
    random.Random(f"{seed}:epoch{epoch}").shuffle(order)
    return [order[i : i + queries_per_batch] for i in range(0, len(order), queries_per_batch)]


def tokenize_texts(tokenizer, texts, max_tokens=None):
    """{id: token ids} via tokenizer.encode(text), cut to `max_tokens` keeping the START of the
    text (method.md §2: the title and first sentence matter most); the text after the cut is never
    tokenised. Nothing is cached on disk."""
    items = tqdm(texts.items(), desc="tokenizing", disable=len(texts) < 2000, leave=False)
    return {i: tokenizer.encode(text, max_tokens) for i, text in items}


def token_budget_batches(lengths, max_tokens):
    """Indices into `lengths` grouped so that every padded batch holds len(batch) * max(length)
    <= max_tokens. Sorting by length first (stable) puts similar lengths together, so little of a
    batch is padding; then greedy packing. An item longer than the budget forms its own batch."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    batches, batch = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batch and (len(batch) + 1) * lengths[i] > max_tokens:  # lengths[i] is the new maximum
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + [batch] if batch else batches
