"""qpeft.py: the cached scorer against a naive full-sequence computation, top-k selection and the
loss by hand, attention masking, what trains, save/load, the command line end to end on a tiny
random Llama (with resume), and a smoke test with the real SmolLM2. About 15 s on 2 CPU cores."""

import ast
import json
import math
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import api
import cli
import data
import eval as ir
import qpeft
import runtime
import train
from conftest import FAMILIES, ROOT, SHARED, family_folder, smollm2_dir
from data import TrainExample
from qpeft import (
    QPEFTConfig,
    Reranker,
    Template,
    encode_prefixes,
    score_pairs,
    select_top_k,
)
from runtime import TokenIds, load_adapter, save_adapter
from train import TrainConfig, batch_loss

TOKENIZER_JSON = SHARED / "models" / "smollm2-135m-instruct" / "tokenizer.json"
INSTRUCTION = QPEFTConfig().instruction


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's matrices are far too small to split between threads: on a busy machine,
    handing a (42 x 32) @ (32 x 64) matmul to a second thread costs far more than the product."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- a tiny random Llama with the SmolLM2 tokenizer ---------------------------------------------
def write_tiny_llama(folder, seed=0):
    """config.json + model.safetensors (HF names, tied embeddings) + SmolLM2's tokenizer.json.
    dim 32, 2 layers, 4 heads / 2 KV heads (GQA), vocab 49,152 so that every token id has a row."""
    if not TOKENIZER_JSON.exists():
        pytest.skip(f"{TOKENIZER_JSON} missing (the shared folder is not beside the checkout)")
    folder.mkdir(parents=True)
    D, layers, heads, kv_heads, ffn, vocab = 32, 2, 4, 2, 64, 49152
    hd = D // heads
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": D,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "intermediate_size": ffn,
                "vocab_size": vocab,
                "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0,
                "tie_word_embeddings": True,
                "bos_token_id": 1,
                "eos_token_id": 2,
            }
        )
    )
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale):
        return torch.randn(*shape, generator=g) * scale

    tensors = {
        "model.embed_tokens.weight": randn(vocab, D, scale=0.5),
        "model.norm.weight": 1 + randn(D, scale=0.1),
    }
    for i in range(layers):
        shapes = {
            "self_attn.q_proj": (heads * hd, D),
            "self_attn.k_proj": (kv_heads * hd, D),
            "self_attn.v_proj": (kv_heads * hd, D),
            "self_attn.o_proj": (D, heads * hd),
            "mlp.gate_proj": (ffn, D),
            "mlp.up_proj": (ffn, D),
            "mlp.down_proj": (D, ffn),
        }
        for name, shape in shapes.items():
            tensors[f"model.layers.{i}.{name}.weight"] = randn(*shape, scale=shape[1] ** -0.5)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = 1 + randn(D, scale=0.1)
    save_file(tensors, folder / "model.safetensors")
    shutil.copy(TOKENIZER_JSON, folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def tiny_args(tiny_dir, data_dir, flags=""):
    """Command-line arguments for the tiny model on a tiny dataset, in float32, plus `flags`."""
    return ["--model", str(tiny_dir), "--data", str(data_dir), "--dtype", "float32", *flags.split()]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(llm, tokenizer, template) in float32; the LLM is frozen, so tests can share it."""
    llm, tokenizer = runtime.load_llm(tiny_dir, dtype=torch.float32)
    return llm, tokenizer, Template(tokenizer, INSTRUCTION)


def make_reranker(method, llm, template, seed=0, **cfg):
    """A module whose parameters are moved off their initial values (E' != E, soft prompt != P), so
    that a test cannot pass by confusing E' with E or the soft prompt with the instruction."""
    torch.manual_seed(seed)
    reranker = Reranker(QPEFTConfig(method=method, **cfg), llm, template)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in reranker.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return reranker.eval()  # eval: no attention dropout


# ---- the fast path equals the definition, qpeft.score: one plain pass per pair ----------
PASSAGES = [
    " Paris is the capital and largest city of France.",
    " Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in the leaves"
    " of green plants.",
    " Tea.",
]
QUERIES = ["capital of france", "how do green plants make sugar from light and water", "tea"]
# (query, passage) pairs: every passage with two queries of other lengths, so rows are reused
PAIRS = [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (2, 0)]


@pytest.mark.parametrize("method", ["zeroshot", "prompt", "qpeft-r", "qpeft-a"])
def test_cached_scorer_equals_naive_full_sequence(tiny, method):
    llm, tokenizer, template = tiny
    # top_k=4: " Tea." has 2 distinct tokens < k, so its H is shorter
    reranker = make_reranker(method, llm, template, top_k=4)
    passages = [tokenizer.encode(p) for p in PASSAGES]  # 10, 20 and 2 tokens: padded prefixes
    queries = [tokenizer.encode(q) for q in QUERIES]  # 4, 10 and 2 tokens: padded suffixes
    with torch.no_grad():
        prefix = encode_prefixes(llm, template, reranker, passages)
        fast = score_pairs(
            llm,
            template,
            reranker,
            prefix,
            [d for _, d in PAIRS],
            [queries[q] for q, _ in PAIRS],
            [passages[d] for _, d in PAIRS],
        )
        slow = torch.stack(
            [qpeft.score(llm, template, reranker, queries[q], passages[d]) for q, d in PAIRS]
        )
    assert fast.dtype == torch.float32 and fast.shape == (len(PAIRS),)
    assert (fast - slow).abs().max() <= 1e-4, (fast, slow)
    assert (fast < 0).all()  # mean log-probabilities


def test_soft_prompt_gradient_through_the_shared_head_equals_naive(tiny):
    """encode_prefixes runs the head (bos, P, "\\nPassage:") once for all passages; the soft
    prompt's gradient must still collect every pair's share, as in one full pass per pair."""
    llm, tokenizer, template = tiny
    reranker = make_reranker("prompt", llm, template)
    passages = [tokenizer.encode(p) for p in PASSAGES]
    queries = [tokenizer.encode(q) for q in QUERIES]
    fast = score_pairs(
        llm,
        template,
        reranker,
        encode_prefixes(llm, template, reranker, passages),
        [d for _, d in PAIRS],
        [queries[q] for q, _ in PAIRS],
        [passages[d] for _, d in PAIRS],
    )
    slow = torch.stack(
        [qpeft.score(llm, template, reranker, queries[q], passages[d]) for q, d in PAIRS]
    )
    weights = torch.linspace(1, 2, len(PAIRS))  # unequal: a pair dropped or counted twice shows
    (fast_grad,) = torch.autograd.grad((weights * fast).sum(), reranker.soft_prompt)
    (slow_grad,) = torch.autograd.grad((weights * slow).sum(), reranker.soft_prompt)
    assert slow_grad.abs().max() > 1e-3  # the soft prompt does matter to the scores
    error = (fast_grad - slow_grad).abs().max()
    assert error <= 1e-4 * slow_grad.abs().max(), error


def test_zeroshot_needs_no_module(tiny):
    """reranker=None is plain zero-shot query likelihood, the same as the zeroshot method."""
    llm, tokenizer, template = tiny
    passages = [tokenizer.encode(p) for p in PASSAGES]
    queries = [tokenizer.encode(q) for q in QUERIES]
    with torch.no_grad():
        args = ([0, 1, 2], queries, passages)
        plain = score_pairs(
            llm, template, None, encode_prefixes(llm, template, None, passages), *args
        )
        zs = Reranker(QPEFTConfig(method="zeroshot"), llm, template)
        assert torch.equal(
            plain,
            score_pairs(llm, template, zs, encode_prefixes(llm, template, zs, passages), *args),
        )


# ---- Q-PEFT-R's top-k selection on a table where the cosines are obvious --------------------
def top_k(reranker, llm, query, passage, k):
    """The plain selection of one pair (qpeft.top_k_tokens); the batched select_top_k must agree."""
    ids, counts = select_top_k(reranker, llm, [query], [passage], k)
    plain = qpeft.top_k_tokens(reranker, llm, query, passage, k)
    assert ids[0, : counts[0]].tolist() == plain
    return plain


def test_a_tokenizer_that_drops_a_template_piece_is_refused():
    """sentencepiece's default normaliser turns "\n" into nothing: the template would lose its
    line breaks without a word, so Template names the piece instead."""
    tokenizer = SimpleNamespace(
        encode=lambda text: [ord(c) for c in text if c != "\n"], bos_id=1, eos_id=2, add_bos=True
    )
    with pytest.raises(ValueError, match=r"template piece '\\n' to no tokens"):
        Template(tokenizer, INSTRUCTION)


def test_select_top_k_by_hand():
    # E' (query side) and E (passage side) are different tables on purpose: query id 0 is [1, 0, 0]
    # in E' but [0, 1, 0] in E; selecting with E(query) would put token 6 first.
    e_prime = torch.zeros(10, 3)
    e_prime[0] = torch.tensor([1.0, 0, 0])  # query token 0
    e_prime[1] = torch.tensor([0.0, 0, 1])  # query token 1
    E = torch.zeros(10, 3)
    E[0] = torch.tensor([0.0, 1, 0])
    E[1] = torch.tensor([0.0, 0, 1])
    E[2] = torch.tensor([2.0, 0, 0])  # cos with query token 0: 1.0 (norm does not matter)
    E[3] = torch.tensor([0.0, 0.6, 0.8])  # cos with query token 1: 0.8
    E[4] = E[5] = torch.tensor([0.6, 0.8, 0])  # 0.6 both: a tie between two ids
    E[6] = torch.tensor([0.0, 1, 0])  # 0.0
    E[7] = torch.tensor([-0.6, 0, -0.8])  # max(-0.6, -0.8) = -0.6
    llm = SimpleNamespace(tok_embeddings=nn.Embedding.from_pretrained(E))
    reranker = SimpleNamespace(embed_hint_ids=lambda llm, ids: e_prime[ids])
    query = [0, 1]
    passage = [6, 5, 2, 7, 4, 5, 3, 2]  # position: 0 1 2 3 4 5 6 7; ids 2 and 5 occur twice
    # best score per id: 2 -> 1.0, 3 -> 0.8, 5 -> 0.6 (first at position 1), 4 -> 0.6 (position 4),
    # 6 -> 0, 7 -> -0.6
    # tie 5/4: the earlier position first, not the smaller id
    assert top_k(reranker, llm, query, passage, k=3) == [2, 3, 5]
    assert top_k(reranker, llm, query, passage, k=4) == [2, 3, 5, 4]
    # k above the 6 distinct passage ids: all of them, once each, no padding or resampling
    assert top_k(reranker, llm, query, passage, k=10) == [2, 3, 5, 4, 6, 7]
    # only passage tokens are candidates: the query's own ids (cosine 1 with themselves) never show
    assert top_k(reranker, llm, query, [7, 6], k=5) == [6, 7]
    # the tie rule is about positions: with 4 before 5 in the passage, 4 comes first
    assert top_k(reranker, llm, query, [4, 5], k=2) == [4, 5]
    # a batch of pairs of different lengths at once: each row as alone, its count where it ends
    ids, counts = select_top_k(reranker, llm, [query, [1], query], [passage, [7, 6], [4, 5]], k=4)
    assert counts.tolist() == [4, 2, 2]
    assert [ids[i, :c].tolist() for i, c in enumerate(counts)] == [[2, 3, 5, 4], [6, 7], [4, 5]]


# ---- Q-PEFT-A: padding in a batch changes nothing ------------------------------------------
def test_attention_hint_block_ignores_padding(tiny):
    llm, tokenizer, template = tiny
    reranker = make_reranker("qpeft-a", llm, template)  # eval mode: dropout off
    short_q, short_p = tokenizer.encode("tea"), tokenizer.encode(" Tea is a drink.")
    long_q = tokenizer.encode("how do green plants make sugar from light and water")
    long_p = tokenizer.encode(PASSAGES[1])
    with torch.no_grad():
        alone = reranker.hint_block(llm, template, [short_q], [short_p])[0]
        batched = reranker.hint_block(
            llm, template, [long_q, short_q, short_q], [long_p, short_p, long_p]
        )
    # one vector per query token, between E'("hints: ") and E'("\n")
    assert alone.shape == (len(template.hints_open) + len(short_q) + len(template.hints_close), 32)
    # padded keys (passage) and padded queries are masked out
    assert (batched[1] - alone).abs().max() <= 1e-5
    # ... and the block does depend on the passage (the attention is not a no-op)
    assert (batched[2] - alone).abs().max() > 1e-3


# ---- the loss on known numbers ---------------------------------------------------------------
def scores_from_table(monkeypatch, tokens, table):
    """Make batch_loss score pairs from `table` {(qid, docid): mean log-prob} instead of the LLM.
    Returns two lists that fill as it runs: the score tensors (their .grad after backward: dL/ds)
    and, per call, the (qid, docid) pairs scored. Token "ids" are just labels of the texts."""
    name = {tuple(v): k for k, v in {**tokens.queries, **tokens.passages}.items()}
    scored, pairs = [], []

    def fake_score_pairs(llm, template, reranker, prefix, rows, queries, passages):
        pairs.append([(name[tuple(q)], name[tuple(p)]) for q, p in zip(queries, passages)])
        scored.append(torch.tensor([table[k] for k in pairs[-1]], requires_grad=True))
        return scored[-1] * 1  # not a leaf, like a real score: its grad lands in scored[-1].grad

    monkeypatch.setattr(train, "score_pairs", fake_score_pairs)
    monkeypatch.setattr(train, "encode_prefixes", lambda *args: None)
    return scored, pairs


def test_batch_loss_by_hand(monkeypatch):
    # Two queries: q1 (positive A, hard negative a), q2 (positive B, hard negative b). Token "ids"
    # are just labels; score_pairs is replaced by a table of mean log-probs s, NLL = -s.
    tokens = TokenIds(
        queries={"q1": [1], "q2": [2]}, passages={"A": [10], "a": [11], "B": [20], "b": [21]}
    )
    s = {
        ("q1", "A"): -1.0,
        ("q1", "B"): -1.6,
        ("q1", "a"): -0.8,
        ("q1", "b"): -2.5,
        ("q2", "B"): -2.0,
        ("q2", "A"): -3.5,
        ("q2", "b"): -2.2,
        ("q2", "a"): -1.7,
    }
    scored, pairs = scores_from_table(monkeypatch, tokens, s)
    reranker = SimpleNamespace(soft_prompt=None)  # a module without a soft prompt
    batch = [TrainExample("q1", "A", "a"), TrainExample("q2", "B", "b")]
    loss, terms = batch_loss(None, None, reranker, batch, tokens, TrainConfig(margin=0.5))
    # negatives: the other query's positive and both hard negatives (in-batch + hard), nothing else
    assert len(pairs) == 1 and sorted(pairs[0]) == sorted(s)
    # NLL(pos): q1 1.0, q2 2.0 -> mean 1.5
    # hinges relu(NLL+ - NLL- + 0.5): q1/B relu(1.0-1.6+.5)=0, q1/a relu(1.0-0.8+.5)=0.7, q1/b 0,
    #   q2/A relu(2.0-3.5+.5)=0, q2/a relu(2.0-1.7+.5)=0.8, q2/b relu(2.0-2.2+.5)=0.3 -> 1.8/6 = 0.3
    assert loss.item() == pytest.approx(1.8, abs=1e-6)
    assert terms["pointwise"].item() == pytest.approx(1.5)
    assert terms["hinge"].item() == pytest.approx(0.3)
    assert terms["active"].item() == pytest.approx(3 / 6)
    # own hard negatives: q1 puts a (NLL 0.8) above A (1.0), wrong; q2 B (2.0) above b (2.2), right
    assert terms["accuracy"].item() == pytest.approx(0.5)
    # diagnostics: NLL of hard negatives (0.8 + 2.2) / 2, of in-batch ones (1.6+2.5+3.5+1.7) / 4;
    # gaps NLL(d-) - NLL(d+): hard (-0.2 + 0.2) / 2, in-batch (0.6 + 1.5 + 1.5 - 0.3) / 4
    assert terms["nll_hard"].item() == pytest.approx(1.5)
    assert terms["nll_in_batch"].item() == pytest.approx(2.325)
    assert terms["gap_hard"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["gap_in_batch"].item() == pytest.approx(0.825)
    # dL/ds: a positive gets -1/2 (mean NLL over 2 queries) - 1/6 per active hinge (mean over 6
    # negatives); a negative +1/6 when its hinge is active, else 0
    loss.backward()
    grad = dict(zip(pairs[0], scored[0].grad.tolist()))
    expected = {
        ("q1", "A"): -0.5 - 1 / 6,
        ("q1", "a"): 1 / 6,
        ("q1", "B"): 0.0,
        ("q1", "b"): 0.0,
        ("q2", "B"): -0.5 - 2 / 6,
        ("q2", "b"): 1 / 6,
        ("q2", "A"): 0.0,
        ("q2", "a"): 1 / 6,
    }
    assert grad == pytest.approx(expected, abs=1e-6)
    # pointwise weight 0 (the official code's hinge-only variant): the loss is the hinge term
    # alone, and an inactive hinge gives its pair no gradient at all
    hinge_only = TrainConfig(margin=0.5, pointwise_weight=0.0)
    loss, _ = batch_loss(None, None, reranker, batch, tokens, hinge_only)
    assert loss.item() == pytest.approx(0.3, abs=1e-6)
    loss.backward()
    grad = dict(zip(pairs[1], scored[1].grad.tolist()))
    assert grad[("q1", "A")] == pytest.approx(-1 / 6) and grad[("q2", "B")] == pytest.approx(-2 / 6)
    assert grad[("q1", "B")] == 0.0 and grad[("q2", "A")] == 0.0


@pytest.mark.parametrize("loss", ["paper", "listwise"])
@pytest.mark.parametrize("processes", [2, 3])
def test_process_shares_add_up_to_the_whole_batch(monkeypatch, loss, processes):
    """Under torchrun each process scores its queries' pairs; its terms, weighed by its pairs over
    the batch's, must add up to the one-process terms, also for uneven shares (q1 and q3 share the
    hard negative a, so they have fewer distinct negatives; 3 queries over 2 processes)."""
    docids = ["A", "B", "C", "a", "b", "c"]
    tokens = TokenIds(
        queries={"q1": [1], "q2": [2, 3], "q3": [4]},
        passages={d: [10 + i] for i, d in enumerate(docids)},
    )
    rng = random.Random(0)
    s = {(q, d): -rng.uniform(0.5, 3.0) for q in tokens.queries for d in docids}
    scores_from_table(monkeypatch, tokens, s)
    reranker = SimpleNamespace(soft_prompt=None)
    batch = [
        TrainExample("q1", "A", "a", list_negatives=("a", "c")),
        TrainExample("q2", "B", "b", list_negatives=("b",)),
        TrainExample("q3", "C", "a", list_negatives=("a", "b")),
    ]
    tc = TrainConfig(loss=loss, margin=0.5, list_negatives=2)
    whole_loss, whole = batch_loss(None, None, reranker, batch, tokens, tc)
    shares = [
        batch_loss(None, None, reranker, batch, tokens, tc, (r, processes))
        for r in range(processes)
    ]
    assert sum(loss for loss, _ in shares).item() == pytest.approx(whole_loss.item(), abs=1e-6)
    for term, value in whole.items():
        assert sum(t[term] for _, t in shares).item() == pytest.approx(value.item(), abs=1e-6), term


def lists_by_hand(monkeypatch):
    """Two queries, each with its positive and two own first-stage negatives, and known mean
    log-probs per token: (tokens, scores table, batch, scored tensors, pairs)."""
    tokens = TokenIds(
        queries={"q1": [1, 5], "q2": [2]},  # 3 and 2 targets (the query's tokens + eos)
        passages={d: [10 + i] for i, d in enumerate(["A", "a1", "a2", "B", "b1", "b2"])},
    )
    s = {  # mean log-probs per token
        ("q1", "A"): -1.0,
        ("q1", "a1"): -0.8,
        ("q1", "a2"): -2.0,
        ("q2", "B"): -2.0,
        ("q2", "b1"): -2.5,
        ("q2", "b2"): -1.5,
    }
    scored, pairs = scores_from_table(monkeypatch, tokens, s)
    batch = [
        TrainExample("q1", "A", "a1", list_negatives=("a1", "a2")),
        TrainExample("q2", "B", "b1", list_negatives=("b1", "b2")),
    ]
    return tokens, s, batch, scored, pairs


def test_listwise_loss_by_hand(monkeypatch):
    """The listwise loss on known numbers: each query meets only its positive and its own
    first-stage negatives (no in-batch ones), softmax over the *summed* log-likelihoods."""
    tokens, s, batch, scored, pairs = lists_by_hand(monkeypatch)
    reranker = SimpleNamespace(soft_prompt=None)  # a module without a soft prompt
    tc = TrainConfig(loss="listwise", list_negatives=2)
    loss, terms = batch_loss(None, None, reranker, batch, tokens, tc)
    assert sorted(pairs[0]) == sorted(s)  # no in-batch pair: B is no negative of q1
    # summed log-likelihoods S = mean x targets: q1 A -3, a1 -2.4, a2 -6; q2 B -4, b1 -5, b2 -3
    ce1 = math.log(math.exp(-3) + math.exp(-2.4) + math.exp(-6)) + 3  # 1.0550
    ce2 = math.log(math.exp(-4) + math.exp(-5) + math.exp(-3)) + 4  # 1.4076
    assert terms["listwise"].item() == pytest.approx((ce1 + ce2) / 2, abs=1e-6)
    assert terms["pointwise"].item() == pytest.approx(1.5)  # mean NLL of A (1.0) and B (2.0)
    assert loss.item() == pytest.approx(1.5 + (ce1 + ce2) / 2, abs=1e-6)
    # a1 above A (wrong), a2 below (right); b1 below B (right), b2 above (wrong)
    assert terms["accuracy"].item() == pytest.approx(0.5)
    assert terms["gap_hard"].item() == pytest.approx((-0.2 + 1.0 + 0.5 - 0.5) / 4)
    # dL/ds_j = (targets / 2 queries) (softmax_j - [j is the positive]), and -1/2 more for a
    # positive from the pointwise term
    loss.backward()
    grad = dict(zip(pairs[0], scored[0].grad.tolist()))
    for q, targets, summed in (
        ("q1", 3, {"A": -3, "a1": -2.4, "a2": -6}),
        ("q2", 2, {"B": -4, "b1": -5, "b2": -3}),
    ):
        total = sum(math.exp(v) for v in summed.values())
        for d, v in summed.items():
            positive = d in ("A", "B")
            expected = targets / 2 * (math.exp(v) / total - positive) - 0.5 * positive
            assert grad[(q, d)] == pytest.approx(expected, abs=1e-6), (q, d)


def test_listwise_temperature_by_hand(monkeypatch):
    """--list-temperature T divides the summed log-likelihoods before the softmax: at T = 2 the
    lists of lists_by_hand become q1 A -1.5, a1 -1.2, a2 -3 and q2 B -2, b1 -2.5,
    b2 -1.5: each list costs less, and one ranked wrongly by a gap g costs ~ g / T."""
    tokens, _, batch, _, _ = lists_by_hand(monkeypatch)
    reranker = SimpleNamespace(soft_prompt=None)
    tc = TrainConfig(loss="listwise", list_negatives=2, pointwise_weight=0.0, list_temperature=2)
    loss, terms = batch_loss(None, None, reranker, batch, tokens, tc)
    ce1 = math.log(math.exp(-1.5) + math.exp(-1.2) + math.exp(-3)) + 1.5  # 0.9451 (1.0550 at T = 1)
    ce2 = math.log(math.exp(-2) + math.exp(-2.5) + math.exp(-1.5)) + 2  # 1.1803 (1.4076 at T = 1)
    assert loss.item() == pytest.approx((ce1 + ce2) / 2, abs=1e-6)
    assert terms["accuracy"].item() == pytest.approx(0.5)  # T changes the loss, not the order


def test_list_pairs_draw_m_negatives_per_epoch():
    """m of a query's pool, the same for the same seed and epoch, drawn anew each epoch; a query
    whose pool is empty (a first stage too short) falls back on its hard negative."""
    pool = tuple(f"n{i}" for i in range(10))
    batch = [TrainExample("q1", "p1", "n0", list_negatives=pool), TrainExample("q2", "p2", "x")]
    pairs = qpeft.list_pairs(batch, 3, seed=0, epoch=0)
    assert pairs[0] == (0, "p1", "positive") and pairs[-2:] == [
        (1, "p2", "positive"),
        (1, "x", "hard"),
    ]
    drawn = [d for i, d, kind in pairs if i == 0 and kind == "hard"]
    assert len(set(drawn)) == 3 and set(drawn) <= set(pool)
    assert qpeft.list_pairs(batch, 3, seed=0, epoch=0) == pairs
    epochs = {tuple(qpeft.list_pairs(batch, 3, seed=0, epoch=e)[1:4]) for e in range(5)}
    assert len(epochs) > 1
    assert len(qpeft.list_pairs(batch, 50, seed=0, epoch=0)) == 1 + 10 + 2  # at most the pool


def test_pairwise_accuracy_by_hand():
    scores = {
        "q1": {"a": 3.0, "b": 1.0, "c": 2.0, "d": 2.5},  # d unjudged: not a negative
        "q2": {"a": 1.0, "b": 1.0, "c": 0.5},
        "q3": {"a": 1.0, "x": 0.0},  # no judged negative: left out
    }
    qrels = {"q1": {"a": 1, "b": 0, "c": 0}, "q2": {"a": 1, "b": 0, "c": 1}, "q3": {"a": 1}}
    # q1: a above b and c, 2 of 2; q2: a ties b (half), c below b: 0.5 of 2 pairs
    assert train.pairwise_accuracy(scores, qrels, 1) == pytest.approx((1.0 + 0.25) / 2)
    assert train.pairwise_accuracy({"q3": scores["q3"]}, qrels, 1) is None
    # at relevance level 2 (TREC DL) grade 1 is a negative: q2 has no positive left
    graded = {"q1": {"a": 2, "b": 1, "c": 0}, "q2": {"a": 1, "b": 0}}
    assert train.pairwise_accuracy(scores, graded, 2) == 1.0
    # a negative grade means unjudged (eval.py): with b at -1, q2 has no judged negative left
    assert train.pairwise_accuracy(scores, {"q2": {"a": 1, "b": -1, "c": 1}}, 1) is None


def test_batch_pairs_counts_each_negative_once():
    # q1's hard negative is q2's positive B, and q3 shares q1's positive A: B must be one negative
    # of q1, not two, and A is a positive of q3 (never its own negative) and not a negative of q1
    # either. Every query also meets the other queries' hard negatives (b, c) as in-batch negatives.
    batch = [
        TrainExample("q1", "A", "B"),
        TrainExample("q2", "B", "b"),
        TrainExample("q3", "A", "c"),
    ]
    assert qpeft.batch_pairs(batch) == [
        (0, "A", "positive"),
        (0, "B", "hard"),
        (0, "b", "in-batch"),
        (0, "c", "in-batch"),
        (1, "B", "positive"),
        (1, "A", "in-batch"),
        (1, "b", "hard"),
        (1, "c", "in-batch"),
        (2, "A", "positive"),
        (2, "B", "in-batch"),
        (2, "b", "in-batch"),
        (2, "c", "hard"),
    ]


def test_batch_loss_uses_the_right_prefix_rows(tiny):
    """The real batch_loss on the tiny model equals the formula on naively computed scores: the
    passages' cached rows are matched to the right pairs."""
    llm, tokenizer, template = tiny
    reranker = make_reranker("qpeft-a", llm, template)
    texts = {
        "q1": "capital of france",
        "q2": "tea",
        "A": PASSAGES[0],
        "a": PASSAGES[1],
        "B": PASSAGES[2],
        "b": " Coffee is made from roasted beans.",
    }
    tokens = TokenIds(
        queries={k: tokenizer.encode(v) for k, v in texts.items() if k.startswith("q")},
        passages={k: tokenizer.encode(v) for k, v in texts.items() if not k.startswith("q")},
    )
    with torch.no_grad():
        loss, _ = batch_loss(
            llm,
            template,
            reranker,
            [TrainExample("q1", "A", "a"), TrainExample("q2", "B", "b")],
            tokens,
            TrainConfig(margin=0.3),
        )
        nll = {
            (q, d): -qpeft.score(
                llm, template, reranker, tokens.queries[q], tokens.passages[d]
            ).item()
            for q in ("q1", "q2")
            for d in ("A", "a", "B", "b")
        }
    hinges = [max(0.0, nll["q1", "A"] - nll["q1", d] + 0.3) for d in ("B", "a", "b")] + [
        max(0.0, nll["q2", "B"] - nll["q2", d] + 0.3) for d in ("A", "a", "b")
    ]
    expected = (nll["q1", "A"] + nll["q2", "B"]) / 2 + sum(hinges) / 6
    assert loss.item() == pytest.approx(expected, abs=1e-4)


# ---- what trains ---------------------------------------------------------------------------
def test_trainable_parameter_counts_by_hand(tiny):
    llm, _, template = tiny
    D, V, P = 32, 49152, len(template.prompt)
    mlp = 2 * (D * D + D)
    attention = 4 * D * D + 4 * D  # in-proj (3D x D + 3D) + out-proj (D x D + D)
    count = {
        m: Reranker(QPEFTConfig(method=m), llm, template).trainable_parameters()
        for m in qpeft.METHODS
    }
    assert count == {
        "zeroshot": 0,
        "prompt": P * D,
        "qpeft-r": V * D + mlp,
        "qpeft-a": V * D + mlp + attention,
    }
    light = Reranker(QPEFTConfig(method="qpeft-a", train_embeddings=False), llm, template)
    assert light.trainable_parameters() == mlp + attention  # E' = frozen E: the light module


def small_training_set(tokenizer):
    texts = {
        "t1": "capital of france",
        "t2": "how do plants make sugar",
        "t3": "tea",
        "t4": "how is coffee made",
        "p1": PASSAGES[0],
        "p2": PASSAGES[1],
        "p3": PASSAGES[2],
        "p4": " Coffee is made from roasted beans.",
        "n1": " Berlin is the capital of Germany.",
        "n2": " Mars is red.",
    }
    tokens = TokenIds(
        queries={k: tokenizer.encode(v) for k, v in texts.items() if k.startswith("t")},
        passages={k: tokenizer.encode(v) for k, v in texts.items() if not k.startswith("t")},
    )
    examples = [
        TrainExample("t1", "p1", "n1"),
        TrainExample("t2", "p2", "n2"),
        TrainExample("t3", "p3", "n1"),
        TrainExample("t4", "p4", "n2"),
    ]
    return examples, examples[:2], tokens


def dev_record(value):
    """What dev_check returns, with `value` as the selection measure (the loss terms do not
    matter here)."""
    return {
        "dev_loss": 1.0,
        "pointwise": 1.0,
        "hinge": 0.0,
        "active": 0.0,
        "accuracy": 0.5,
        "gap_hard": 0.1,
        "gap_in_batch": 0.2,
        "pairwise": None,
        train.SELECT_ON: value,
        "success_5": value,
    }


def tiny_dev_set(dev_examples):
    return train.DevSet(
        "dev",
        [dev_examples],
        {"t1": ["p1", "n1"]},
        {"t1": {"p1": 2.0, "n1": 1.0}},
        {"t1": {"p1": 1}},
        1,
    )


def expected_gradient_rows(method, reranker, llm, template, batch, tokens):
    """The E' rows one training batch reaches: the hint wrapper's ids and, for qpeft-a, the query
    tokens (attention queries); for qpeft-r, the top-k passage tokens selected for each pair (not
    the query's, which only rank candidates, without a gradient)."""
    rows = set(template.hints_open + template.hints_close)
    for i, docid, _ in qpeft.batch_pairs(batch):
        query = tokens.queries[batch[i].qid]
        rows |= (
            set(query)
            if method == "qpeft-a"
            else set(top_k(reranker, llm, query, tokens.passages[docid], reranker.cfg.top_k))
        )
    return rows


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("method", ["prompt", "qpeft-r", "qpeft-a"])
def test_one_training_step_moves_exactly_what_has_a_gradient(
    tiny, tmp_path, monkeypatch, method, weight_decay
):
    """After one step: the frozen LLM is bit-identical; the MLP, the attention and the soft prompt
    moved; in E' exactly the rows of the batch's hint (and, for qpeft-a, query) tokens moved. With
    weight decay 0 a tensor moves only through its gradient; with decay, E' must still keep its
    other rows (no decay on E')."""
    llm, tokenizer, template = tiny
    train_examples, dev_examples, tokens = small_training_set(tokenizer)
    llm_before = {k: v.clone() for k, v in llm.state_dict().items()}
    reranker = Reranker(QPEFTConfig(method=method, top_k=4), llm, template)
    module_before = {k: v.detach().clone() for k, v in qpeft.trainable_state(reranker).items()}
    # margin 100: every hinge is active, so every pair's hint tokens get a gradient (with margin 0,
    # a negative scored far below its positive passes none back)
    tc = TrainConfig(
        steps=1, queries_per_batch=2, eval_every=1, weight_decay=weight_decay, margin=100.0
    )
    batch = data.train_batches(train_examples, tc.queries_per_batch, seed=tc.seed, epoch=0)[0]
    if method != "prompt":
        rows = expected_gradient_rows(method, reranker, llm, template, batch, tokens)
    checks = iter([0.1, 0.2])  # the step beats the untrained module on dev, so it is kept
    monkeypatch.setattr(train, "dev_check", lambda *args: dev_record(next(checks)))
    setting = train.Setting(llm, tokenizer, tiny_dev_set(dev_examples), tokens, tmp_path, print)
    reranker, state = train.train(setting, reranker, train_examples, tc)
    assert state["step"] == 1 and state["best_step"] == 1
    for name, tensor in llm.state_dict().items():
        assert torch.equal(tensor, llm_before[name]), name
    assert all(not p.requires_grad and p.grad is None for p in llm.parameters())
    after = qpeft.trainable_state(reranker)
    assert after.keys() == module_before.keys() and after
    for name, tensor in after.items():
        assert tensor.dtype == torch.float32
        if name == "hint_embeddings.weight":
            moved = (tensor != module_before[name]).any(dim=1).nonzero()[:, 0].tolist()
            assert set(moved) == rows, (
                f"{method}: E' rows moved {sorted(moved)}, expected {sorted(rows)}"
            )
        elif name == "soft_prompt":  # every one of its vectors
            assert (tensor != module_before[name]).any(dim=1).all()
        else:  # the MLP and the attention (not every entry: the key bias cannot change a softmax)
            assert (tensor != module_before[name]).any(), f"{method}: {name}"


def test_training_keeps_the_module_of_the_best_dev_check(tiny, tmp_path, monkeypatch):
    """Selection by hand: dev values 0.5 (untrained), 0.9, 0.2, 0.3 at steps 0-3 keep the
    weights of step 1."""
    llm, tokenizer, template = tiny
    train_examples, dev_examples, tokens = small_training_set(tokenizer)
    reranker = Reranker(QPEFTConfig(method="qpeft-a"), llm, template)
    values, seen = iter([0.5, 0.9, 0.2, 0.3]), []

    def fake_dev_check(llm, template, module, *args):
        seen.append({k: v.detach().clone() for k, v in qpeft.trainable_state(module).items()})
        return dev_record(next(values))

    monkeypatch.setattr(train, "dev_check", fake_dev_check)
    tc = TrainConfig(steps=3, queries_per_batch=2, eval_every=1, patience=5)
    messages = []
    setting = train.Setting(
        llm, tokenizer, tiny_dev_set(dev_examples), tokens, tmp_path, messages.append
    )
    reranker, state = train.train(setting, reranker, train_examples, tc)
    assert state["best_step"] == 1 and state["step"] == 3 and len(seen) == 4
    kept = qpeft.trainable_state(reranker)
    for name, tensor in kept.items():
        assert torch.equal(tensor, seen[1][name]) and not torch.equal(tensor, seen[3][name]), name
    assert [h[train.SELECT_ON] for h in state["history"]] == [0.5, 0.9, 0.2, 0.3]
    assert "keeping the module of step 1" in messages[-1]
    # when no step beats the untrained module, the log says so plainly
    values = iter([0.5, 0.4])
    reranker = Reranker(QPEFTConfig(method="qpeft-a"), llm, template)
    tc = TrainConfig(steps=1, queries_per_batch=2, eval_every=1)
    _, state = train.train(setting, reranker, train_examples, tc)
    assert state["best_step"] == 0 and "no training step beat the untrained module" in messages[-1]


def test_dev_check_runs_without_dropout(tiny):
    """A module in training mode with heavy attention dropout: two dev checks agree exactly, because
    dev_check switches dropout off (and leaves the module in eval mode)."""
    llm, tokenizer, template = tiny
    _, dev_examples, tokens = small_training_set(tokenizer)
    reranker = make_reranker("qpeft-a", llm, template, dropout=0.5)
    dev = tiny_dev_set(dev_examples)
    reranker.train()
    first = train.dev_check(llm, template, reranker, dev, TrainConfig(), tokens)
    reranker.train()
    again = train.dev_check(llm, template, reranker, dev, TrainConfig(), tokens)
    assert again == first
    assert not reranker.training


@pytest.mark.parametrize("method", ["qpeft-r", "qpeft-a"])
def test_hint_block_is_mlp_of_linear_relu_linear(tiny, method):
    """H = W2 relu(W1 x + b1) + b2 on every hint vector x, checked on the wrapper E'("hints: ")."""
    llm, tokenizer, template = tiny
    reranker = make_reranker(method, llm, template, top_k=3)
    query, passage = tokenizer.encode(QUERIES[0]), tokenizer.encode(PASSAGES[0])
    with torch.no_grad():
        h = reranker.hint_block(llm, template, [query], [passage])[0]
        x = reranker.embed_hint_ids(llm, torch.tensor(template.hints_open))
        first, last = reranker.mlp[0], reranker.mlp[-1]
        pre = x @ first.weight.T + first.bias
        assert (pre < 0).any()  # the ReLU has something to cut
        expected = pre.clamp(min=0) @ last.weight.T + last.bias
    assert torch.allclose(h[: len(template.hints_open)], expected, atol=1e-5)


# ---- adapter folders: identical scores, and refused on another base model -------------------
@pytest.mark.parametrize("method", ["prompt", "qpeft-r", "qpeft-a"])
def test_save_and_load_adapter_scores_identically(tiny_dir, tiny, tmp_path, method):
    llm, tokenizer, template = tiny
    reranker = make_reranker(method, llm, template, top_k=5, seed=3)
    folder = tmp_path / method
    save_adapter(reranker, folder, llm, {"note": "test"})
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["qpeft"]["method"] == method and config["note"] == "test"
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert config["base_model_sha256"] == runtime.model_fingerprint(tiny_dir) == llm.sha256
    saved = load_file(folder / "adapter_model.safetensors")
    assert set(saved) == set(qpeft.trainable_state(reranker))
    loaded = load_adapter(folder, llm, tokenizer)
    assert loaded.cfg == reranker.cfg and not loaded.training
    passages = [tokenizer.encode(p) for p in PASSAGES]
    queries = [tokenizer.encode(q) for q in QUERIES]
    with torch.no_grad():
        a, b = [
            score_pairs(
                llm,
                template,
                r,
                encode_prefixes(llm, template, r, passages),
                [0, 1, 2, 0],
                queries + [queries[1]],
                passages + [passages[0]],
            )
            for r in (reranker, loaded)
        ]
    assert torch.equal(a, b)


def test_load_adapter_bad_folders(tiny, tmp_path):
    llm, tokenizer, template = tiny
    folder = tmp_path / "qpeft-a"
    save_adapter(make_reranker("qpeft-a", llm, template), folder, llm, {})
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    # trained on another model of the same width: refused with both names, unless asked
    config_file.write_text(
        json.dumps(
            {**config, "base_model_name_or_path": "other-llama", "base_model_sha256": "ab" * 32}
        )
    )
    with pytest.raises(
        ValueError,
        match=r"trained on other-llama \(sha256 abababababab\), not on "
        r"tiny-llama .*--any-base-model",
    ):
        load_adapter(folder, llm, tokenizer)
    loaded = load_adapter(folder, llm, tokenizer, any_base_model=True)
    assert loaded.cfg.method == "qpeft-a"
    # weights of one method under another method's config: named, not silently half-loaded
    config["qpeft"]["method"] = "qpeft-r"
    config_file.write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"adapter_model.safetensors: tensor 'attention\..*' is missing, unexpected",
    ):
        load_adapter(folder, llm, tokenizer)
    config_file.unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json: missing"):
        load_adapter(folder, llm, tokenizer)
    # a file where the folder belongs: a clear error, not a crash
    (tmp_path / "old.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="an adapter is a folder"):
        load_adapter(tmp_path / "old.safetensors", llm, tokenizer)


# ---- the Python API ------------------------------------------------------------------------
def test_python_api_scores_like_the_fast_path(tiny_dir, tiny, tmp_path):
    """load_ranker: score / rank / rerank on the tiny model give the fast path's scores, zero-shot
    and with a saved adapter."""
    llm, tokenizer, template = tiny
    module = make_reranker("qpeft-a", llm, template)
    save_adapter(module, tmp_path / "qpeft-a", llm, {})
    passages = [p.strip() for p in PASSAGES]
    for adapter, reranker in ((None, None), (tmp_path / "qpeft-a", module)):
        ranker = api.load_ranker(tiny_dir, adapter=adapter, device="cpu", dtype=torch.float32)
        scores = ranker.score(QUERIES[0], passages)
        p_ids, q_ids = [tokenizer.encode(" " + p) for p in passages], tokenizer.encode(QUERIES[0])
        with torch.no_grad():
            prefix = encode_prefixes(llm, template, reranker, p_ids)
            expected = score_pairs(
                llm, template, reranker, prefix, [0, 1, 2], [q_ids] * 3, p_ids
            ).tolist()
        assert scores == pytest.approx(expected, abs=1e-5)
        ranked = ranker.rank(QUERIES[0], passages, ids=["a", "b", "c"], top_k=2)
        assert [s for _, s in ranked] == sorted(scores, reverse=True)[:2]
        assert ranked[0][0] == "abc"[scores.index(max(scores))]
        both = ranker.rerank(
            {"q1": QUERIES[0], "q2": QUERIES[1]},
            {"q1": ["a", "b"], "q2": ["b"]},
            {"a": passages[0], "b": passages[1]},
        )
        assert both["q1"] == pytest.approx({"a": scores[0], "b": scores[1]}, abs=1e-5)
        assert list(both["q2"]) == ["b"]


# ---- the command line end to end on a tiny BEIR folder -------------------------------------
CORPUS = {
    "p1": "Paris is the capital and largest city of France.",
    "p2": "Photosynthesis lets plants make energy from light.",
    "p3": "The Eiffel Tower is a landmark in Paris, France.",
    "p4": "Berlin is the capital of Germany.",
    "p5": "Plants need water, light and carbon dioxide.",
    "p6": "Beijing, the capital of China, is near the Great Wall.",
    "p7": "Coffee is made from roasted coffee beans and hot water.",
    "p8": "Tea is made from the leaves of tea plants.",
    "p9": "Mars is the fourth planet from the sun.",
    "p10": "Water boils at 100 degrees Celsius at sea level, in France too.",
}
QUERY_TEXT = {
    "t1": "capital of france",
    "t2": "how do plants make energy",
    "t3": "how is coffee made",
    "t4": "which planet is fourth from the sun",
    "v1": "capital of germany",
    "v2": "what is tea made from",
    "s1": "what is the capital of france",
    "s2": "do plants need water",
}
QRELS = {
    "train": [("t1", "p1", 1), ("t2", "p2", 1), ("t3", "p7", 1), ("t4", "p9", 1)],
    "dev": [("v1", "p4", 1), ("v2", "p8", 1)],
    "test": [("s1", "p1", 2), ("s1", "p3", 1), ("s2", "p5", 1)],
}
# first stage for train and dev; test has no run, so BM25 over the corpus is computed
RUNS = {
    "train": {
        "t1": ["p3", "p1", "p4"],
        "t2": ["p5", "p2", "p8"],
        "t3": ["p8", "p7"],
        "t4": ["p9", "p7", "p8"],
    },
    "dev": {"v1": ["p1", "p4"], "v2": ["p7", "p8", "p9"]},
}


def write_beir(root, splits):
    """A BEIR folder with the qrels (and runs, where there are) of `splits`."""
    root.mkdir()
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n" for d, t in CORPUS.items())
    )
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in QUERY_TEXT.items())
    )
    (root / "qrels").mkdir()
    (root / "runs").mkdir()
    for split in splits:
        (root / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in QRELS[split])
        )
        if split in RUNS:
            (root / "runs" / f"{split}.bm25.trec").write_text(
                "".join(
                    f"{q} Q0 {d} {r} {10.0 - r} bm25\n"
                    for q, docs in RUNS[split].items()
                    for r, d in enumerate(docs, 1)
                )
            )
    return root


def test_main_end_to_end_then_rerank_with_the_adapter(tiny_dir, tmp_path):
    data_dir, out = write_beir(tmp_path / "beir", ["train", "dev", "test"]), tmp_path / "out"
    common = ["--model", str(tiny_dir), "--dtype", "float32", "--depth", "3"]
    cli.main(
        [
            "--data",
            str(data_dir),
            *common,
            "--methods",
            "zeroshot,qpeft-r,qpeft-a",
            "--steps",
            "2",
            "--eval-every",
            "1",
            "--queries-per-batch",
            "2",
            "--out",
            str(out),
            "--dev-queries",
            "2",
        ]
    )
    methods = ["zeroshot", "qpeft-r", "qpeft-a"]
    for method in methods:
        assert (out / f"{method}.test.trec").exists()
        assert (out / f"{method}.test.per-query.tsv").exists()
    for method in ("qpeft-r", "qpeft-a"):  # adapter folders, and no resume file left behind
        assert (out / method / "adapter_model.safetensors").exists()
        assert not (out / f"{method}.resume.json").exists()
        saved = json.loads((out / method / "adapter_config.json").read_text())
        assert saved["qpeft"]["method"] == method and saved["train"]["steps"] == 2
        assert saved["base_model_name_or_path"] == "tiny-llama" and saved["data"] == "beir"
        assert [h["step"] for h in saved["training"]["history"] if "train_loss" in h] == [1, 2]
    assert not (out / "zeroshot").exists()
    log = (out / "log.txt").read_text()
    assert "qpeft-a: step 2 (epoch 1) train loss" in log and "nDCG@10" in log
    # metrics.json: {method: {split: {measure: value}}}, plus {method: {"training": {...}}} for the
    # trained methods
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"bm25", *methods}
    for name in metrics:
        test = metrics[name]["test"]
        assert test["queries"] == 2
        for measure in ("ndcg_cut_10", "mrr_10", "recall_10", "recall_20", "success_5"):
            assert 0.0 <= test[measure] <= 1.0
    assert metrics["qpeft-a"]["training"]["steps"] == 2 and metrics["qpeft-a"]["test"]["depth"] == 3
    # provenance: flags, versions, commit, and fingerprints of the model and every data file read
    record = metrics["qpeft-a"]["test"]["provenance"]
    assert (
        record["flags"]["steps"] == 2
        and record["torch"] == torch.__version__
        and record["qpeft_commit"]
    )
    assert len(record["model"]["sha256"]) == 64 and "provenance: qpeft" in log
    assert record["truncation"]["passages"]["of"] > 0 and record["truncation"]["queries"]["of"] > 0
    assert sorted(Path(f).name for f in record["data"]) == [
        "corpus.jsonl",
        "dev.bm25.trec",
        "dev.tsv",
        "queries.jsonl",
        "test.tsv",
        "train.bm25.trec",
        "train.tsv",
    ]
    # runs: every first-stage passage, distinct scores; the 3 reranked candidates above BM25's tail
    bm25 = ir.read_run(out / "bm25.test.trec")
    # no test run given, so BM25 over the corpus: 5 matches per query, the top 3 reranked
    assert {q: len(docs) for q, docs in bm25.items()} == {"s1": 5, "s2": 5}
    top3 = {q: set(ir.trec_ranking(docs)[:3]) for q, docs in bm25.items()}
    for method in methods:
        run = ir.read_run(out / f"{method}.test.trec")
        for q, docs in run.items():
            assert docs.keys() == bm25[q].keys()
            assert len(set(docs.values())) == len(docs), f"{method}/{q}: tied scores"
            assert set(ir.trec_ranking(docs)[:3]) == top3[q]
            assert all(docs[d] < 0 for d in top3[q])  # mean log-probs

    # --adapter: the saved adapter reranks a folder with ONLY a test split (no train/dev to find)
    test_only, out2 = write_beir(tmp_path / "beir_test_only", ["test"]), tmp_path / "out2"
    cli.main(
        [
            "--data",
            str(test_only),
            *common,
            "--adapter",
            str(out / "qpeft-a"),
            "--out",
            str(out2),
        ]
    )
    # zero-shot (in --methods by default) is reranked beside the saved module, in one pass; the
    # module's row takes its training record (best step) from the adapter folder
    metrics2 = json.loads((out2 / "metrics.json").read_text())
    assert set(metrics2) == {"bm25", "zeroshot", "qpeft-a"}
    assert metrics2["qpeft-a"]["training"] == metrics["qpeft-a"]["training"]
    assert metrics2["qpeft-a"]["test"]["best_steps"] == [
        metrics["qpeft-a"]["training"]["best_step"]
    ]
    again, before = ir.read_run(out2 / "qpeft-a.test.trec"), ir.read_run(out / "qpeft-a.test.trec")
    for q in before:  # the reloaded module reproduces the trained run's scores
        assert again[q] == pytest.approx(before[q], abs=1e-6)
    # --methods qpeft-a: the adapter alone (zero-shot, the same every time, is not scored again)
    alone = ["--data", str(test_only), *common, "--adapter", str(out / "qpeft-a")]
    cli.main([*alone, "--methods", "qpeft-a", "--out", str(tmp_path / "out3")])
    assert set(json.loads((tmp_path / "out3" / "metrics.json").read_text())) == {"bm25", "qpeft-a"}
    assert not (tmp_path / "out3" / "zeroshot.test.trec").exists()
    assert ir.read_run(tmp_path / "out3" / "qpeft-a.test.trec") == again


def test_cli_reranks_a_trec_run_and_rank_llm_requests(tiny_dir, tmp_path):
    """--run and --requests rerank what they are given with the scores of --data: the BM25 run of
    a --data job, fed back as a TREC run (tsv queries) and as rank_llm requests, gives the same
    zero-shot run; with --qrels the same table, without them no evaluation."""
    data_dir = write_beir(tmp_path / "beir", ["test"])
    common = ["--model", str(tiny_dir), "--dtype", "float32", "--depth", "3"]
    cli.main(
        ["--data", str(data_dir), *common, "--methods", "zeroshot", "--out", str(tmp_path / "d")]
    )
    expected = ir.read_run(tmp_path / "d" / "zeroshot.test.trec")
    bm25 = ir.read_run(tmp_path / "d" / "bm25.test.trec")
    (tmp_path / "queries.tsv").write_text("".join(f"{q}\t{t}\n" for q, t in QUERY_TEXT.items()))
    run_flags = [
        "--run",
        str(tmp_path / "d" / "bm25.test.trec"),
        "--queries",
        str(tmp_path / "queries.tsv"),
        "--corpus",
        str(data_dir / "corpus.jsonl"),
    ]
    cli.main(
        [
            *run_flags,
            *common,
            "--qrels",
            str(data_dir / "qrels" / "test.tsv"),
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert ir.read_run(tmp_path / "r" / "zeroshot.run.trec") == expected
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    before = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert metrics["zeroshot"]["run"]["ndcg_cut_10"] == before["zeroshot"]["test"]["ndcg_cut_10"]
    cli.main([*run_flags, *common, "--out", str(tmp_path / "unjudged")])
    assert ir.read_run(tmp_path / "unjudged" / "zeroshot.run.trec") == expected
    assert "no qrels for run: runs written" in (tmp_path / "unjudged" / "log.txt").read_text()
    # rank_llm requests: one line per query, doc as a dict or a plain string
    lines = []
    for q, docs in bm25.items():
        candidates = [
            {"docid": d, "score": v, "doc": {"contents": CORPUS[d]} if i % 2 else CORPUS[d]}
            for i, (d, v) in enumerate(docs.items())
        ]
        lines.append(
            json.dumps({"query": {"qid": q, "text": QUERY_TEXT[q]}, "candidates": candidates})
        )
    (tmp_path / "requests.jsonl").write_text("\n".join(lines) + "\n")
    cli.main(
        ["--requests", str(tmp_path / "requests.jsonl"), *common, "--out", str(tmp_path / "j")]
    )
    assert ir.read_run(tmp_path / "j" / "zeroshot.requests.trec") == expected
    for line in (tmp_path / "j" / "zeroshot.requests.jsonl").read_text().splitlines():
        record = json.loads(line)
        scores = [c["score"] for c in record["candidates"]]
        assert scores == sorted(scores, reverse=True)
        qid = record["query"]["qid"]
        assert {c["docid"]: c["score"] for c in record["candidates"]} == pytest.approx(
            expected[qid]
        )


def test_train_adapter_then_load_ranker(tiny_dir, tmp_path):
    """api.train_adapter: one call trains on a dataset, chooses on dev, saves the adapter
    folder and returns a Ranker; load_ranker(adapter=folder) gives the same scores."""
    data_dir = write_beir(tmp_path / "beir", ["train", "dev", "test"])
    messages = []
    ranker = api.train_adapter(
        "qpeft-r",
        data=str(data_dir),
        out=tmp_path / "a",
        model=tiny_dir,
        device="cpu",
        dtype=torch.float32,
        log=messages.append,
        steps=2,
        eval_every=1,
        queries_per_batch=2,
        dev_queries=2,
        top_k=3,
    )
    config = json.loads((tmp_path / "a" / "qpeft-r" / "adapter_config.json").read_text())
    assert (
        config["qpeft"]["top_k"] == 3 and config["train"]["steps"] == 2 and config["data"] == "beir"
    )
    assert any("qpeft-r: keeping the module of step" in m for m in messages)
    loaded = api.load_ranker(
        tiny_dir, adapter=tmp_path / "a" / "qpeft-r", device="cpu", dtype=torch.float32
    )
    passages = [p.strip() for p in PASSAGES]
    assert loaded.score(QUERIES[0], passages) == ranker.score(QUERIES[0], passages)
    with pytest.raises(TypeError, match="unknown setting 'stpes'"):
        api.train_adapter("qpeft-r", data=str(data_dir), model=tiny_dir, device="cpu", stpes=2)


def family_model(folder, family):
    """A tiny random model of `family` (tests/fixtures/families) with a tokenizer of its kind:
    Qwen's byte-level BPE for qwen2/qwen3, a sentencepiece model (BOS added) for mistral."""
    import sentencepiece

    family_folder(family, folder)
    if family == "mistral":  # Mistral v0.1's window; the fixture's 32 is shorter than a prompt
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "sliding_window": 4096}))
        text = folder / "train.txt"
        text.write_text("\n".join([*PASSAGES, *QUERIES, *CORPUS.values(), INSTRUCTION] * 3))
        sentencepiece.SentencePieceTrainer.train(
            input=str(text),
            model_prefix=str(folder / "tokenizer"),
            vocab_size=300,  # the model has 512 embedding rows
            byte_fallback=True,  # as Llama 2 and Mistral: "\n" is a byte token, not dropped
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            minloglevel=2,
        )
    else:
        shutil.copy(FAMILIES / "qwen_tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_qpeft_end_to_end_on_each_family(tmp_path, family):
    """Train Q-PEFT-A a few steps on a tiny random Mistral, Qwen2 and Qwen3, save the adapter,
    load it beside a fresh copy of the model and rerank: the same finite scores."""
    folder = family_model(tmp_path / family, family)
    data_dir = write_beir(tmp_path / "beir", ["train", "dev", "test"])
    ranker = api.train_adapter(
        "qpeft-a",
        data=str(data_dir),
        out=tmp_path / "a",
        model=folder,
        device="cpu",
        dtype=torch.float32,
        log=lambda message: None,
        steps=2,
        eval_every=1,
        queries_per_batch=2,
        dev_queries=2,
    )
    assert ranker.llm.cfg.qk_norm == (family == "qwen3")
    adapter = tmp_path / "a" / "qpeft-a"
    loaded = api.load_ranker(folder, adapter=adapter, device="cpu", dtype=torch.float32)
    passages = [p.strip() for p in PASSAGES]
    scores = loaded.score(QUERIES[0], passages)
    assert scores == ranker.score(QUERIES[0], passages)
    assert all(math.isfinite(x) for x in scores) and len(set(scores)) == len(scores)


def test_readme_python_snippet_runs_as_written():
    """The README's Python API snippet, run as written with the real SmolLM2, prints what the
    README says: the same ids with scores within 0.1 (bf16 machines differ in the last digits)."""
    smollm2_dir()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    shown = section.split("prints", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    printed, expected = done.stdout.splitlines(), shown.strip().splitlines()
    assert len(printed) == len(expected)
    for got, want in zip(printed, expected):
        got, want = ast.literal_eval(got), ast.literal_eval(want)
        if isinstance(want, list):  # rank: (id, score) best first
            assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
            got, want = dict(got), dict(want)
        else:  # rerank: {qid: {docid: score}}
            got, want = (
                {f"{q}/{d}": v for q, docs in x.items() for d, v in docs.items()}
                for x in (got, want)
            )
        assert got == pytest.approx(want, abs=0.1)


def test_seeds_are_averaged_per_query(tiny_dir, tmp_path):
    """--seeds 2: two trained runs with their own files; the row is their mean, the SD is over the
    two runs' means, and the paired test runs on the per-query mean over seeds against zero-shot."""
    data_dir, out = write_beir(tmp_path / "beir", ["train", "dev", "test"]), tmp_path / "out"
    cli.main(
        [
            "--data",
            str(data_dir),
            "--model",
            str(tiny_dir),
            "--dtype",
            "float32",
            "--depth",
            "3",
            "--methods",
            "zeroshot,qpeft-a",
            "--steps",
            "2",
            "--eval-every",
            "1",
            "--queries-per-batch",
            "2",
            "--dev-queries",
            "2",
            "--seeds",
            "2",
            "--seed",
            "5",
            "--out",
            str(out),
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    qrels = {q: {d: g for qq, d, g in QRELS["test"] if qq == q} for q, _, _ in QRELS["test"]}
    ndcg = {}
    for name in ("zeroshot", "qpeft-a-seed5", "qpeft-a-seed6"):
        run = ir.read_run(out / f"{name}.test.trec")
        ndcg[name] = {
            q: v["ndcg_cut_10"] for q, v in ir.evaluate(qrels, run, ["ndcg_cut_10"], 1).items()
        }
    assert (
        metrics["qpeft-a-seed5"]["training"]["seed"] == 5
        and metrics["qpeft-a-seed6"]["training"]["seed"] == 6
    )
    row = metrics["qpeft-a"]["test"]
    assert row["runs"] == ["qpeft-a-seed5", "qpeft-a-seed6"] and len(row["best_steps"]) == 2
    means = [sum(ndcg[n].values()) / 2 for n in row["runs"]]
    assert row["ndcg_cut_10"] == pytest.approx(sum(means) / 2)
    assert row["sd"]["ndcg_cut_10"] == pytest.approx(abs(means[0] - means[1]) / 2**0.5)
    per_query_mean = {
        q: (ndcg["qpeft-a-seed5"][q] + ndcg["qpeft-a-seed6"][q]) / 2 for q in ndcg["zeroshot"]
    }
    delta, _, p = ir.paired_t_test(ndcg["zeroshot"], per_query_mean)
    assert row["ndcg_cut_10_delta_zeroshot"] == pytest.approx(delta)
    assert row["ndcg_cut_10_p_zeroshot"] == pytest.approx(p, nan_ok=True)
    assert "qpeft-a        2" in (out / "log.txt").read_text()


# ---- --resume continues an interrupted run --------------------------------------------------
class Payload:
    """Unpickling this creates `marker`: what a planted resume file could do if it were loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("dropout", ["0.0", "0.1"])  # 0.1: dropout masks must continue too
def test_resume_continues_from_the_saved_step(tiny_dir, tmp_path, monkeypatch, dropout, capsys):
    data_dir = write_beir(tmp_path / "beir", ["train", "dev", "test"])
    args = tiny_args(tiny_dir, data_dir, "--depth 2 --methods qpeft-a --steps 4 --eval-every 1")
    args += ["--queries-per-batch", "2", "--dev-queries", "2", "--dropout", dropout]
    cli.main(args + ["--out", str(tmp_path / "straight")])

    class Interrupted(Exception):
        pass

    real_loss, train_calls = train.batch_loss, []

    def loss_then_crash(*a, **k):
        # dev losses run without gradients; the 3rd training batch never finishes
        if torch.is_grad_enabled():
            train_calls.append(1)
            if len(train_calls) == 3:
                raise Interrupted
        return real_loss(*a, **k)

    monkeypatch.setattr(train, "batch_loss", loss_then_crash)
    out = tmp_path / "interrupted"
    with pytest.raises(Interrupted):
        cli.main(args + ["--out", str(out)])
    assert (out / "qpeft-a.resume.json").exists() and not (out / "qpeft-a").exists()
    # a pickle named like a resume file (qpeft-a.resume.pt) is never read: its code never runs
    marker = tmp_path / "pickle-ran"
    torch.save(Payload(marker), out / "qpeft-a.resume.pt")
    monkeypatch.setattr(train, "batch_loss", real_loss)
    cli.main(args + ["--out", str(out), "--resume"])
    assert "qpeft-a: resumed at step 2" in (out / "log.txt").read_text() and not marker.exists()
    assert [p.name for p in out.glob("qpeft-a.resume*")] == ["qpeft-a.resume.pt"]  # the pickle
    saved = json.loads((out / "qpeft-a" / "adapter_config.json").read_text())
    history = saved["training"]["history"]
    assert [h["step"] for h in history if "train_loss" in h] == [1, 2, 3, 4]
    # the resumed run is the uninterrupted one: same dev losses, same weights (AdamW state too)
    straight = json.loads((tmp_path / "straight" / "qpeft-a" / "adapter_config.json").read_text())
    straight = straight["training"]["history"]
    assert [h["dev_loss"] for h in history] == pytest.approx(
        [h["dev_loss"] for h in straight], abs=1e-6
    )
    resumed = load_file(out / "qpeft-a" / "adapter_model.safetensors")
    uninterrupted = load_file(tmp_path / "straight" / "qpeft-a" / "adapter_model.safetensors")
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    # --resume after a finished run reuses the saved adapter: it does not train further
    cli.main(args + ["--out", str(out), "--resume", "--steps", "6"])
    assert "qpeft-a: reusing trained adapter" in (out / "log.txt").read_text()
    assert json.loads((out / "metrics.json").read_text())["qpeft-a"]["training"]["steps"] == 4
    # ... but not under other module settings: its passages would be cut otherwise than in training
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args + ["--out", str(out), "--resume", "--max-passage-tokens", "8"])
    assert exit_info.value.code == 2 and "trained with other settings" in capsys.readouterr().err
    # ... nor under another seed: that run's module was never trained
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args + ["--out", str(out), "--resume", "--seed", "1"])
    assert exit_info.value.code == 2 and "'seed': 0" in capsys.readouterr().err


@pytest.mark.parametrize("loss", ["paper", "listwise"])
def test_resume_between_dev_checks_is_bit_exact(tiny, tmp_path, monkeypatch, loss):
    """2 epochs of 4 one-query steps, a dev check per epoch, a resume checkpoint every step: cut
    off in step 6, between the checks of steps 4 and 8, and resumed, training ends with the very
    tensors of the uninterrupted run (fp32, dropout on: its masks continue) and the same record,
    written to {name}.checks.jsonl check by check."""
    llm, tokenizer, template = tiny
    examples, dev_examples, tokens = small_training_set(tokenizer)
    examples = [replace(e, list_negatives=("n1", "n2", "p1")) for e in examples]
    dev = tiny_dev_set(dev_examples)
    dev.fit = train.DevSet(
        "train",
        [],
        {"t3": ["p3", "n1"]},
        {"t3": {"p3": 2.0, "n1": 1.0}},
        {"t3": {"p3": 1, "n1": 0}},
        1,
    )
    tc = TrainConfig(
        loss=loss,
        epochs=2,
        queries_per_batch=1,
        eval_every=0,
        save_every=1,
        list_negatives=2,
        patience=5,
    )

    messages = []

    def run(out, resume=False):
        out.mkdir(exist_ok=True)
        torch.manual_seed(0)
        reranker = make_reranker("qpeft-a", llm, template)
        setting = train.Setting(llm, tokenizer, dev, tokens, out, messages.append, resume)
        return train.train(setting, reranker, examples, tc)

    straight, straight_state = run(tmp_path / "straight")
    assert [h["step"] for h in straight_state["history"]] == [0, 4, 8]
    assert [h.get("epoch") for h in straight_state["history"]] == [None, 1, 2]

    class Interrupted(Exception):
        pass

    real_loss, calls = train.batch_loss, []

    def crash_in_step_6(*args, **kwargs):
        if torch.is_grad_enabled():  # a training step, not a dev check
            calls.append(1)
            if len(calls) == 6:
                raise Interrupted
        return real_loss(*args, **kwargs)

    out = tmp_path / "cut"
    monkeypatch.setattr(train, "batch_loss", crash_in_step_6)
    with pytest.raises(Interrupted):
        run(out)
    checks = [json.loads(line) for line in (out / "qpeft-a.checks.jsonl").read_text().splitlines()]
    assert [c["step"] for c in checks] == [0, 4]  # written as it went
    monkeypatch.setattr(train, "batch_loss", real_loss)
    resumed, state = run(out, resume=True)
    assert any(
        m.startswith("qpeft-a: resumed at step 5 ") for m in messages
    )  # after step 5's checkpoint, not a check's
    assert state["history"] == straight_state["history"]
    for name, tensor in qpeft.trainable_state(straight).items():
        assert torch.equal(qpeft.trainable_state(resumed)[name], tensor), name
    checks = [json.loads(line) for line in (out / "qpeft-a.checks.jsonl").read_text().splitlines()]
    assert checks == state["history"]
    # the records hold the diagnostics: NLL gaps, all-pairs accuracy, training-set fit
    for key in ("gap_hard", "gap_in_batch", "nll_hard", "pairwise", "fit_ndcg_cut_10"):
        assert key in checks[-1], key
    # resuming with other training data is refused: that run's batches would not be these
    with pytest.raises(ValueError, match="other settings"):
        examples = examples[:3]
        run(out, resume=True)


def test_cut_to_counts_what_it_cuts():
    """Two of three passages are longer than 3 tokens: cut, counted and logged."""
    lines, counts = [], {}
    ids = {"a": [1, 2, 3, 4, 5], "b": [1, 2], "c": [1, 2, 3, 4, 5, 6, 7]}
    cut = runtime.cut_to(ids, 3, "passages", lines.append, counts)
    assert cut == {"a": [1, 2, 3], "b": [1, 2], "c": [1, 2, 3]}
    assert counts == {"passages": {"cut": 2, "of": 3, "limit": 3}}
    assert lines == ["passages: 2 of 3 cut to 3 tokens"]


def test_a_failed_save_leaves_no_temporary_file(tmp_path):
    def write_half_then_fail(f):
        Path(f).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ir.atomic_save(write_half_then_fail, tmp_path / "metrics.json")
    assert list(tmp_path.iterdir()) == []


def test_total_wall_time_covers_the_whole_run(tiny_dir, tmp_path, monkeypatch):
    # A fake clock in cli: every perf_counter() reading is 10 s after the previous one.
    readings = []

    def clock():
        readings.append(10.0 * len(readings))
        return readings[-1]

    monkeypatch.setattr(cli, "time", SimpleNamespace(perf_counter=clock))
    out = tmp_path / "out"
    cli.main(
        [
            "--model",
            str(tiny_dir),
            "--data",
            str(write_beir(tmp_path / "beir", ["train", "dev", "test"])),
            "--dtype",
            "float32",
            "--depth",
            "2",
            "--methods",
            "zeroshot,qpeft-a",
            "--steps",
            "1",
            "--queries-per-batch",
            "2",
            "--dev-queries",
            "2",
            "--out",
            str(out),
        ]
    )
    # the total is taken at the last reading; the first reading is taken before the model is loaded
    assert f"total wall time {readings[-1] - readings[0]:.0f} s" in (out / "log.txt").read_text()


# ---- bad input --------------------------------------------------------------------------------
def test_unknown_method_is_a_clean_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--data", "anything", "--methods", "zeroshot,bogus"])
    assert exit_info.value.code == 2
    assert "unknown method 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--data", "anything", "--loss", "pairwise"])
    assert exit_info.value.code == 2
    assert (
        "--loss: unknown loss 'pairwise' (choose from paper, listwise)" in capsys.readouterr().err
    )


def test_preset_listwise_is_the_measured_recipe_and_a_flag_overrides_it():
    # the settings recorded beside T3's seed-0 module (README, Results), defaults included: a
    # changed default would change the recipe, and this test would say so
    measured = ROOT / "results/screen27/qpeft-a-listwise-pw0-T3-lr1e-3-epoch1.adapter_config.json"
    record = json.loads(measured.read_text())
    args = cli.parse_args(["--data", "nq_small", "--preset", "listwise"])
    assert asdict(cli.pick(TrainConfig, args)) == record["train"]
    assert asdict(cli.pick(QPEFTConfig, args)) == record["qpeft"]
    # reranked at the paper's depth (training ignores --depth), zero-shot beside, 3 seeds
    assert (args.depth, args.methods, args.seeds) == (100, "zeroshot,qpeft-a", 3)
    lower_lr = cli.parse_args(["--data", "nq_small", "--preset", "listwise", "--lr", "3e-4"])
    assert cli.pick(TrainConfig, lower_lr).lr == 3e-4


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--depth", "-1"], "--depth: -1 is out of range (must be >= 1)"),
        (["--max-passage-tokens", "0"], "--max-passage-tokens: 0 is out of range"),
        (["--train-queries", "-1"], "--train-queries: -1 is out of range (must be >= 0)"),
        (["--eval-every", "-1"], "--eval-every: -1 is out of range (must be >= 0)"),
        (["--save-every", "0"], "--save-every: 0 is out of range"),
        (["--list-negatives", "0"], "--list-negatives: 0 is out of range"),
        (["--queries-per-batch", "0"], "--queries-per-batch: 0 is out of range"),
        (["--dev-queries", "-1"], "--dev-queries: -1 is out of range"),
        (["--dropout", "2"], "--dropout: 2.0 is out of range (must be >= 0.0 and < 1.0)"),
        (["--token-budget", "0"], "--token-budget: 0 is out of range"),
        (["--seeds", "0"], "--seeds: 0 is out of range"),
    ],
)
def test_numeric_flags_are_range_checked_before_any_work(flags, message, capsys):
    """Bad numbers are argparse errors (one line, exit 2) before the model or the data is read."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--data", "no-such-dataset", "--model", "no-such-model", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_input_errors_are_one_line(tiny_dir, tmp_path, capsys):
    """An input error names what is wrong on one line with exit code 2 and no traceback;
    --debug shows it."""
    data_dir = write_beir(tmp_path / "beir", ["train", "dev", "test"])
    common = [
        "--model",
        str(tiny_dir),
        "--data",
        str(data_dir),
        "--dtype",
        "float32",
        "--out",
        str(tmp_path / "o"),
    ]
    cases = [
        (["--split", "nosuch", "--methods", "zeroshot"], "has no split 'nosuch'"),
        (["--heads", "5", "--methods", "qpeft-a"], "--heads 5 does not divide the width"),
        (["--data", str(tmp_path / "missing")], "dataset"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(common + flags)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "qpeft.py: error:" in err and message in err, err
        assert "Traceback" not in err
    with pytest.raises(ValueError, match="has no split"):
        cli.main(common + ["--split", "nosuch", "--methods", "zeroshot", "--debug"])


def test_non_finite_scores_are_an_error(tiny_dir, tmp_path, monkeypatch, capsys):
    data_dir = write_beir(tmp_path / "beir", ["train", "dev", "test"])
    real_score_pairs = runtime.score_pairs  # what reranking calls
    monkeypatch.setattr(runtime, "score_pairs", lambda *a: real_score_pairs(*a) * float("nan"))
    with pytest.raises(SystemExit):
        cli.main(
            [
                "--model",
                str(tiny_dir),
                "--data",
                str(data_dir),
                "--dtype",
                "float32",
                "--methods",
                "zeroshot",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    err = capsys.readouterr().err
    assert "zeroshot scored query" in err and "non-finite scores are not ranked" in err
    assert not (tmp_path / "o" / "metrics.json").exists()


# ---- the real SmolLM2: zero-shot query likelihood prefers the relevant passage ----------------
def test_smollm2_zeroshot_prefers_relevant_passages():
    folder = smollm2_dir()
    passages = [
        " Paris is the capital and most populous city of France, on the river Seine.",
        " Photosynthesis is the process by which green plants use sunlight to make food from "
        "carbon dioxide and water.",
        " Romeo and Juliet is a tragedy written by William Shakespeare early in his career.",
    ]
    queries = [
        "what is the capital of france",
        "how do plants make food from sunlight",
        "who wrote romeo and juliet",
    ]
    pairs = [(q, d) for q in range(3) for d in range(3)]
    scores = {}
    for dtype in (torch.float32, torch.bfloat16):
        llm, tokenizer = runtime.load_model(folder, dtype=dtype)
        template = Template(tokenizer, INSTRUCTION)
        p_ids = [tokenizer.encode(p) for p in passages]
        q_ids = [tokenizer.encode(q) for q in queries]
        with torch.no_grad():
            prefix = encode_prefixes(llm, template, None, p_ids)
            scores[dtype] = score_pairs(
                llm,
                template,
                None,
                prefix,
                [d for _, d in pairs],
                [q_ids[q] for q, _ in pairs],
                [p_ids[d] for _, d in pairs],
            ).view(3, 3)
        # scores[query, passage]; query i's relevant passage is passage i, so the diagonal wins
        # every row (by margins of about 1 nat per token)
        assert scores[dtype].argmax(1).tolist() == [0, 1, 2], (dtype, scores[dtype])
        if dtype == torch.float32:  # the real tokenizer and model: cached path == one plain pass
            zs = Reranker(QPEFTConfig(method="zeroshot"), llm, template)
            with torch.no_grad():
                naive = qpeft.score(llm, template, zs, q_ids[0], p_ids[0])
                assert abs(scores[dtype][0, 0] - naive) <= 1e-4
    # bf16 (the CLI default) stays close to fp32: the differences are below 0.05 nat/token here
    assert (scores[torch.bfloat16] - scores[torch.float32]).abs().max() <= 0.15
