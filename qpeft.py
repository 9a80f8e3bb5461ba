"""Q-PEFT: query-dependent parameter-efficient fine-tuning for LLM reranking, in one file.

Peng, Wu, Wang, Rajanala, Fang. "Q-PEFT: Query-dependent Parameter Efficient Fine-tuning for Text
Reranking with Large Language Models", arXiv 2404.04522 (2024); official code zhiyuanpeng/Q-PEFT.
Spec: ../shared/docs/method.md. A frozen LLM scores a (query, passage) pair by query likelihood,

    [bos] P "\\nPassage:" " {passage}" " \\n" H "Question: \\n" {query} eos

(the spec's template; the newline after the instruction P is our choice, so that "Passage:" starts
a line). score = mean log-probability of the query tokens and eos. Four rerankers differ in what trains:
  zeroshot  nothing                       P frozen, no H
  prompt    P (soft prompt, Lester et al.) P trainable, no H
  qpeft-r   E' and the MLP                 H = MLP(E'("hints: "), E'(top-k passage tokens), E'("\\n"))
  qpeft-a   E', attention and the MLP      H = MLP(E'("hints: "), attention(E'(query), E(passage)), E'("\\n"))

Fast path: P and the passage come before anything query-dependent, so their keys/values are
computed once per passage (P's once per batch of passages) and reused for every query and every
method that meets the passage;
only H, "Question: \\n" and the query run per pair, and logits are computed only where the query
is predicted.
"""
import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
import eval as ir
from model import default_dtype, find_asset, load

METHODS = ("zeroshot", "prompt", "qpeft-r", "qpeft-a")


@dataclass
class QPEFTConfig:
    """What a trained module is; saved next to its weights."""
    method: str = "qpeft-a"        # one of METHODS
    instruction: str = "given the hints, please generate a question for the input passage"
    top_k: int = 15                # qpeft-r: hint tokens taken from the passage (paper: 10-20)
    heads: int = 2                 # qpeft-a: attention heads (paper: 2)
    dropout: float = 0.1           # qpeft-a: attention dropout while training (paper: 0.1)
    train_embeddings: bool = True  # E' is a trainable copy of E (paper); False: E' = frozen E, a light module
    residual_mlp: bool = False     # hint = x + MLP(x), MLP ends at 0 (not in the paper; off = faithful)
    max_passage_tokens: int = 160  # passages are cut to this many tokens, keeping the start
    max_query_tokens: int = 64     # queries too (a query is also the hint block of qpeft-a)


@dataclass
class TrainConfig:
    steps: int = 100               # optimizer steps, one per batch (the official code stepped per 2 pairs)
    queries_per_batch: int = 4     # paper: 4; negatives: the batch's other positives and all its hard negatives
    lr: float = 1e-2               # paper: 3e-2 (AdamW)
    weight_decay: float = 0.01     # paper: 0.01; never on E' (see train)
    margin: float = 0.0            # hinge margin on mean NLL (paper: 0.0-1.1)
    eval_every: int = 25           # steps between dev checks (the paper stopped on the dev loss)
    patience: int = 3              # stop after this many dev checks without a better dev SELECT_ON
    dev_queries: int = 40          # dev queries checked (the first usable ones: all 40 of dev.graded)
    dev_depth: int = 20            # first-stage candidates reranked per dev query at each check
    seed: int = 0


@dataclass
class TokenIds:
    """Token ids of passages and queries, kept apart: MS MARCO numbers both with the same kind of
    id strings (passage 1072603 and query 1072603 both exist), so one shared table would mix them."""
    passages: dict  # docid -> ids of " {passage}", cut to max_passage_tokens
    queries: dict   # qid -> ids of "{query}"


# ---------------------------------------------------------------------------------------------
# Devices and torchrun: one process per device, PyTorch's DistributedDataParallel
# ---------------------------------------------------------------------------------------------
def rank():
    """This process's rank under torchrun (0 when run alone): rank 0 logs and writes every file."""
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def setup_device(name):
    """The device of this process for --device auto|cpu|cuda|cuda:N|mps (auto: cuda when there
    is one). Under torchrun (WORLD_SIZE > 1) also joins the process group: nccl between GPUs,
    gloo on CPUs; each process of a node takes GPU LOCAL_RANK. Errors name the flag."""
    processes, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is visible")
        if processes > 1:
            if name != "cuda":
                raise ValueError(f"--device {name}: under torchrun each process takes "
                                 f"cuda:LOCAL_RANK; pass --device cuda")
            if local >= torch.cuda.device_count():
                raise ValueError(f"--device cuda: local rank {local} but only "
                                 f"{torch.cuda.device_count()} GPUs on this node (use --nproc_per_node "
                                 f"{torch.cuda.device_count()} or fewer)")
            name = f"cuda:{local}"
        elif name == "cuda":
            name = f"cuda:{torch.cuda.current_device()}"
        torch.cuda.set_device(torch.device(name))
    elif name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available")
    if processes > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if name.startswith("cuda") else "gloo")
    return torch.device(name)


def gather(value):
    """[value of rank 0, value of rank 1, ...] on every rank (picklable values; [value] alone)."""
    if world() == 1:
        return [value]
    values = [None] * world()
    dist.all_gather_object(values, value)
    return values


# ---------------------------------------------------------------------------------------------
# The input template, tokenised piece by piece
# ---------------------------------------------------------------------------------------------
class Template:
    """Token ids of the fixed text pieces. Each piece is tokenised on its own and the ids are
    concatenated (not the joined string): a passage's ids, and so its cached keys/values, must
    not depend on the query or the method around it. Passages and queries are tokenised with a
    leading space where a word boundary precedes them, so byte-level BPE sees ' word' as usual
    (sentencepiece marks word starts itself; whether it keeps the leading space depends on the
    model's normalizer)."""

    def __init__(self, tokenizer, instruction):
        self.tokenizer = tokenizer
        self.bos = [tokenizer.bos_id] if tokenizer.add_bos else []   # never part of the soft prompt
        self.prompt = tokenizer.encode(instruction)
        self.passage_open = tokenizer.encode("\nPassage:")
        self.passage_close = tokenizer.encode(" \n")
        self.hints_open = tokenizer.encode("hints: ")
        self.hints_close = tokenizer.encode("\n")
        self.question = tokenizer.encode("Question: \n")
        self.eos = tokenizer.eos_id

    @property
    def head(self):
        """The start of every prefix, the same for all passages: bos, P and "\\nPassage:"."""
        return self.bos + self.prompt + self.passage_open

    def prefix(self, passage_ids):
        """Everything before H: P and the passage."""
        return self.head + passage_ids + self.passage_close


# ---------------------------------------------------------------------------------------------
# The trainable part of each method
# ---------------------------------------------------------------------------------------------
class Reranker(nn.Module):
    """The trainable parameters of one method around a frozen LLM. The LLM is passed to every
    call instead of being a submodule, so it is never trained, moved or saved with this module."""

    def __init__(self, cfg, llm, template):
        super().__init__()
        self.cfg = cfg
        E = llm.tok_embeddings.weight.detach()                                    # (V, D) frozen
        D = E.shape[1]
        if cfg.method == "prompt":  # soft prompt initialised from the instruction's embeddings
            self.soft_prompt = nn.Parameter(E[template.prompt].float().clone())   # (P, D)
        if cfg.method in ("qpeft-r", "qpeft-a"):
            # E': the official code trains a full copy of the embedding table (initialised = E).
            self.hint_embeddings = nn.Embedding.from_pretrained(E.float().clone(), freeze=False) \
                if cfg.train_embeddings else None
            self.mlp = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D))
            if cfg.residual_mlp:  # start as the identity: the LLM first sees real token embeddings
                nn.init.zeros_(self.mlp[2].weight), nn.init.zeros_(self.mlp[2].bias)
        if cfg.method == "qpeft-a":
            self.attention = nn.MultiheadAttention(D, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.to(E.device)  # on the LLM's device, in fp32

    def forward(self, llm, template, batch, tokens, margin):
        """The training loss of this process's share of `batch` and its diagnostics (batch_loss).
        Training calls the module (so DistributedDataParallel, under torchrun, can average the
        gradients over processes); scoring calls hint_block directly."""
        return batch_loss(llm, template, self, batch, tokens, margin, share=(rank(), world()))

    def trainable_parameters(self):
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def embed_hint_ids(self, llm, ids):
        """E'(ids) in fp32; the frozen table E when E' is not trained."""
        if self.hint_embeddings is None:
            return llm.tok_embeddings(ids).float()
        return self.hint_embeddings(ids)

    def hint_block(self, llm, template, queries, passages):
        """H for each pair: a list of (h_i, D) float32 tensors. queries/passages: lists of id lists."""
        dev = llm.tok_embeddings.weight.device
        if self.cfg.method == "qpeft-r":
            ids, counts = select_top_k(self, llm, queries, passages, self.cfg.top_k)   # (N, k), (N,)
            opening = torch.tensor(template.hints_open, device=dev).expand(len(ids), -1)
            closing = torch.tensor(template.hints_close, device=dev).expand(len(ids), -1)
            rows = torch.cat([opening, ids, closing], dim=1)                        # (N, o + k + c)
            real = torch.arange(rows.shape[1], device=dev) < opening.shape[1] + counts[:, None]
            real[:, -closing.shape[1]:] = True                                      # (N, o + k + c)
            # One E' lookup for all pairs: the backward of every lookup writes a dense (V, D) gradient.
            x = self.embed_hint_ids(llm, rows[real])                                # (sum h_i, D)
            lengths = real.sum(1).tolist()
        else:  # keys/values: the passage's tokens only (the official code used its whole template row)
            q_ids, _ = pad_ids(queries, dev)                                        # (N, Lq)
            p_ids, p_mask = pad_ids(passages, dev)                                  # (N, Ld)
            keys = llm.tok_embeddings(p_ids).float()                                # (N, Ld, D) frozen E
            attended, _ = self.attention(self.embed_hint_ids(llm, q_ids), keys, keys,   # (N, Lq, D)
                                         key_padding_mask=~p_mask, need_weights=False)
            opening = self.embed_hint_ids(llm, torch.tensor(template.hints_open, device=dev))
            closing = self.embed_hint_ids(llm, torch.tensor(template.hints_close, device=dev))
            # one vector per real query token, between E'("hints: ") and E'("\n")
            blocks = [torch.cat([opening, attended[i, :len(q)], closing]) for i, q in enumerate(queries)]
            lengths = [len(b) for b in blocks]
            x = torch.cat(blocks)                                                   # (sum h_i, D)
        h = x + self.mlp(x) if self.cfg.residual_mlp else self.mlp(x)
        return list(h.split(lengths))


@torch.no_grad()
def select_top_k(reranker, llm, queries, passages, k):
    """Q-PEFT-R's hint tokens for a batch of pairs: for each, the k distinct passage token ids most
    similar to any query token. Returns ids (N, k') and counts (N,), k' = min(k, longest passage):
    row i's hint ids are ids[i, :counts[i]].

    Similarity is the cosine between E'(query token) and E(passage token); a token id scores the
    max over query tokens (the same at every position where it occurs: one E row); ties go to the
    earlier position. Only passage tokens are candidates (the official code also admitted the
    template's words, "Passage", ":" ..., a deviation on purpose), and a passage with fewer than k
    distinct tokens gives a shorter H (no random resampling as in the official code). Batched and
    on the device: no per-pair loop waits for the host."""
    dev = llm.tok_embeddings.weight.device
    q_ids, q_mask = pad_ids(queries, dev)                                       # (N, Lq)
    p_ids, p_mask = pad_ids(passages, dev)                                      # (N, Ld)
    q = F.normalize(reranker.embed_hint_ids(llm, q_ids), dim=-1)                # (N, Lq, D)
    p = F.normalize(llm.tok_embeddings(p_ids).float(), dim=-1)                  # (N, Ld, D)
    similarity = (q @ p.transpose(1, 2)).masked_fill(~q_mask[:, :, None], -torch.inf)  # (N, Lq, Ld)
    best = similarity.max(dim=1).values if q_ids.shape[1] else torch.zeros_like(p_ids, dtype=q.dtype)
    best = best.clamp(min=-1.0)                                                 # (N, Ld) an empty query: -1
    repeated = (p_ids[:, :, None] == p_ids[:, None, :]).tril(-1).any(-1)        # (N, Ld): id seen earlier
    candidate = p_mask & ~repeated                                              # (N, Ld): first occurrences
    order = torch.sort(best.masked_fill(~candidate, -2.0), dim=1, descending=True,  # stable: earlier
                       stable=True).indices[:, :k]                              # (N, k') position first
    return p_ids.gather(1, order), candidate.sum(1).clamp(max=k)


def pad_ids(lists, device, pad=0):
    """Right-padded ids (N, L) and a mask (N, L), True on real tokens."""
    L = max(len(x) for x in lists)
    ids = torch.tensor([x + [pad] * (L - len(x)) for x in lists], dtype=torch.long, device=device)
    mask = torch.tensor([[True] * len(x) + [False] * (L - len(x)) for x in lists], device=device)
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Scoring: mean log-probability of query + eos, with passage keys/values computed once
# ---------------------------------------------------------------------------------------------
def embed_head(llm, template, reranker):
    """Input embeddings (S_head, D) of the head, with the trainable soft prompt in P's place after
    bos for the `prompt` method."""
    head = llm.tok_embeddings(torch.tensor(template.head, device=llm.tok_embeddings.weight.device))
    if reranker is None or reranker.cfg.method != "prompt":
        return head
    b, P = len(template.bos), len(template.prompt)
    return torch.cat([head[:b], reranker.soft_prompt.to(head.dtype), head[b + P:]])


def encode_prefixes(llm, template, reranker, passages):
    """Keys/values of P + passage for a batch of passages (id lists). P is the frozen instruction,
    or the trainable soft prompt of the `prompt` method (then this runs with gradients).
    The head (bos, P, "\\nPassage:") is the same for every passage and comes first, so its
    keys/values are computed once and every passage attends to that one copy: 16 of a prefix's
    107 tokens on average on msmarco_small. Returns (past, past_mask (Np, S), lengths (Np,))."""
    dev = llm.tok_embeddings.weight.device
    head = embed_head(llm, template, reranker)[None]                            # (1, S_head, D)
    S_head = head.shape[1]
    _, head_kv = llm.hidden(head, torch.arange(S_head, device=dev)[None])        # (1, Hkv, S_head, hd) per layer
    ids, mask = pad_ids([p + template.passage_close for p in passages], dev)     # (Np, T)
    positions = S_head + torch.arange(ids.shape[1], device=dev).expand(len(passages), -1)
    _, past = llm.hidden(llm.tok_embeddings(ids), positions, mask, head_kv)      # (Np, Hkv, S_head + T, hd) per layer
    past_mask = torch.cat([torch.ones(len(passages), S_head, dtype=torch.bool, device=dev), mask], dim=1)
    return past, past_mask, past_mask.sum(1)


def score_pairs(llm, template, reranker, prefix, rows, queries, passages):
    """Mean log p(query tokens, eos | prompt) for pairs whose passage is row `rows[i]` of the
    cached `prefix`. queries/passages: id lists per pair. Returns (N,) float32."""
    past, past_mask, past_len = prefix
    dev = llm.tok_embeddings.weight.device
    rows = torch.tensor(rows, device=dev)
    hints = reranker.hint_block(llm, template, queries, passages) \
        if reranker is not None and reranker.cfg.method in ("qpeft-r", "qpeft-a") else [None] * len(queries)
    dtype = llm.tok_embeddings.weight.dtype
    suffixes, targets, first_target = [], [], []
    for hint, q in zip(hints, queries):
        text = llm.tok_embeddings(torch.tensor(template.question + q + [template.eos], device=dev))
        pieces = [text] if hint is None else [hint.to(dtype), text]
        suffixes.append(torch.cat(pieces))                                      # (T_i, D)
        first_target.append(sum(len(x) for x in pieces) - len(q) - 1)            # index of the first query token
        targets.append(q + [template.eos])
    x = nn.utils.rnn.pad_sequence(suffixes, batch_first=True)                   # (N, T, D)
    lengths = torch.tensor([len(s) for s in suffixes], device=dev)
    mask = torch.arange(x.shape[1], device=dev) < lengths[:, None]              # (N, T): real suffix tokens
    positions = past_len[rows, None] + torch.arange(x.shape[1], device=dev)     # (N, T): continue after the prefix
    past_rows = [(k[rows], v[rows]) for k, v in past]
    h, _ = llm.hidden(x, positions, mask, past_rows, past_mask[rows])           # (N, T, D)
    # Logits only where a target is predicted: position t predicts token t+1.
    pair = torch.cat([torch.full((len(t),), i, device=dev) for i, t in enumerate(targets)])
    where = torch.cat([torch.arange(len(t), device=dev) + s - 1 for t, s in zip(targets, first_target)])
    target = torch.tensor([tok for t in targets for tok in t], device=dev)
    logprob = target_logprobs(llm, h[pair, where], target)                      # (M,)
    sums = torch.zeros(len(targets), device=dev).index_add(0, pair, logprob)
    return sums / torch.tensor([len(t) for t in targets], device=dev)


def target_logprobs(llm, h, target, rows=128):
    """log p(target[i] | h[i]) for hidden states h (M, D): float32 logits and logsumexp, 128 rows
    at a time, so that each (rows, vocab) float32 block (25 MB for SmolLM2) is reused from the heap
    and stays in cache; all M rows at once took 80 ms against 45 ms for M = 372 on the 2-core CPU."""
    out = []
    for start in range(0, len(h), rows):
        logits = llm.logits(h[start:start + rows])                              # (rows, V) float32
        out.append(logits.gather(1, target[start:start + rows, None])[:, 0] - logits.logsumexp(-1))
    return torch.cat(out)                                                       # (M,)


def score_pairs_uncached(llm, template, reranker, queries, passages):
    """What score_pairs computes, the slow way: every pair's whole sequence in one causal pass
    and logits at every position. The reference in the tests and the baseline in bench.py."""
    dev = llm.tok_embeddings.weight.device
    dtype = llm.tok_embeddings.weight.dtype
    hints = reranker.hint_block(llm, template, queries, passages) \
        if reranker is not None and reranker.cfg.method in ("qpeft-r", "qpeft-a") else [None] * len(queries)
    sequences, first_target = [], []
    for hint, q, p in zip(hints, queries, passages):
        prefix = torch.cat([embed_head(llm, template, reranker),                         # (S, D)
                            llm.tok_embeddings(torch.tensor(p + template.passage_close, device=dev))])
        text = llm.tok_embeddings(torch.tensor(template.question + q + [template.eos], device=dev))
        sequences.append(torch.cat([prefix] + ([hint.to(dtype)] if hint is not None else []) + [text]))
        first_target.append(len(sequences[-1]) - len(q) - 1)
    x = nn.utils.rnn.pad_sequence(sequences, batch_first=True)                   # (N, T, D) right-padded
    h, _ = llm.hidden(x, torch.arange(x.shape[1], device=dev).expand(len(sequences), -1))
    logprobs = torch.log_softmax(llm.logits(h), dim=-1)                          # (N, T, V) float32
    scores = []
    for i, (q, start) in enumerate(zip(queries, first_target)):
        target = torch.tensor(q + [template.eos], device=dev)
        scores.append(logprobs[i, start - 1 + torch.arange(len(target), device=dev), target].mean())
    return torch.stack(scores)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def batch_pairs(batch):
    """(query index, docid, kind) for a batch of TrainExamples, kind "positive", "hard" (the query's
    own hard negative) or "in-batch": each query meets its positive and, as negatives, the other
    queries' positives and every query's hard negative (the official code's in-batch and hard
    negatives: 7 per query at 4 queries, paper-digest §5.2)."""
    pool = [e.positive_docid for e in batch] + [e.hard_negative_docid for e in batch]
    pairs = []
    for i, e in enumerate(batch):
        # distinct negatives: a hard negative may be another query's positive, and must count once
        negatives = dict.fromkeys(pool)
        negatives.pop(e.positive_docid)
        pairs.append((i, e.positive_docid, "positive"))
        pairs += [(i, d, "hard" if d == e.hard_negative_docid else "in-batch") for d in negatives]
    return pairs


def ranking_loss(scores, pairs, margin, counts=None):
    """L = mean NLL(q, d+) + mean relu(NLL(q, d+) - NLL(q, d-) + margin), NLL = -score (a mean
    per token, so the margin is on a per-token scale, as in the official code). Returns L and its
    diagnostics: the two terms, the share of active hinges, and the pairwise accuracy (positive
    above the query's own hard negative). `counts` (queries, negatives, hard pairs of the whole
    batch; default: these pairs') divide the sums, so that the values of the processes that
    share a batch add up to the whole batch's."""
    nll = -scores                                                               # (N,)
    kind = [k for _, _, k in pairs]
    counts = counts or batch_counts(pairs)
    is_pos = torch.tensor([k == "positive" for k in kind], device=nll.device)
    query = torch.tensor([i for i, _, _ in pairs], device=nll.device)
    nll_pos = torch.zeros(max(i for i, _, _ in pairs) + 1, device=nll.device)
    nll_pos = nll_pos.index_copy(0, query[is_pos], nll[is_pos])                # (B,) 0 for others'
    gap = nll_pos[query[~is_pos]] - nll[~is_pos]                                # (N - B,) > 0: wrong order
    hinge = F.relu(gap + margin)
    hard = torch.tensor([k == "hard" for k in kind], device=nll.device)[~is_pos]
    queries, negatives, hard_pairs = counts
    terms = {"pointwise": nll_pos.sum() / queries, "hinge": hinge.sum() / negatives,
             "active": (hinge > 0).sum() / negatives, "accuracy": (gap[hard] < 0).sum() / max(hard_pairs, 1)}
    return terms["pointwise"] + terms["hinge"], terms


def batch_counts(pairs):
    """(queries, negative pairs, hard-negative pairs) of a list of pairs."""
    kinds = Counter(k for _, _, k in pairs)
    return kinds["positive"], kinds["hard"] + kinds["in-batch"], kinds["hard"]


def batch_loss(llm, template, reranker, batch, tokens, margin, share=(0, 1)):
    """The loss of one batch (and its diagnostics) through the fast path: each passage's
    keys/values computed once. With share (r, n), only the pairs of queries r, r + n, ... (process
    r of n under torchrun), each with the whole batch's negatives, and the sums divided by the
    whole batch's counts: the n shares add up to the whole batch's loss."""
    pairs = batch_pairs(batch)
    counts = batch_counts(pairs)
    pairs = [p for p in pairs if p[0] % share[1] == share[0]]
    if not pairs:  # more processes than queries: a zero loss that still reaches every parameter
        device = llm.tok_embeddings.weight.device
        zero = sum((p.sum() for p in reranker.parameters() if p.requires_grad), torch.zeros((), device=device)) * 0.0
        return zero, {k: zero.detach() for k in ("pointwise", "hinge", "active", "accuracy")}
    docids = sorted({d for _, d, _ in pairs})
    row = {d: i for i, d in enumerate(docids)}
    with torch.set_grad_enabled(torch.is_grad_enabled() and reranker.cfg.method == "prompt"):
        prefix = encode_prefixes(llm, template, reranker, [tokens.passages[d] for d in docids])
    scores = score_pairs(llm, template, reranker, prefix, [row[d] for _, d, _ in pairs],
                         [tokens.queries[batch[i].qid] for i, _, _ in pairs],
                         [tokens.passages[d] for _, d, _ in pairs])
    return ranking_loss(scores, pairs, margin, counts)


@dataclass
class DevSet:
    """What a dev check looks at: loss terms on (query, positive, hard negative) batches, and a
    ranking metric on the first-stage candidates of the same queries (complete labels where the
    dataset has them: msmarco_small's dev.graded)."""
    split: str
    batches: list        # lists of TrainExamples
    candidates: dict     # qid -> [docid], the reranked top-N
    first_stage: dict    # qid -> {docid: score}, the whole list (the tail keeps its order)
    qrels: dict
    level: int           # relevance level of the binary measures
    prefixes: dict = field(default_factory=dict)  # passage keys/values: first check, reused after


SELECT_ON = "ndcg_cut_10"  # the dev measure that picks the module and drives early stopping


@torch.no_grad()
def dev_check(llm, template, reranker, dev, margin, tokens, token_budget=4096):
    """Dev diagnostics of the module as it is now, with dropout off: the mean loss terms over the
    dev batches and the trec_eval means on the dev candidates. The same on every process."""
    reranker.eval()
    record = {}
    for batch in dev.batches:  # each process its share of every batch; the shares add up
        loss, terms = batch_loss(llm, template, reranker, batch, tokens, margin, share=(rank(), world()))
        for name, value in {"dev_loss": loss, **terms}.items():
            record[name] = record.get(name, 0.0) + value.item() / len(dev.batches)
    shares = gather(record)
    record = {name: sum(share[name] for share in shares) for name in record}
    # the frozen prefix's keys/values do not change with training; the soft prompt's do
    scores, _ = rerank(llm, template, {"m": reranker}, dev.candidates, tokens, token_budget, None,
                       dev.prefixes if reranker.cfg.method != "prompt" else None)
    per_query = evaluate_run(with_tail(scores["m"], dev.first_stage), dev.qrels, dev.level)
    record.update(ir.summarize(per_query))
    return {k: round(v, 6) for k, v in record.items()}


def dev_line(record):
    return (f"dev loss {record['dev_loss']:.4f} (pointwise {record['pointwise']:.4f}, hinge "
            f"{record['hinge']:.4f}, active hinges {record['active']:.2f}), pairwise accuracy "
            f"{record['accuracy']:.3f}, nDCG@10 {record['ndcg_cut_10']:.4f}, HR@5 {record['success_5']:.4f}")


def train(llm, template, reranker, train_examples, dev, tokens, tc, out, log, resume=False, name=None):
    """AdamW on the trainable parameters (fp32, like their optimizer state), early stopping on the
    dev ranking measure SELECT_ON; the module of the best dev check is kept, the untrained one
    (step 0) included. With `resume`, continues from out/{name}.resume.json + .safetensors
    (written at every dev check). `name` (default: the method) names the files and log lines of this run."""
    method = reranker.cfg.method
    name = name or method
    # No weight decay on E': AdamW's decay would shrink all of its ~49k rows at every step, while a
    # batch's gradient reaches only the few dozen rows of its hint and query tokens.
    decayed = [p for n, p in reranker.named_parameters() if p.requires_grad and n != "hint_embeddings.weight"]
    groups = [{"params": decayed}, {"params": [p for n, p in reranker.named_parameters()
                                               if p.requires_grad and n == "hint_embeddings.weight"],
                                    "weight_decay": 0.0}]
    # fused: one kernel over all parameters. E' alone is 28M fp32 values updated every step (its
    # gradient is dense); the default per-tensor loop took 123 ms a step on 2 cores, fused 15 ms.
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, weight_decay=tc.weight_decay,
                                  fused=True)
    # Under torchrun each process computes its share of every batch's queries (batch_loss); DDP
    # averages the gradients, so each share's loss is scaled by the number of processes to make
    # the update the single-process one. It also broadcasts rank 0's initial weights.
    model = nn.parallel.DistributedDataParallel(reranker) if world() > 1 else reranker

    def snapshot():
        return {k: v.detach().clone() for k, v in trainable_state(reranker).items()}

    resume_files = out / f"{name}.resume.json", out / f"{name}.resume.safetensors"
    if resume and resume_files[0].exists():
        state = load_resume(resume_files, reranker, optimizer, [asdict(reranker.cfg), asdict(tc)])
        log(f"{name}: resumed at step {state['step']} from {resume_files[0]}")
    else:  # the untrained module is the first candidate: training must beat it on dev
        record = dev_check(llm, template, reranker, dev, tc.margin, tokens)
        state = {"step": 0, "best": snapshot(), "best_step": 0, "best_dev": record, "bad_checks": 0,
                 "history": [{"step": 0, **record}]}
        log(f"{name}: step 0 (untrained) {dev_line(record)}")
    per_epoch = max(1, len(train_examples) // tc.queries_per_batch)
    bar = tqdm(range(state["step"], tc.steps), desc=f"train {name}", initial=state["step"], total=tc.steps,
               disable=rank() > 0)
    for step in bar:
        if state["bad_checks"] >= tc.patience:
            log(f"{name}: early stop at step {step} (no dev {SELECT_ON} gain in {tc.patience} checks)")
            break
        epoch, index = divmod(step, per_epoch)
        if index == 0 or step == state["step"]:  # a new shuffle each epoch, the same for the same seed
            epoch_batches = data.train_batches(train_examples, tc.queries_per_batch, seed=tc.seed, epoch=epoch)
        reranker.train()
        loss, terms = model(llm, template, epoch_batches[index], tokens, tc.margin)
        (loss * world()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world() > 1:  # the whole batch's loss and active hinges: the sum of the shares
            loss, active = (sum(v) for v in zip(*gather((loss.item(), terms["active"].item()))))
        else:
            loss, active = loss.item(), terms["active"].item()
        bar.set_postfix(loss=f"{loss:.3f}")
        if (step + 1) % tc.eval_every == 0 or step + 1 == tc.steps:
            record = dev_check(llm, template, reranker, dev, tc.margin, tokens)
            state["history"].append({"step": step + 1, "train_loss": round(loss, 6),
                                     "train_active": round(active, 4), **record})
            improved = record[SELECT_ON] > state["best_dev"][SELECT_ON]
            log(f"{name}: step {step + 1} train loss {loss:.4f}, {dev_line(record)}"
                + (" (best)" if improved else ""))
            if improved:
                state.update(best_dev=record, best_step=step + 1, bad_checks=0, best=snapshot())
            else:
                state["bad_checks"] += 1
            state["step"] = step + 1
            if rank() == 0:
                save_resume(resume_files, reranker, optimizer, state, [asdict(reranker.cfg), asdict(tc)])
    bar.close()
    reranker.load_state_dict(state["best"])
    best = state["best_dev"][SELECT_ON]
    log(f"{name}: keeping the module of step {state['best_step']} (dev {SELECT_ON} {best:.4f})"
        + (": no training step beat the untrained module on dev" if state["best_step"] == 0 else ""))
    return reranker.eval(), state


def save_resume(files, reranker, optimizer, state, config):
    """Everything training needs to continue, without pickle (a pickle runs code when read): the
    tensors (module, best module, AdamW moments, RNG states) as safetensors, the rest as JSON,
    written last, so the JSON's presence means the pair is complete."""
    json_file, tensor_file = files
    optim = optimizer.state_dict()
    tensors = {**{f"module.{k}": v for k, v in reranker.state_dict().items()},
               **{f"best.{k}": v for k, v in state["best"].items()},
               **{f"optimizer.{i}.{k}": v for i, moments in optim["state"].items() for k, v in moments.items()},
               "rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    atomic_save(lambda f: save_file({k: v.detach().contiguous() for k, v in tensors.items()}, f), tensor_file)
    meta = {"config": config, "param_groups": optim["param_groups"],
            "state": {k: v for k, v in state.items() if k != "best"}}
    atomic_save(lambda f: Path(f).write_text(json.dumps(meta)), json_file)


def load_resume(files, reranker, optimizer, config):
    """The training state save_resume wrote, loaded into `reranker` and `optimizer`; the RNG
    continues where it was (dropout masks as if never interrupted). Returns train()'s state."""
    json_file, tensor_file = files
    meta = json.loads(json_file.read_text())
    if meta["config"] != config:
        raise ValueError(f"{json_file} was written with other settings; "
                         f"rerun with the same flags or without --resume")
    tensors, device = load_file(tensor_file), next(reranker.parameters()).device
    part = {kind: {k[len(kind) + 1:]: v for k, v in tensors.items() if k.startswith(kind + ".")}
            for kind in ("module", "best", "optimizer")}
    reranker.load_state_dict(part["module"])
    moments = {}
    for key, value in part["optimizer"].items():
        index, name = key.split(".", 1)
        moments.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": moments, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return {**meta["state"], "best": {k: v.to(device) for k, v in part["best"].items()}}


def trainable_state(reranker):
    return {k: v for k, v in reranker.named_parameters() if v.requires_grad}


def atomic_save(write, path):
    """Write to a temporary file beside `path`, then rename: an interruption never leaves half a file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:  # a failed write (disk full, an error) leaves no temporary file behind
        tmp.unlink(missing_ok=True)


def save_module(reranker, path, extra):
    """Only the trainable parameters (never the frozen LLM) + a JSON config beside them."""
    atomic_save(lambda f: save_file({k: v.contiguous() for k, v in trainable_state(reranker).items()}, f), path)
    config = {"qpeft": asdict(reranker.cfg), **extra}
    atomic_save(lambda f: Path(f).write_text(json.dumps(config, indent=1)), path.with_suffix(".json"))


def load_module(path, llm, template_for):
    """A saved module: its config from the JSON beside `path`, weights checked by name and shape."""
    path = Path(path)
    config_file = path.with_suffix(".json")
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: the module's config is missing (expected beside {path.name})")
    try:
        cfg = QPEFTConfig(**json.loads(config_file.read_text())["qpeft"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:  # TypeError: an unknown or missing field
        raise ValueError(f"{config_file}: not a module config ({type(e).__name__}: {e})") from None
    reranker = Reranker(cfg, llm, template_for(cfg))
    saved, expected = load_file(path), trainable_state(reranker)
    for name in expected.keys() | saved.keys():
        if name not in saved or name not in expected or saved[name].shape != expected[name].shape:
            raise ValueError(f"{path}: tensor '{name}' is missing, unexpected or mis-shaped for method {cfg.method}")
    reranker.load_state_dict(saved)
    return reranker.eval()


# ---------------------------------------------------------------------------------------------
# Reranking
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def rerank(llm, template, rerankers, candidates, tokens, token_budget, desc, prefixes=None):
    """Scores {method: {qid: {docid: score}}} for every (query, candidate) pair. Passages are
    batched by a token budget (length-bucketed); each batch's keys/values are computed once and
    shared by every method with the frozen instruction and by every query that has the passage.
    `prefixes`, a dict, keeps those keys/values for the next call on the same candidates (a
    training run's dev checks: the frozen prefix does not change). desc None: no progress bar."""
    pairs_of = {}
    for qid, docids in candidates.items():
        for d in docids:
            pairs_of.setdefault(d, []).append(qid)
    docids = sorted(pairs_of)
    lengths = [len(template.prefix(tokens.passages[d])) for d in docids]
    batches = data.token_budget_batches(lengths, token_budget)
    seconds = {m: 0.0 for m in rerankers}
    shared_seconds, keys = 0.0, []
    mine = range(rank(), len(batches), world())  # under torchrun: every world()-th passage batch
    values = {m: [] for m in rerankers}           # score tensors, read back to the host once at the end
    for b in tqdm(mine, desc=desc, unit="batch", disable=desc is None or rank() > 0):
        batch = batches[b]
        passages = [tokens.passages[docids[i]] for i in batch]
        start = time.perf_counter()
        if prefixes is not None and b in prefixes:
            shared = prefixes[b]
        elif any(r.cfg.method != "prompt" for r in rerankers.values()):
            shared = encode_prefixes(llm, template, None, passages)
        if prefixes is not None:
            prefixes[b] = shared
        shared_seconds += time.perf_counter() - start
        pairs = [(row, qid) for row, i in enumerate(batch) for qid in pairs_of[docids[i]]]
        keys += [(qid, docids[batch[row]]) for row, qid in pairs]  # every method scores them in this order
        for method, reranker in rerankers.items():
            start = time.perf_counter()
            own_prompt = reranker.cfg.method == "prompt"
            prefix = encode_prefixes(llm, template, reranker, passages) if own_prompt else shared
            for chunk in range(0, len(pairs), len(batch)):  # suffix batches no larger than the passage batch
                part = pairs[chunk:chunk + len(batch)]
                values[method].append(score_pairs(llm, template, reranker, prefix, [r for r, _ in part],
                                                  [tokens.queries[q] for _, q in part],
                                                  [passages[r] for r, _ in part]))
            seconds[method] += time.perf_counter() - start
    scores = {m: {} for m in rerankers}
    for method in rerankers:  # one host read per method; then every process gets every score
        pairs = zip(keys, torch.cat(values[method]).tolist() if values[method] else [])
        for share in gather([(qid, docid, value) for (qid, docid), value in pairs]):
            for qid, docid, value in share:
                scores[method].setdefault(qid, {})[docid] = value
    # Each method is charged the shared passage pass too, as if it had run alone; under torchrun
    # the slowest process's time.
    timing = {m: max(gather(seconds[m] + (shared_seconds if r.cfg.method != "prompt" else 0.0)))
              for m, r in rerankers.items()}
    return scores, timing


def with_tail(scores, first_stage):
    """A full run: reranked candidates first, then the rest of the first stage in its order, with
    scores strictly below every reranked one (distinct float32 values: no invented ties)."""
    run = {}
    for qid, ranked in first_stage.items():
        run[qid] = dict(scores.get(qid, {}))
        floor = min(run[qid].values(), default=0.0)
        rest = [d for d in ranked if d not in run[qid]]
        for i, d in enumerate(rest):
            run[qid][d] = floor - 1.0 - i
    return run


# The table's measures: graded qrels (TREC DL) show recall, binary QA labels the paper's hit rates.
SHOWN_GRADED = {"ndcg_cut_10": "nDCG@10", "mrr_10": "MRR@10", "recall_10": "R@10", "recall_20": "R@20",
                "success_5": "HR@5"}
SHOWN_BINARY = {"ndcg_cut_10": "nDCG@10", "mrr_10": "MRR@10", "success_1": "HR@1", "success_5": "HR@5",
                "success_20": "HR@20"}
MEASURES = ["ndcg_cut_10", "recall_10", "recall_20", "success_1", "success_5", "success_20"]


def evaluate_run(run, qrels, level):
    """Per-query values of MEASURES and MRR@10 (= recip_rank on the top 10: trec_eval's has no cutoff)."""
    per_query = ir.evaluate(qrels, run, MEASURES, relevance_level=level)
    mrr = ir.evaluate(qrels, ir.cut_run(run, 10), ["recip_rank"], relevance_level=level)
    for qid in per_query:
        per_query[qid]["mrr_10"] = mrr[qid]["recip_rank"]
    return per_query


def mean_over_seeds(per_query_runs):
    """{qid: {measure: mean over the runs}}: one trained method's per-query values over its seeds."""
    first = per_query_runs[0]
    return {q: {m: sum(r[q][m] for r in per_query_runs) / len(per_query_runs) for m in first[q]}
            for q in first}


def ndcg_delta(per_query, name, base):
    """Mean nDCG@10 of `name` minus `base` and the two-sided paired t-test p-value over queries
    (None with fewer than 2 queries: no test is possible)."""
    a = {q: v["ndcg_cut_10"] for q, v in per_query[base].items()}
    b = {q: v["ndcg_cut_10"] for q, v in per_query[name].items()}
    if len(a.keys() & b.keys()) < 2:
        return statistics.fmean(b[q] - a[q] for q in a.keys() & b.keys()), None
    delta, _, p = ir.paired_t_test(a, b)
    return delta, p


# ---------------------------------------------------------------------------------------------
# Python API: the same scoring path as the command line (rerank, load_module)
# ---------------------------------------------------------------------------------------------
class Ranker:
    """A frozen LLM with one reranker, zero-shot or a trained module, for your own code:

        ranker = qpeft.load_ranker()                      # or load_ranker(adapter="runs/qpeft/qpeft-a.safetensors")
        ranker.rank("capital of france", ["Berlin is ...", "Paris is ..."], top_k=1)  # [(1, -2.3)]
    """

    def __init__(self, llm, tokenizer, reranker, token_budget=4096):
        self.llm, self.tokenizer, self.reranker, self.token_budget = llm, tokenizer, reranker, token_budget
        self.template = Template(tokenizer, reranker.cfg.instruction)

    def rerank(self, queries, candidates, corpus):
        """{qid: {docid: score}} for queries {qid: text}, candidates {qid: [docid]} and corpus
        {docid: text}; each passage's keys/values are computed once for every query that meets it.
        Scores are mean log-probabilities of the query: higher is better."""
        cfg = self.reranker.cfg
        texts = {d: " " + corpus[d] for docs in candidates.values() for d in docs}
        tokens = TokenIds(passages=cut_to(data.tokenize_texts(self.tokenizer, texts), cfg.max_passage_tokens),
                          queries=cut_to(data.tokenize_texts(self.tokenizer, queries), cfg.max_query_tokens))
        scores, _ = rerank(self.llm, self.template, {"ranker": self.reranker}, candidates, tokens,
                           self.token_budget, None)
        return {q: scores["ranker"].get(q, {}) for q in candidates}

    def score(self, query, passages):
        """[score of each passage] for one query, in the passages' order."""
        ids = [str(i) for i in range(len(passages))]
        scores = self.rerank({"q": query}, {"q": ids}, dict(zip(ids, passages)))["q"]
        return [scores[i] for i in ids]

    def rank(self, query, passages, ids=None, top_k=None):
        """[(id, score)] best first (ids default to the passages' positions), the top_k first only."""
        ids = list(range(len(passages))) if ids is None else list(ids)
        ranked = sorted(zip(ids, self.score(query, passages)), key=lambda pair: -pair[1])
        return ranked[:top_k] if top_k else ranked


def load_ranker(model="SmolLM2-135M-Instruct", adapter=None, device="auto", dtype=None):
    """A Ranker: the frozen `model` (a name under $QPEFT_HOME/models or a folder) on `device`,
    zero-shot, or with the trained module `adapter` (a .safetensors written by qpeft.py)."""
    device = setup_device(device)
    llm, tokenizer = load(model, dtype=dtype or default_dtype(device), device=device)
    if adapter is None:
        reranker = Reranker(QPEFTConfig(method="zeroshot"), llm, Template(tokenizer, QPEFTConfig().instruction))
    else:
        reranker = load_module(adapter, llm, lambda cfg: Template(tokenizer, cfg.instruction))
    return Ranker(llm, tokenizer, reranker)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
PRESETS = {
    # The default: about 4 minutes on a 2-core CPU (README has the measured wall time).
    "laptop": dict(depth=30, steps=100, methods="zeroshot,qpeft-a", train_data="", seeds=1),
    # The paper's protocol as far as this data allows: all 100 candidates, more steps, 1,474 train queries.
    "paper": dict(depth=100, steps=1500, methods="zeroshot,prompt,qpeft-r,qpeft-a", train_data="msmarco_train_extra",
                  lr=3e-2, eval_every=100, patience=6, seeds=3),
}


# Every numeric flag's range, checked at parse time: (lowest allowed, first not allowed or None).
RANGES = {"depth": (1, None), "token_budget": (1, None), "train_queries": (0, None), "seeds": (1, None),
          "top_k": (1, None), "heads": (1, None), "dropout": (0.0, 1.0), "max_passage_tokens": (1, None),
          "max_query_tokens": (1, None),
          "steps": (0, None), "queries_per_batch": (1, None), "lr": (0.0, None), "weight_decay": (0.0, None),
          "margin": (0.0, None), "eval_every": (1, None), "patience": (1, None), "dev_queries": (1, None),
          "dev_depth": (1, None), "seed": (0, None)}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="dataset name under $QPEFT_HOME/data, or a BEIR-format folder")
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="model name under $QPEFT_HOME/models, or a folder")
    p.add_argument("--preset", default="laptop", choices=sorted(PRESETS), help="defaults for the flags below")
    p.add_argument("--methods", help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--depth", type=int, help="rerank the top-N first-stage candidates")
    p.add_argument("--split", default="test", help="the split to rerank and report")
    p.add_argument("--train-data", help="extra train-only dataset folders, comma-separated (e.g. msmarco_train_extra)")
    p.add_argument("--out", default="runs/qpeft", help="output folder: runs, metrics.json, modules, log")
    p.add_argument("--checkpoint", help="saved module(s), comma-separated (.safetensors, each with its .json beside it)")
    p.add_argument("--eval-only", action="store_true", help="rerank with --checkpoint, no training")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (auto: cuda when "
                   "available); under torchrun each process takes cuda:LOCAL_RANK")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="LLM compute dtype; auto: bfloat16 on CUDA and where the CPU multiplies it "
                   "natively, else float32")
    p.add_argument("--token-budget", type=int, default=4096, help="prompt tokens per scoring batch")
    p.add_argument("--compile", action="store_true", help="torch.compile the LLM's blocks for reranking "
                   "(0.85-1.30x eager's scoring speed in bench runs on a 2-core CPU; the 15-30 s of compiling counts in pairs/s; "
                   "needs a C++ compiler)")
    p.add_argument("--train-queries", type=int, default=0, help="use only the first N train queries (0 = all)")
    p.add_argument("--seeds", type=int, help="train and score each trained method with N seeds (--seed, "
                   "--seed + 1, ...); the table gives the mean and SD over them")
    for f in fields(QPEFTConfig):
        if f.name != "method":
            add_field(p, f)
    for f in fields(TrainConfig):
        add_field(p, f)
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for name, (low, high) in RANGES.items():
        value = getattr(args, name, None)
        if value is not None and not (low <= value and (high is None or value < high)):
            bound = f">= {low}" + (f" and < {high}" if high is not None else "")
            p.error(f"--{name.replace('_', '-')}: {value} is out of range (must be {bound})")
    if args.eval_only and not args.checkpoint:
        p.error("--eval-only needs --checkpoint FILE")
    if args.checkpoint and not args.eval_only:
        p.error("--checkpoint needs --eval-only (saved modules are reranked as they are, not trained)")
    if unknown := [m for m in args.methods.split(",") if m not in METHODS]:
        p.error(f"--methods: unknown method {unknown[0]!r} (choose from {', '.join(METHODS)})")
    return args


def add_field(parser, f):
    flag = "--" + f.name.replace("_", "-")
    if f.type in (bool, "bool"):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
    else:
        parser.add_argument(flag, type={"int": int, "float": float, "str": str}.get(f.type, f.type), default=None)


def pick(dataclass_type, args):
    """A config from the CLI: flags that were given, else the preset's, else the dataclass default."""
    given = {f.name: getattr(args, f.name) for f in fields(dataclass_type) if getattr(args, f.name, None) is not None}
    return dataclass_type(**given)


def make_dev_set(dataset, tc):
    """The dev queries a training run is checked on: the first `dev_queries` of the completely
    judged split where there is one (dev.graded), else of dev; the loss terms use those of them
    that have a positive and a hard negative."""
    if "dev" not in dataset.splits:
        raise ValueError(f"{dataset.path} has no dev split (qrels/dev.tsv), needed to choose the module; "
                         f"use --eval-only --checkpoint FILE to rerank with a trained module")
    split = "dev.graded" if "dev.graded" in dataset.splits else "dev"
    first_stage = dataset.first_stage(split, 1000)
    qids = [q for q in dataset.qrels[split] if first_stage[q]][:tc.dev_queries]
    examples = [e for e in data.training_examples(dataset, split, seed=0) if e.qid in qids]
    return DevSet(split, data.train_batches(examples, tc.queries_per_batch, seed=0),
                  {q: list(first_stage[q])[:tc.dev_depth] for q in qids}, {q: first_stage[q] for q in qids},
                  {q: dataset.qrels[split][q] for q in qids}, dataset.relevance_level(split))


def provenance(args, argv, device, data_folders):
    """What a number depends on, recorded beside it in metrics.json: every resolved flag, the
    qpeft commit, versions, the device, and fingerprints of the model and of every data file read.
    Fingerprints are sha256: of the model's config.json and safetensors headers (names, shapes,
    dtypes, offsets: any other checkpoint changes them, and the weights are never read again), and
    of each data file whole (msmarco_small: 7.1 MB in 10 files, 45 ms on a busy 2-core CPU)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        commit += "+uncommitted changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    model = find_asset(args.model, "models")
    digest = hashlib.sha256((model / "config.json").read_bytes())
    for file in sorted(model.glob("*.safetensors")):
        with open(file, "rb") as f:
            size = f.read(8)
            digest.update(size + f.read(int.from_bytes(size, "little")))
    files = [f for folder in data_folders for pattern in ("*.jsonl", "qrels/*.tsv", "runs/*.trec")
             for f in sorted(folder.glob(pattern))]
    return {"argv": argv if argv is not None else sys.argv[1:], "flags": vars(args), "qpeft_commit": commit,
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": __import__("numpy").__version__, "device": str(device) if device.type != "cpu" else
            f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
            "processes": world(), "model": {"path": str(model), "sha256": digest.hexdigest()},
            "data": {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}}


def cut_to(ids, limit, what="", log=None):
    """Token ids cut to `limit` (keeping the start), and a log line saying how many were cut."""
    cuts = [len(v) - limit for v in ids.values() if len(v) > limit]
    if cuts and log:
        log(f"{what}: {len(cuts)} of {len(ids)} cut to {limit} tokens, by {statistics.fmean(cuts):.1f} "
            f"tokens on average")
    return {k: v[:limit] for k, v in ids.items()}


def check_positions(llm, template, tokens, cfg):
    """The longest sequence any pair can make must fit the model's max_position_embeddings."""
    if llm.cfg.max_positions is None or not tokens.queries:
        return
    qid, query = max(tokens.queries.items(), key=lambda item: len(item[1]))
    hints = len(template.hints_open) + len(template.hints_close) + max(len(query), cfg.top_k)
    longest = len(template.prefix(max(tokens.passages.values(), key=len, default=[]))) + hints \
        + len(template.question) + len(query) + 1
    if longest > llm.cfg.max_positions:
        raise ValueError(f"query {qid!r}: its longest sequence has {longest} tokens, more than the model's "
                         f"{llm.cfg.max_positions} positions (lower --max-query-tokens or --max-passage-tokens)")


def run_name(method, seed, seeds):
    """Files and log lines of one trained run: the method's name, with the seed when there are several."""
    return method if seeds == 1 else f"{method}-seed{seed}"


def main(argv=None):
    """The command line. Errors in the input (data, model folder, module, flags) are one line,
    `qpeft.py: error: ...`, and exit code 2, as in eval.py; --debug shows their traceback."""
    args = parse_args(argv)
    try:
        run_command(args, argv)
    except (ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"qpeft.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run_command(args, argv):
    out, held = Path(args.out), []  # --out is made only once the inputs are read and checked

    def log(message):  # rank 0 only: to the terminal (around progress bars) and to out/log.txt
        if rank() == 0:
            tqdm.write(message)
            held.append(message)
            if out.is_dir():
                with open(out / "log.txt", "a", encoding="utf-8") as f:
                    f.write("\n".join(held) + "\n")
                held.clear()

    # bad data fails before the minutes of loading a model
    dataset = data.load_dataset(args.data)
    extra_train = [data.load_dataset(n) for n in args.train_data.split(",") if n]
    device = setup_device(args.device)
    dtype = default_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
    start = run_start = time.perf_counter()
    llm, tokenizer = load(args.model, dtype=dtype, device=device)
    log(f"$ python qpeft.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    where = f"cpu x {torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    log(f"model {args.model}: {sum(p.numel() for p in llm.parameters()) / 1e6:.1f}M frozen parameters, "
        f"{str(dtype)[len('torch.'):]}, {where}" + (f", {world()} processes" if world() > 1 else "")
        + f", loaded in {time.perf_counter() - start:.1f} s")
    base_cfg = pick(QPEFTConfig, args)
    tc = pick(TrainConfig, args)
    if "qpeft-a" in args.methods.split(",") and llm.cfg.dim % base_cfg.heads:
        raise ValueError(f"--heads {base_cfg.heads} does not divide the width of {args.model} ({llm.cfg.dim})")

    def template_for(cfg):
        return Template(tokenizer, cfg.instruction)

    template = template_for(base_cfg)
    # Queries without candidates are left out, like trec_eval leaves out queries missing from a run.
    first_stage = dataset.first_stage(args.split, 1000)
    if empty := [q for q in first_stage if not dataset.queries[q].strip()]:
        log(f"warning: {len(empty)} {args.split} queries have no text and are skipped ({', '.join(empty[:3])})")
    first_stage = {q: docs for q, docs in first_stage.items() if docs and q not in empty}
    candidates = {q: list(docs)[:args.depth] for q, docs in first_stage.items()}
    rerankers = {}
    if args.eval_only:  # several modules share one pass over the passages (if they share the instruction)
        for file in args.checkpoint.split(","):
            name = Path(file).stem
            if name in rerankers or name in ("bm25", "zeroshot"):
                raise ValueError(f"--checkpoint: two rows would be called {name!r} ({file}); rename the module")
            reranker = load_module(file, llm, template_for)
            rerankers[name] = reranker
            template, base_cfg = template_for(reranker.cfg), reranker.cfg
        if len({(r.cfg.instruction, r.cfg.max_passage_tokens, r.cfg.max_query_tokens)
                for r in rerankers.values()}) > 1:
            raise ValueError("--checkpoint: the modules differ in instruction or max_passage/query_tokens")
    # with --eval-only: the saved modules, and zero-shot beside them when --methods lists it
    methods = (["zeroshot"] if "zeroshot" in args.methods.split(",") else []) + list(rerankers) \
        if args.eval_only else args.methods.split(",")
    trained = [] if args.eval_only else [m for m in methods if m != "zeroshot"]
    seeds = [tc.seed + i for i in range(args.seeds)]
    texts = {d: " " + dataset.corpus[d] for docs in candidates.values() for d in docs}
    queries = {q: dataset.queries[q] for q in candidates}
    train_examples, dev = {}, None
    if trained:
        train_set = data.merge_datasets(dataset, *extra_train)
        if "train" not in train_set.splits:
            raise ValueError(f"{dataset.path} has no train split (qrels/train.tsv) to train {', '.join(trained)}; "
                             f"use --eval-only --checkpoint FILE to rerank with a trained module")
        for seed in seeds:  # the seed draws each query's positive and hard negative too
            train_examples[seed] = data.training_examples(train_set, "train", seed=seed)[:args.train_queries or None]
            if not train_examples[seed]:
                raise ValueError(f"{train_set.name}: the train split has no query with a positive and a hard negative")
        dev = make_dev_set(dataset, tc)
        if not dev.batches:
            raise ValueError(f"{dataset.name}: the {dev.split} split has no query with a positive and a hard negative")
        dev_examples = [e for b in dev.batches for e in b]
        for e in [e for ex in train_examples.values() for e in ex] + dev_examples:
            texts[e.positive_docid] = " " + train_set.corpus[e.positive_docid]
            texts[e.hard_negative_docid] = " " + train_set.corpus[e.hard_negative_docid]
            queries[e.qid] = train_set.queries[e.qid]
        texts.update({d: " " + dataset.corpus[d] for docs in dev.candidates.values() for d in docs})
        queries.update({q: dataset.queries[q] for q in dev.candidates})
    tokens = TokenIds(passages=cut_to(data.tokenize_texts(tokenizer, texts), base_cfg.max_passage_tokens,
                                      "passages", log),
                      queries=cut_to(data.tokenize_texts(tokenizer, queries), base_cfg.max_query_tokens,
                                     "queries", log))
    check_positions(llm, template, tokens, base_cfg)
    record = provenance(args, argv, device, [dataset.path] + [d.path for d in extra_train])
    out.mkdir(parents=True, exist_ok=True)
    log(f"provenance: qpeft {record['qpeft_commit']}, python {record['python']}, torch {record['torch']}, "
        f"{record['device']}, model sha256 {record['model']['sha256'][:12]}, {len(record['data'])} data files "
        f"fingerprinted (all in metrics.json)")
    log(f"data {args.data}: {len(candidates)} {args.split} queries x depth {args.depth}")
    if trained:
        first = train_examples[seeds[0]]
        sources = ", ".join(f"{n} {k}" for k, n in Counter(e.negative_source for e in first).items())
        log(f"train: {len(first)} queries, hard negatives from: {sources} (data.hard_negative_pool); "
            f"dev: {len(dev.candidates)} queries of {dev.split} (depth {tc.dev_depth}; {len(dev_examples)} with a "
            f"positive and a hard negative for the loss terms), modules chosen on dev {SELECT_ON}")
        zeroshot_dev = dev_check(llm, template, Reranker(QPEFTConfig(method="zeroshot"), llm, template), dev,
                                 tc.margin, tokens)
        log(f"zeroshot: {dev_line(zeroshot_dev)} (the dev reference)")

    # Merged per method and split: another command's methods and splits in this --out stay.
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    groups = {m: [m] for m in methods if m not in trained}  # table row -> its runs (one per seed)
    if "zeroshot" in groups:
        rerankers["zeroshot"] = Reranker(QPEFTConfig(method="zeroshot"), llm, template)
    for method in trained:
        groups[method] = []
        for seed in seeds:
            name = run_name(method, seed, len(seeds))
            rerankers[name] = train_or_reuse(llm, template_for, method, base_cfg, replace(tc, seed=seed),
                                             train_examples[seed], dev, tokens, args, out, log, metrics, name)
            groups[method].append(name)

    if args.compile:  # after training: compiling the backward graphs took longer than it saved
        llm.compile_blocks()
    scores, timing = rerank(llm, template, rerankers, candidates, tokens, args.token_budget, f"rerank {args.split}")
    bad = next(((m, q, d, v) for m, per_query in scores.items() for q, docs in per_query.items()
                for d, v in docs.items() if not math.isfinite(v)), None)
    if bad:  # NaN or inf would reach the runs and the table
        raise ValueError(f"{bad[0]} scored query {bad[1]!r} passage {bad[2]!r} as {bad[3]} (model {args.model}): "
                         f"non-finite scores are not ranked")
    if rank() == 0:  # every score is here: rank 0 evaluates and writes
        report(dataset, args, out, log, metrics, first_stage, candidates, groups, rerankers, scores, timing,
               record)
    log(f"total wall time {time.perf_counter() - run_start:.0f} s; runs, modules and metrics.json in {out}/")
    if dist.is_initialized():
        dist.destroy_process_group()


def train_or_reuse(llm, template_for, method, base_cfg, tc, train_examples, dev, tokens, args, out, log,
                   metrics, name):
    """One trained run: its module trained (or, with --resume, reloaded) and saved, and its training
    record in metrics[name]["training"]."""
    cfg = QPEFTConfig(**{**asdict(base_cfg), "method": method})
    template = template_for(cfg)
    module_file = out / f"{name}.safetensors"
    if args.resume and module_file.exists():
        reranker = load_module(module_file, llm, template_for)
        if reranker.cfg != cfg:  # its prompt, cut or shape would not match this run's
            raise ValueError(f"{module_file} was trained with other settings "
                             f"({asdict(reranker.cfg)}); rerun with the same flags or without --resume")
        log(f"{name}: reusing trained module {module_file} (training flags such as --steps are ignored)")
        return reranker
    torch.manual_seed(tc.seed)  # a method's initial weights do not depend on which methods ran before
    reranker = Reranker(cfg, llm, template)
    log(f"{name}: {reranker.trainable_parameters():,} trainable parameters (fp32), seed {tc.seed}")
    start = time.perf_counter()
    reranker, state = train(llm, template, reranker, train_examples, dev, tokens, tc, out, log,
                            resume=args.resume, name=name)
    seconds = time.perf_counter() - start
    if rank() == 0:
        save_module(reranker, module_file, {"train": asdict(tc), "model": args.model, "data": args.data,
                                            "history": state["history"], "train_seconds": seconds})
    metrics.setdefault(name, {})["training"] = {
        "seconds": round(seconds, 1), "seed": tc.seed, "steps": state["step"], "best_step": state["best_step"],
        "best_dev": state["best_dev"], "dev_split": dev.split, "train_queries": len(train_examples),
        "history": state["history"]}
    if rank() == 0:
        for suffix in ("json", "safetensors"):
            (out / f"{name}.resume.{suffix}").unlink(missing_ok=True)
    return reranker


def report(dataset, args, out, log, metrics, first_stage, candidates, groups, rerankers, scores, timing,
           record):
    """Run files for every run, then one metrics entry and table row per method: the mean over its
    seeds of each measure, their SD, and deltas with paired t-tests over queries on the per-query
    mean over seeds."""
    qrels, level = dataset.qrels[args.split], dataset.relevance_level(args.split)
    runs = {"bm25": first_stage, **{name: with_tail(scores[name], first_stage) for name in rerankers}}
    per_run = {}
    for name, run in runs.items():
        ir.write_run(out / f"{name}.{args.split}.trec", run, tag=name.replace("-", "_"))
        per_run[name] = evaluate_run(run, qrels, level)
    per_query = {"bm25": per_run["bm25"]}
    per_query.update({row: mean_over_seeds([per_run[n] for n in names]) for row, names in groups.items()})
    n_pairs = sum(len(c) for c in candidates.values())
    for row in per_query:
        entry = {**ir.summarize(per_query[row]), "queries": len(per_query[row])}
        for base in ("bm25", "zeroshot"):
            if base in per_query and row not in (base, "bm25"):
                entry[f"ndcg_cut_10_delta_{base}"], entry[f"ndcg_cut_10_p_{base}"] = ndcg_delta(per_query, row, base)
        if row in groups:
            names = groups[row]
            per_seed = {n: ir.summarize(per_run[n]) for n in names}
            entry.update(
                runs=names, per_run=per_seed,
                sd={m: statistics.stdev(v[m] for v in per_seed.values()) if len(names) > 1 else 0.0
                    for m in entry if m in MEASURES + ["mrr_10"]},
                best_steps=[metrics.get(n, {}).get("training", {}).get("best_step") for n in names],
                pairs_per_s=round(n_pairs * len(names) / sum(timing[n] for n in names), 2), depth=args.depth,
                trainable_parameters=rerankers[names[0]].trainable_parameters())
        metrics.setdefault(row, {})[args.split] = {**entry, "provenance": record}
    atomic_save(lambda f: Path(f).write_text(json.dumps(metrics, indent=1)), out / "metrics.json")
    binary = all(g <= 1 for judged in qrels.values() for g in judged.values())
    log(results_table({row: metrics[row][args.split] for row in per_query}, args.split, level, args.depth,
                      SHOWN_BINARY if binary else SHOWN_GRADED))


def results_table(results, split, level, depth, shown):
    """One row per method: the `shown` means (over seeds for trained methods, with nDCG@10's SD),
    nDCG@10 deltas to BM25 and zero-shot with p-values, the dev-chosen step of each seed, speed."""
    lines = [f"{split}: {results['bm25']['queries']} queries, BM25 top-{depth} reranked; trec_eval semantics "
             f"(nDCG graded; MRR/R/HR at relevance >= {level}; queries in both run and qrels); trained "
             f"methods: mean over seeds (SD of nDCG@10); p: paired t-test over queries",
             f"{'method':10}{'seeds':>6}" + "".join(f"{v:>9}" for v in shown.values()) + f"{'SD':>8}"
             + f"{'Δ BM25':>9}{'p':>7}{'Δ zero':>9}{'p':>7}{'pairs/s':>9}  best step"]
    for name, r in results.items():
        runs = len(r.get("runs", [])) or ""
        row = f"{name:10}{runs:>6}" + "".join(f"{r[m]:9.4f}" for m in shown)
        row += f"{r['sd']['ndcg_cut_10']:8.4f}" if runs and runs > 1 else f"{'':8}"
        for base in ("bm25", "zeroshot"):
            key = f"ndcg_cut_10_delta_{base}"
            p = r.get(f"ndcg_cut_10_p_{base}")
            row += (f"{r[key]:+9.4f}" + (f"{p:7.3f}" if p is not None else f"{'n/a':>7}")) if key in r else f"{'':16}"
        row += f"{r['pairs_per_s']:9.1f}" if "pairs_per_s" in r else ""
        steps = [s for s in r.get("best_steps", []) if s is not None]
        lines.append(row + (f"  {','.join(map(str, steps))}" if steps else ""))
    if results["bm25"]["queries"] < 2:
        lines.append("p: n/a, a paired test needs at least 2 queries")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
