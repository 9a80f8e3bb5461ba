"""Q-PEFT: query-dependent parameter-efficient fine-tuning for LLM reranking: the method.

Peng, Wu, Wang, Rajanala, Fang. "Q-PEFT: Query-dependent Parameter Efficient Fine-tuning for Text
Reranking with Large Language Models", arXiv 2404.04522 (2024); official code zhiyuanpeng/Q-PEFT.
Spec: ../shared/docs/method.md. A frozen LLM scores a (query, passage) pair by query likelihood,

    [bos] P "\\nPassage:" " {passage}" " \\n" H "Question: \\n" {query} eos

(the spec's template; the newline after the instruction P is our choice, so that "Passage:" starts
a line). score = mean log-probability of the query tokens and eos. E is the LLM's embedding table,
E' a trainable copy of it. Four rerankers differ in what trains:
  zeroshot  nothing             P frozen, no H
  prompt    P (soft prompt)     P trainable (Lester et al.), no H
  qpeft-r   E' and the MLP      H = MLP(E'("hints: "), E'(top-k passage tokens), E'("\\n"))
  qpeft-a   E', attention, MLP  H = MLP(E'("hints: "), attention(E'(query), E(passage)), E'("\\n"))

Fast path: P and the passage come before anything query-dependent, so their keys/values are
computed once per passage (P's once per batch of passages) and reused for every query and every
method that meets the passage; only H, "Question: \\n" and the query run per pair, and logits
are computed only where the query is predicted.
"""

import math
import numbers
import random
from collections import Counter
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("zeroshot", "prompt", "qpeft-r", "qpeft-a")


@dataclass
class QPEFTConfig:
    """What a trained module is; saved next to its weights."""

    method: str = "qpeft-a"  # one of METHODS
    instruction: str = "given the hints, please generate a question for the input passage"
    top_k: int = 15  # qpeft-r: hint tokens taken from the passage (paper: 10-20)
    heads: int = 2  # qpeft-a: attention heads (paper: 2)
    dropout: float = 0.1  # qpeft-a: attention dropout while training (paper: 0.1)
    train_embeddings: bool = True  # E' = trainable copy of E (paper); False: frozen E, light module
    residual_mlp: bool = False  # H = x + MLP(x), MLP starts at 0 (not in the paper; off = faithful)
    max_passage_tokens: int = 160  # passages are cut to this many tokens, keeping the start
    max_query_tokens: int = 64  # queries too (a query is also the hint block of qpeft-a)

    def __post_init__(self):  # flags, adapter configs and API keywords all pass here
        lowest = dict(top_k=1, heads=1, dropout=0.0, max_passage_tokens=1, max_query_tokens=1)
        check_fields(self, lowest, below={"dropout": 1.0})
        if self.method not in METHODS:
            raise ValueError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        if not self.instruction.strip():
            raise ValueError("instruction: empty")


def check_fields(settings, lowest, below=()):
    """Each field of a settings dataclass has its declared type (an int is no bool, a float is a
    finite number) and lies in [lowest[name], below[name]) where given. ValueError names it."""
    for f in fields(settings):
        value, name = getattr(settings, f.name), f.name
        # an API caller's lr=1 means 1.0, and numpy's int64 / float32 are numbers too
        number = {int: numbers.Integral, float: numbers.Real}.get(f.type)
        if number and isinstance(value, number) and not isinstance(value, bool):
            value = f.type(value)
            setattr(settings, name, value)
        if not isinstance(value, f.type) or (f.type is not bool and isinstance(value, bool)):
            raise ValueError(f"{name}: {value!r} is not a{'n' * (f.type is int)} {f.type.__name__}")
        if f.type is float and not math.isfinite(value):
            raise ValueError(f"{name}: {value} is not finite")
        if value < lowest.get(name, value) or (name in below and value >= below[name]):
            bound = f">= {lowest[name]}" + (f" and < {below[name]}" if name in below else "")
            raise ValueError(f"{name}: {value} is out of range (must be {bound})")


# ---- The input template, tokenised piece by piece -------------------------------------------
class Template:
    """Token ids of the fixed text pieces. Each piece is tokenised on its own and the ids are
    concatenated (not the joined string): a passage's ids, and so its cached keys/values, must
    not depend on the query or the method around it. Passages and queries are tokenised with a
    leading space where a word boundary precedes them, so byte-level BPE sees ' word' as usual
    (sentencepiece marks word starts itself; whether it keeps the leading space depends on the
    model's normalizer)."""

    def __init__(self, tokenizer, instruction):
        self.tokenizer = tokenizer
        self.bos = [tokenizer.bos_id] if tokenizer.add_bos else []  # never part of the soft prompt
        self.prompt = self.piece(instruction)
        self.passage_open = self.piece("\nPassage:")
        self.passage_close = self.piece(" \n")
        self.hints_open = self.piece("hints: ")
        self.hints_close = self.piece("\n")
        self.question = self.piece("Question: \n")
        self.eos = tokenizer.eos_id

    def piece(self, text):
        """`text`'s ids; a piece that encodes to nothing (a newline normalised away) is refused."""
        if not (ids := self.tokenizer.encode(text)):
            raise ValueError(f"the tokenizer encodes the template piece {text!r} to no tokens")
        return ids

    @property
    def head(self):
        """The start of every prefix, the same for all passages: bos, P and "\\nPassage:"."""
        return self.bos + self.prompt + self.passage_open

    def prefix(self, passage_ids):
        """Everything before H: P and the passage."""
        return self.head + passage_ids + self.passage_close


# ---- The trainable part of each method ------------------------------------------------------
class Reranker(nn.Module):
    """The trainable parameters of one method around a frozen LLM. The LLM is passed to every
    call instead of being a submodule, so it is never trained, moved or saved with this module.
    What a method does follows from what its module has: a soft_prompt (prompt), an mlp that
    makes a hint block H (qpeft-r, qpeft-a), and an attention that chooses its input (qpeft-a;
    without it, the top-k tokens of qpeft-r); zeroshot has none of them."""

    def __init__(self, cfg, llm, template):
        super().__init__()
        self.cfg = cfg
        E = llm.tok_embeddings.weight.detach()  # (V, D) frozen
        D = E.shape[1]
        self.soft_prompt = self.hint_embeddings = self.mlp = self.attention = None
        if cfg.method == "prompt":  # soft prompt initialised from the instruction's embeddings
            self.soft_prompt = nn.Parameter(E[template.prompt].float().clone())  # (P, D)
        if cfg.method in ("qpeft-r", "qpeft-a"):
            # E': the official code trains a full copy of the embedding table (initialised = E).
            self.hint_embeddings = (
                nn.Embedding.from_pretrained(E.float().clone(), freeze=False)
                if cfg.train_embeddings
                else None
            )
            self.mlp = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D))
            if cfg.residual_mlp:  # start as the identity: the LLM first sees real token embeddings
                nn.init.zeros_(self.mlp[2].weight), nn.init.zeros_(self.mlp[2].bias)
        if cfg.method == "qpeft-a":
            self.attention = nn.MultiheadAttention(
                D, cfg.heads, dropout=cfg.dropout, batch_first=True
            )
        self.to(E.device)  # on the LLM's device, in fp32

    def trainable_parameters(self):
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def embed_hint_ids(self, llm, ids):
        """E'(ids) in fp32; the frozen table E when E' is not trained."""
        if self.hint_embeddings is None:
            return llm.tok_embeddings(ids).float()
        return self.hint_embeddings(ids)

    def hint_block(self, llm, template, queries, passages):
        """H per pair: a list of (h_i, D) float32 tensors; queries/passages: id lists per pair."""
        dev = llm.tok_embeddings.weight.device
        if self.attention is None:  # qpeft-r
            ids, counts = select_top_k(self, llm, queries, passages, self.cfg.top_k)  # (N, k), (N,)
            opening = torch.tensor(template.hints_open, device=dev).expand(len(ids), -1)  # (N, o)
            closing = torch.tensor(template.hints_close, device=dev).expand(len(ids), -1)  # (N, c)
            rows = torch.cat([opening, ids, closing], dim=1)  # (N, o + k + c)
            # (N, o + k + c): True on the wrapper tokens and on each row's counts[i] hint ids
            real = torch.arange(rows.shape[1], device=dev) < opening.shape[1] + counts[:, None]
            real[:, -closing.shape[1] :] = True
            # One E' lookup for all pairs: each lookup's backward writes a dense (V, D) gradient.
            x = self.embed_hint_ids(llm, rows[real])  # (sum h_i, D)
            lengths = real.sum(1).tolist()
        else:
            # keys/values: the passage's tokens only (the official code used its whole template row)
            q_ids, _ = pad_ids(queries, dev)  # (N, Lq)
            p_ids, p_mask = pad_ids(passages, dev)  # (N, Ld)
            kv = llm.tok_embeddings(p_ids).float()  # (N, Ld, D) frozen E(passage)
            qx = self.embed_hint_ids(llm, q_ids)  # (N, Lq, D) E'(query)
            # (N, Lq, D): one vector per query position; padded passage tokens are masked out
            attended, _ = self.attention(qx, kv, kv, key_padding_mask=~p_mask, need_weights=False)
            opening = self.embed_hint_ids(llm, torch.tensor(template.hints_open, device=dev))
            closing = self.embed_hint_ids(llm, torch.tensor(template.hints_close, device=dev))
            # one vector per real query token, between E'("hints: ") and E'("\n")
            blocks = [
                torch.cat([opening, attended[i, : len(q)], closing]) for i, q in enumerate(queries)
            ]
            lengths = [len(b) for b in blocks]
            x = torch.cat(blocks)  # (sum h_i, D)
        return list(self.hint_mlp(x).split(lengths))  # (h_i, D) each

    def hint_mlp(self, x):
        """H from the hint block's input vectors x (n, D): MLP(x), or x + MLP(x) (residual_mlp)."""
        return x + self.mlp(x) if self.cfg.residual_mlp else self.mlp(x)


# ---- The definition: one pair, one plain forward pass over its whole sequence ---------------
def score(llm, template, reranker, query, passage):
    """The score of one (query, passage) pair as method.md defines it, written plainly: embed

        [bos] P "\nPassage:" " {passage}" " \n" H "Question: \n" {query} eos

    (P the soft prompt for `prompt`; H the hint block of qpeft-r / qpeft-a, absent otherwise),
    run the LLM over the whole sequence once, and average log p(token | everything before it)
    over the query's tokens and eos. reranker: a Reranker (method zeroshot: plain query
    likelihood); query, passage: token ids. Returns a float32 scalar. The fast
    path below (encode_prefixes + score_pairs) computes the same for batches of pairs, sharing
    what does not depend on the query; tests/test_qpeft.py checks that the two agree."""
    dev = llm.tok_embeddings.weight.device
    E = llm.tok_embeddings  # the frozen table
    pieces = [E(torch.tensor(template.prefix(passage), device=dev))]  # (S, D) P + passage
    if reranker.soft_prompt is not None:  # prompt: the trainable P in the instruction's place
        b, P = len(template.bos), len(template.prompt)
        soft_prompt = reranker.soft_prompt.to(pieces[0].dtype)  # (P, D)
        pieces[0] = torch.cat([pieces[0][:b], soft_prompt, pieces[0][b + P :]])
    if reranker.mlp is not None and reranker.attention is None:  # qpeft-r: H from top-k tokens
        hints = top_k_tokens(reranker, llm, query, passage, reranker.cfg.top_k)
        ids = torch.tensor(template.hints_open + hints + template.hints_close, device=dev)
        pieces.append(reranker.hint_mlp(reranker.embed_hint_ids(llm, ids)).to(pieces[0].dtype))
    if reranker.attention is not None:  # qpeft-a: H from attention over the passage
        keys = E(torch.tensor(passage, device=dev)).float()[None]  # (1, Ld, D)
        queries = reranker.embed_hint_ids(llm, torch.tensor(query, device=dev))[None]  # (1, Lq, D)
        attended, _ = reranker.attention(queries, keys, keys, need_weights=False)  # (1, Lq, D)
        opening, closing = (
            reranker.embed_hint_ids(llm, torch.tensor(ids, device=dev))
            for ids in (template.hints_open, template.hints_close)
        )
        block = torch.cat([opening, attended[0], closing])  # (o + Lq + c, D)
        pieces.append(reranker.hint_mlp(block).to(pieces[0].dtype))
    targets = query + [template.eos]
    pieces.append(E(torch.tensor(template.question + targets, device=dev)))
    x = torch.cat(pieces)[None]  # (1, T, D)
    h, _ = llm.hidden(x, torch.arange(x.shape[1], device=dev)[None])  # (1, T, D)
    logprobs = llm.logits(h[0]).log_softmax(-1)  # (T, V) float32
    # position t predicts token t + 1: the n targets are predicted at positions T-n-1 .. T-2
    n, T = len(targets), x.shape[1]
    at = logprobs[T - n - 1 : T - 1]  # (n, V)
    return at.gather(1, torch.tensor(targets, device=dev)[:, None])[:, 0].mean()


@torch.no_grad()
def top_k_tokens(reranker, llm, query, passage, k):
    """Q-PEFT-R's hint ids for one pair, plainly: each distinct passage token id scores the max
    cosine between E'(any query token) and E(it); the k best ids, in score order, ties to the
    earlier position. select_top_k does the same for a batch of pairs at once."""
    dev = llm.tok_embeddings.weight.device
    q = F.normalize(reranker.embed_hint_ids(llm, torch.tensor(query, device=dev)), dim=-1)
    p = F.normalize(llm.tok_embeddings(torch.tensor(passage, device=dev)).float(), dim=-1)
    best = (q @ p.T).max(dim=0).values.tolist() if query else [-1.0] * len(passage)  # (Ld,)
    first = {}  # id -> its score (the same wherever it occurs), in order of first occurrence
    for token, value in zip(passage, best):
        first.setdefault(token, value)
    return sorted(first, key=lambda token: -first[token])[:k]  # sorted() is stable


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
    q_ids, q_mask = pad_ids(queries, dev)  # (N, Lq)
    p_ids, p_mask = pad_ids(passages, dev)  # (N, Ld)
    q = F.normalize(reranker.embed_hint_ids(llm, q_ids), dim=-1)  # (N, Lq, D)
    p = F.normalize(llm.tok_embeddings(p_ids).float(), dim=-1)  # (N, Ld, D)
    cos = (q @ p.transpose(1, 2)).masked_fill(~q_mask[:, :, None], -torch.inf)  # (N, Lq, Ld)
    best = cos.max(dim=1).values if q_ids.shape[1] else torch.zeros_like(p_ids, dtype=q.dtype)
    best = best.clamp(min=-1.0)  # (N, Ld) an empty query: -1
    repeated = (p_ids[:, :, None] == p_ids[:, None, :]).tril(-1).any(-1)  # (N, Ld): id seen earlier
    candidate = p_mask & ~repeated  # (N, Ld): first occurrences
    score = best.masked_fill(~candidate, -2.0)  # (N, Ld): other positions below every cosine
    # stable sort: of equal scores the earlier position comes first
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]  # (N, k')
    return p_ids.gather(1, order), candidate.sum(1).clamp(max=k)


def pad_ids(lists, device, pad=0):
    """Right-padded ids (N, L) and a mask (N, L), True on real tokens."""
    L = max(len(x) for x in lists)
    ids = torch.tensor([x + [pad] * (L - len(x)) for x in lists], dtype=torch.long, device=device)
    mask = torch.tensor([[True] * len(x) + [False] * (L - len(x)) for x in lists], device=device)
    return ids, mask


# ---- Scoring: mean log-probability of query + eos, with passage keys/values computed once ---
def embed_head(llm, template, reranker):
    """Input embeddings (S_head, D) of the head, with the trainable soft prompt in P's place after
    bos for the `prompt` method."""
    head = llm.tok_embeddings(torch.tensor(template.head, device=llm.tok_embeddings.weight.device))
    if reranker is None or reranker.soft_prompt is None:
        return head
    b, P = len(template.bos), len(template.prompt)
    return torch.cat([head[:b], reranker.soft_prompt.to(head.dtype), head[b + P :]])  # (S_head, D)


def encode_prefixes(llm, template, reranker, passages):
    """Keys/values of P + passage for a batch of passages (id lists). P is the frozen instruction,
    or the trainable soft prompt of the `prompt` method (then this runs with gradients).
    The head (bos, P, "\\nPassage:") is the same for every passage and comes first, so its
    keys/values are computed once and every passage attends to that one copy: 16 of a prefix's
    107 tokens on average on msmarco_small. Returns (past, past_mask (Np, S), lengths (Np,))."""
    dev = llm.tok_embeddings.weight.device
    head = embed_head(llm, template, reranker)[None]  # (1, S_head, D)
    S_head = head.shape[1]
    # the head's keys/values, per layer (1, Hkv, S_head, hd)
    _, head_kv = llm.hidden(head, torch.arange(S_head, device=dev)[None])
    ids, mask = pad_ids([p + template.passage_close for p in passages], dev)  # (Np, T)
    positions = S_head + torch.arange(ids.shape[1], device=dev).expand(len(passages), -1)  # (Np, T)
    # every passage attends to the one head: per layer (Np, Hkv, S_head + T, hd)
    _, past = llm.hidden(llm.tok_embeddings(ids), positions, mask, head_kv)
    head_mask = torch.ones(len(passages), S_head, dtype=torch.bool, device=dev)
    past_mask = torch.cat([head_mask, mask], dim=1)  # (Np, S_head + T)
    return past, past_mask, past_mask.sum(1)


def score_pairs(llm, template, reranker, prefix, rows, queries, passages):
    """Mean log p(query tokens, eos | prompt) for pairs whose passage is row `rows[i]` of the
    cached `prefix`. queries/passages: id lists per pair. Returns (N,) float32."""
    past, past_mask, past_len = prefix
    dev = llm.tok_embeddings.weight.device
    rows = torch.tensor(rows, device=dev)  # (N,)
    hints = [None] * len(queries)  # zeroshot and prompt: no H
    if reranker is not None and reranker.mlp is not None:
        hints = reranker.hint_block(llm, template, queries, passages)  # (h_i, D) each
    dtype = llm.tok_embeddings.weight.dtype
    suffixes, targets, first_target = [], [], []
    for hint, q in zip(hints, queries):
        text = llm.tok_embeddings(torch.tensor(template.question + q + [template.eos], device=dev))
        pieces = [text] if hint is None else [hint.to(dtype), text]
        suffixes.append(torch.cat(pieces))  # (T_i, D)
        # index of the first query token: H and "Question: \n" come before it
        first_target.append(sum(len(x) for x in pieces) - len(q) - 1)
        targets.append(q + [template.eos])
    x = nn.utils.rnn.pad_sequence(suffixes, batch_first=True)  # (N, T, D)
    lengths = torch.tensor([len(s) for s in suffixes], device=dev)  # (N,)
    mask = torch.arange(x.shape[1], device=dev) < lengths[:, None]  # (N, T): real suffix tokens
    # (N, T): each suffix continues after its own prefix
    positions = past_len[rows, None] + torch.arange(x.shape[1], device=dev)
    past_rows = [(k[rows], v[rows]) for k, v in past]  # per layer (N, Hkv, S, hd)
    h, _ = llm.hidden(x, positions, mask, past_rows, past_mask[rows])  # (N, T, D)
    # Logits only where a target is predicted: position t predicts token t+1. For the M targets
    # of all pairs: pair[m] is target m's pair, where[m] the position that predicts it.
    pair = torch.cat([torch.full((len(t),), i, device=dev) for i, t in enumerate(targets)])  # (M,)
    where = torch.cat(
        [torch.arange(len(t), device=dev) + s - 1 for t, s in zip(targets, first_target)]
    )
    target = torch.tensor([tok for t in targets for tok in t], device=dev)  # (M,)
    logprob = target_logprobs(llm, h[pair, where], target)  # (M,)
    sums = torch.zeros(len(targets), device=dev).index_add(0, pair, logprob)  # (N,)
    return sums / torch.tensor([len(t) for t in targets], device=dev)


def target_logprobs(llm, h, target, rows=128):
    """log p(target[i] | h[i]) for hidden states h (M, D): float32 logits and logsumexp, 128 rows
    at a time, so that each (rows, V) float32 block (25 MB for SmolLM2) is reused from the heap
    and stays in cache, where all M rows at once would not."""
    out = []
    for start in range(0, len(h), rows):
        logits = llm.logits(h[start : start + rows])  # (rows, V) float32
        picked = logits.gather(1, target[start : start + rows, None])[:, 0]  # (rows,)
        out.append(picked - logits.logsumexp(-1))
    return torch.cat(out)  # (M,)


LOSSES = ("paper", "listwise")  # --loss: "paper" is method.md §5; "listwise" is not the paper's


# ---- The loss (method.md §5): the paper's pointwise term + hinge, and a listwise alternative -
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


def list_pairs(batch, m, seed, epoch):
    """(query index, docid, kind) for the listwise loss: each query's positive and m of its own
    first-stage negatives (data.list_negative_pool; its hard negative where the pool is empty),
    drawn anew each epoch, the same for the same seed, epoch and query."""
    pairs = []
    for i, e in enumerate(batch):
        pool = [d for d in e.list_negatives if d != e.positive_docid] or [e.hard_negative_docid]
        drawn = random.Random(f"{seed}:epoch{epoch}:{e.qid}").sample(pool, min(m, len(pool)))
        pairs += [(i, e.positive_docid, "positive")] + [(i, d, "hard") for d in drawn]
    return pairs


def ranking_loss(scores, pairs, tc, lengths=None):
    """The loss of scored pairs and its terms. NLL = -score, a mean per token.
    paper:    L = w mean NLL(q, d+) + mean relu(NLL(q, d+) - NLL(q, d-) + margin) over negatives
              (the margin on a per-token scale, as in the official code; w = 1 in the paper, 0 is
              the official code's hinge-only `pairwise` variant);
    listwise: L = w mean NLL(q, d+) + mean over queries of -log softmax(S / T)[d+], S the *summed*
              log p(q | d) (score x lengths, the query's target count) of the positive and the
              query's own negatives; at T = 1 (tc.list_temperature) the posterior of the positive
              among them under a uniform prior. A larger T softens the softmax: a few misranked
              lists then weigh less against the many ranked well.
    Diagnostics: the mean NLL of positives (the pointwise term), of own ("hard") and in-batch
    negatives, and the mean gap NLL(d-) - NLL(d+) of each kind (> 0: the order wanted), the share
    of active hinges, and the pairwise accuracy (positive above the query's own negatives)."""
    nll = -scores  # (N,)
    dev = nll.device
    kind = [k for _, _, k in pairs]
    n = pair_counts(pairs)
    is_pos = torch.tensor([k == "positive" for k in kind], device=dev)  # (N,)
    query = torch.tensor([i for i, _, _ in pairs], device=dev)  # (N,) each pair's query
    nll_pos = torch.zeros(max(i for i, _, _ in pairs) + 1, device=dev)  # (B,)
    nll_pos = nll_pos.index_copy(0, query[is_pos], nll[is_pos])  # (B,) 0 for others' queries
    gap = nll[~is_pos] - nll_pos[query[~is_pos]]  # (N - B,) < 0: wrong order
    hard = torch.tensor([k == "hard" for k in kind], device=dev)[~is_pos]  # (N - B,)
    terms = {
        "pointwise": nll_pos.sum() / n["positive"],
        "accuracy": (gap[hard] > 0).sum() / max(n["hard"], 1),
        "nll_hard": nll[~is_pos][hard].sum() / max(n["hard"], 1),
        "nll_in_batch": nll[~is_pos][~hard].sum() / max(n["in-batch"], 1),
        "gap_hard": gap[hard].sum() / max(n["hard"], 1),
        "gap_in_batch": gap[~hard].sum() / max(n["in-batch"], 1),
    }
    if tc.loss == "paper":
        hinge = F.relu(tc.margin - gap)  # (N - B,)
        terms.update(hinge=hinge.sum() / n["negative"], active=(hinge > 0).sum() / n["negative"])
    else:
        if lengths is None:
            raise ValueError("the listwise loss needs each pair's target count (lengths)")
        summed = scores * lengths / tc.list_temperature  # (N,) log p(q | d) summed, over T
        # each query's pairs are consecutive, its positive first (list_pairs)
        group_sizes = torch.unique_consecutive(query, return_counts=True)[1].tolist()
        listwise = [s.logsumexp(0) - s[0] for s in summed.split(group_sizes)]  # -log softmax[d+]
        terms["listwise"] = torch.stack(listwise).sum() / n["positive"]
    return total_loss(terms, tc), terms


def total_loss(terms, tc):
    """The loss from ranking_loss's terms."""
    return tc.pointwise_weight * terms["pointwise"] + terms[RANKING_TERM[tc.loss]]


def pair_counts(pairs):
    """How many pairs of each kind ("positive" = queries, "hard", "in-batch", "negative")."""
    counts = Counter(k for _, _, k in pairs)
    counts["negative"] = counts["hard"] + counts["in-batch"]
    return counts


RANKING_TERM = {"paper": "hinge", "listwise": "listwise"}
DIAGNOSTICS = ["pointwise", "accuracy", "nll_hard", "nll_in_batch", "gap_hard", "gap_in_batch"]
LOSS_TERMS = {"paper": DIAGNOSTICS + ["hinge", "active"], "listwise": DIAGNOSTICS + ["listwise"]}
# the pairs each term is a mean over (a distributed caller weighs a share's terms by these counts)
MEAN_OVER = dict(pointwise="positive", listwise="positive", hinge="negative", active="negative")
MEAN_OVER.update(accuracy="hard", nll_hard="hard", gap_hard="hard")
MEAN_OVER.update(nll_in_batch="in-batch", gap_in_batch="in-batch")


# ---- Saved modules --------------------------------------------------------------------------
def trainable_state(reranker):
    return {k: v for k, v in reranker.named_parameters() if v.requires_grad}


if __name__ == "__main__":
    import cli

    cli.main()
