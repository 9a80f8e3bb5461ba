"""The Python API: a frozen LLM with a reranker, zero-shot or a trained adapter, for your own code;
the same calls the command line makes (runtime.rerank, runtime.load_adapter, train.fit).

    from api import load_ranker, train_adapter
    ranker = load_ranker()                           # zero-shot, or load_ranker(adapter=FOLDER)
    ranker.rank("capital of france", ["Berlin is ...", "Paris is ..."], top_k=1)
"""

from pathlib import Path

import train
from qpeft import QPEFTConfig, Reranker, Template
from runtime import (
    check_finite,
    load_adapter,
    load_llm,
    rerank,
    save_adapter,
    setup_device,
    tokenize,
)


class Ranker:
    """A frozen LLM with one reranker, zero-shot or a trained adapter (see load_ranker): score,
    rank and rerank passages with it, or save its module as an adapter folder."""

    def __init__(self, llm, tokenizer, reranker, token_budget=4096):
        if not isinstance(token_budget, int) or isinstance(token_budget, bool) or token_budget < 1:
            raise ValueError(f"token_budget: {token_budget!r} is not an int >= 1")
        self.llm, self.tokenizer, self.reranker = llm, tokenizer, reranker
        self.template = Template(tokenizer, reranker.cfg.instruction)
        self.token_budget = token_budget

    def rerank(self, queries, candidates, corpus):
        """{qid: {docid: score}} for queries {qid: text}, candidates {qid: [docid]} and corpus
        {docid: text}; each passage's keys/values are computed once for every query that meets it.
        Scores are mean log-probabilities of the query: higher is better."""
        check_texts("queries", queries)
        if not isinstance(corpus, dict):
            raise TypeError(f"corpus: a dict {{docid: text}}, not {type(corpus).__name__}")
        if not isinstance(candidates, dict):
            raise TypeError(f"candidates: a dict {{qid: [docid]}}, not {type(candidates).__name__}")
        for qid, docids in candidates.items():
            if qid not in queries:
                raise KeyError(f"candidates: query {qid!r} is not in queries")
            if isinstance(docids, str) or not isinstance(docids, (list, tuple)):
                raise TypeError(f"candidates[{qid!r}]: a list of docids, not {docids!r:.40}")
            if missing := next((d for d in docids if d not in corpus), None):
                raise KeyError(f"candidates[{qid!r}]: passage {missing!r} is not in corpus")
        passages = {d: corpus[d] for docs in candidates.values() for d in docs}
        check_texts("corpus", passages, empty_ok=True)  # the passages used, not a whole corpus
        tokens = tokenize(self.tokenizer, self.reranker.cfg, queries, passages)
        rerankers = {"ranker": self.reranker}
        scores, _ = rerank(
            self.llm, self.template, rerankers, candidates, tokens, self.token_budget, None
        )
        check_finite(scores, self.llm.name)
        return {q: scores["ranker"].get(q, {}) for q in candidates}

    def score(self, query, passages):
        """[score of each passage] for one query, in the passages' order."""
        if isinstance(passages, str) or not isinstance(passages, (list, tuple)):
            raise TypeError(f"passages: a list of strings, not {type(passages).__name__}")
        ids = [str(i) for i in range(len(passages))]
        scores = self.rerank({"q": query}, {"q": ids}, dict(zip(ids, passages)))["q"]
        return [scores[i] for i in ids]

    def rank(self, query, passages, ids=None, top_k=None):
        """[(id, score)] best first (ids default to the passages' positions), top_k first only."""
        ids = list(range(len(passages))) if ids is None else list(ids)
        if len(ids) != len(passages):
            raise ValueError(f"ids: {len(ids)} ids for {len(passages)} passages")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k: {top_k!r} is not None or an int >= 1")
        ranked = sorted(zip(ids, self.score(query, passages)), key=lambda pair: -pair[1])
        return ranked[:top_k]

    def save(self, folder, **extra):
        """Write the trained module as an adapter folder (load it with load_ranker(adapter=...))."""
        save_adapter(self.reranker, Path(folder), self.llm, extra)


def check_texts(what, texts, empty_ok=False):
    """{id: text} with string ids and texts (a query must say something): TypeError or ValueError
    naming the argument and the id."""
    if not isinstance(texts, dict):
        raise TypeError(f"{what}: a dict {{id: text}}, not {type(texts).__name__}")
    for key, text in texts.items():
        if not isinstance(key, str) or not isinstance(text, str):
            raise TypeError(f"{what}: {key!r}: ids and texts must be strings")
        if not empty_ok and not text.strip():
            raise ValueError(f"{what}: {key!r} has no text")


def load_ranker(
    model="SmolLM2-135M-Instruct", adapter=None, device="auto", dtype=None, any_base_model=False
):
    """A Ranker: the frozen `model` (a name under $QPEFT_HOME/models or a folder) on `device`,
    zero-shot, or with `adapter`, a folder written by qpeft.py or train_adapter."""
    llm, tokenizer = load_llm(model, dtype, setup_device(device))
    if adapter is None:
        cfg = QPEFTConfig(method="zeroshot")
        reranker = Reranker(cfg, llm, Template(tokenizer, cfg.instruction))
    else:
        reranker = load_adapter(adapter, llm, tokenizer, any_base_model)
    return Ranker(llm, tokenizer, reranker)


def train_adapter(
    method="qpeft-a",
    data="msmarco_small",
    out=None,
    model="SmolLM2-135M-Instruct",
    device="auto",
    dtype=None,
    log=print,
    **settings,
):
    """A Ranker with a module trained on `data`'s train split and chosen on its dev split, saved
    as an adapter folder in `out` when given. `settings`: any QPEFTConfig or train.TrainConfig
    field (steps=50, lr=1e-3, top_k=10, ...); train_data=[names] adds train-only datasets."""
    llm, tokenizer = load_llm(model, dtype, setup_device(device))
    reranker = train.train_adapter(llm, tokenizer, method, data, out, log, **settings)
    return Ranker(llm, tokenizer, reranker)
