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
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
import eval as ir
from model import load

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


@dataclass
class TrainConfig:
    steps: int = 100               # optimizer steps, one per batch (the official code stepped per 2 pairs)
    queries_per_batch: int = 4     # paper: 4; negatives are the other queries' positives + 1 BM25 hard negative
    lr: float = 1e-2               # paper: 3e-2 (AdamW); 1e-2 chosen on dev for the laptop preset (README)
    weight_decay: float = 0.01     # paper: 0.01
    margin: float = 0.0            # hinge margin on mean NLL (paper: 0.0-1.1)
    eval_every: int = 25           # steps between dev-loss checks (early stopping, paper: on dev loss)
    patience: int = 3              # stop after this many dev checks without improvement
    dev_queries: int = 32          # dev queries in the dev loss (fixed subset, for speed)
    seed: int = 0


@dataclass
class TokenIds:
    """Token ids of passages and queries, kept apart: MS MARCO numbers both with the same kind of
    id strings (passage 1072603 and query 1072603 both exist), so one shared table would mix them."""
    passages: dict  # docid -> ids of " {passage}", cut to max_passage_tokens
    queries: dict   # qid -> ids of "{query}"


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
            # One E' lookup for all pairs: the backward of every lookup writes a dense (V, D) gradient.
            rows = [template.hints_open + select_top_k(self, llm, q, p, self.cfg.top_k) + template.hints_close
                    for q, p in zip(queries, passages)]
            x = self.embed_hint_ids(llm, torch.tensor([i for r in rows for i in r], device=dev))   # (sum h_i, D)
            lengths = [len(r) for r in rows]
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
def select_top_k(reranker, llm, query_ids, passage_ids, k):
    """Q-PEFT-R's hint tokens: the k distinct passage token ids most similar to any query token.

    Similarity is the cosine between E'(query token) and E(passage token); a token id scores the
    max over query tokens and over the positions where it occurs; ties go to the earlier position.
    Only passage tokens are candidates (the official code also admitted the template's words,
    "Passage", ":" ..., a deviation on purpose), and a passage with fewer than k distinct tokens
    gives a shorter H (no random resampling as in the official code)."""
    dev = llm.tok_embeddings.weight.device
    q_ids = torch.tensor(query_ids, dtype=torch.long, device=dev)                # long even when empty
    p_ids = torch.tensor(passage_ids, dtype=torch.long, device=dev)
    q = F.normalize(reranker.embed_hint_ids(llm, q_ids), dim=-1)                 # (Lq, D)
    p = F.normalize(llm.tok_embeddings(p_ids).float(), dim=-1)                  # (Ld, D)
    best = (q @ p.T).max(dim=0).values                                          # (Ld,) best query match per position
    order = torch.sort(best, descending=True, stable=True).indices.tolist()     # stable: earlier position first
    chosen = []
    for position in order:
        if passage_ids[position] not in chosen:
            chosen.append(passage_ids[position])
            if len(chosen) == k:
                break
    return chosen


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
    """(query index, docid, is_positive) for a batch of TrainExamples: each query meets its
    positive, the other queries' positives (in-batch negatives) and its own BM25 hard negative."""
    pairs = []
    for i, e in enumerate(batch):
        # distinct negatives: a hard negative may be another query's positive, and must count once
        negatives = dict.fromkeys([o.positive_docid for o in batch] + [e.hard_negative_docid])
        negatives.pop(e.positive_docid)
        pairs.append((i, e.positive_docid, True))
        pairs += [(i, d, False) for d in negatives]
    return pairs


def ranking_loss(scores, pairs, margin):
    """L = mean NLL(q, d+) + mean relu(NLL(q, d+) - NLL(q, d-) + margin), NLL = -score (a mean
    per token, so the margin is on a per-token scale, as in the official code)."""
    nll = -scores                                                               # (N,)
    is_pos = torch.tensor([p for _, _, p in pairs], device=nll.device)
    query = torch.tensor([i for i, _, _ in pairs], device=nll.device)
    nll_pos = torch.zeros(int(query.max()) + 1, device=nll.device).index_copy(0, query[is_pos], nll[is_pos])  # (B,)
    hinge = F.relu(nll_pos[query[~is_pos]] - nll[~is_pos] + margin)
    return nll_pos.mean() + hinge.mean()


def batch_loss(llm, template, reranker, batch, tokens, margin):
    """The loss of one batch through the fast path: each passage's keys/values computed once."""
    docids = sorted({e.positive_docid for e in batch} | {e.hard_negative_docid for e in batch})
    row = {d: i for i, d in enumerate(docids)}
    with torch.set_grad_enabled(torch.is_grad_enabled() and reranker.cfg.method == "prompt"):
        prefix = encode_prefixes(llm, template, reranker, [tokens.passages[d] for d in docids])
    pairs = batch_pairs(batch)
    scores = score_pairs(llm, template, reranker, prefix, [row[d] for _, d, _ in pairs],
                         [tokens.queries[batch[i].qid] for i, _, _ in pairs],
                         [tokens.passages[d] for _, d, _ in pairs])
    return ranking_loss(scores, pairs, margin)


def train(llm, template, reranker, train_examples, dev_examples, tokens, tc, out, log, resume=False):
    """AdamW on the trainable parameters (fp32, like their optimizer state), early stopping on the
    dev loss; the module with the best dev loss is kept, the untrained one included. With
    `resume`, continues from out/{method}.resume.pt (written at every dev check)."""
    method = reranker.cfg.method
    params = [p for p in reranker.parameters() if p.requires_grad]
    # fused: one kernel over all parameters. E' alone is 28M fp32 values updated every step (its
    # gradient is dense); the default per-tensor loop took 123 ms a step on 2 cores, fused 15 ms.
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
    dev_batches = data.train_batches(dev_examples, tc.queries_per_batch, seed=0)

    def snapshot():
        return {k: v.detach().clone() for k, v in trainable_state(reranker).items()}

    resume_file = out / f"{method}.resume.pt"
    if resume and resume_file.exists():
        saved = torch.load(resume_file, weights_only=False)
        if saved["config"] != [asdict(reranker.cfg), asdict(tc)]:
            raise SystemExit(f"qpeft.py: error: {resume_file} was written with other settings; "
                             f"rerun with the same flags or without --resume")
        reranker.load_state_dict(saved["module"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        torch.set_rng_state(saved["torch_rng"])  # dropout masks continue as if never interrupted
        log(f"{method}: resumed at step {state['step']} from {resume_file}")
    else:  # the untrained module is the first candidate: training must beat its dev loss
        loss0 = dev_loss_of(llm, template, reranker, dev_batches, tc.margin, tokens)
        state = {"step": 0, "best_loss": loss0, "best_step": 0, "best": snapshot(), "bad_checks": 0,
                 "history": [{"step": 0, "dev_loss": loss0}]}
        log(f"{method}: step 0 dev loss {loss0:.4f}")
    per_epoch = max(1, len(train_examples) // tc.queries_per_batch)
    bar = tqdm(range(state["step"], tc.steps), desc=f"train {method}", initial=state["step"], total=tc.steps)
    for step in bar:
        if state["bad_checks"] >= tc.patience:
            log(f"{method}: early stop at step {step} (no dev improvement in {tc.patience} checks)")
            break
        epoch, index = divmod(step, per_epoch)
        if index == 0 or step == state["step"]:  # a new shuffle each epoch, the same for the same seed
            epoch_batches = data.train_batches(train_examples, tc.queries_per_batch, seed=tc.seed, epoch=epoch)
        reranker.train()
        loss = batch_loss(llm, template, reranker, epoch_batches[index], tokens, tc.margin)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % tc.eval_every == 0 or step + 1 == tc.steps:
            dev_loss = dev_loss_of(llm, template, reranker, dev_batches, tc.margin, tokens)
            state["history"].append({"step": step + 1, "train_loss": loss.item(), "dev_loss": dev_loss})
            improved = dev_loss < state["best_loss"]
            log(f"{method}: step {step + 1} train loss {loss.item():.4f} dev loss {dev_loss:.4f}"
                + (" (best)" if improved else ""))
            if improved:
                state.update(best_loss=dev_loss, best_step=step + 1, bad_checks=0, best=snapshot())
            else:
                state["bad_checks"] += 1
            state["step"] = step + 1
            atomic_save(lambda f: torch.save({"module": reranker.state_dict(), "optimizer": optimizer.state_dict(),
                                              "state": state, "torch_rng": torch.get_rng_state(),
                                              "config": [asdict(reranker.cfg), asdict(tc)]}, f), resume_file)
    bar.close()
    reranker.load_state_dict(state["best"])
    log(f"{method}: keeping the module of step {state['best_step']} (dev loss {state['best_loss']:.4f})")
    return reranker.eval(), state


@torch.no_grad()
def dev_loss_of(llm, template, reranker, dev_batches, margin, tokens):
    reranker.eval()
    return sum(batch_loss(llm, template, reranker, b, tokens, margin).item() for b in dev_batches) / len(dev_batches)


def trainable_state(reranker):
    return {k: v for k, v in reranker.named_parameters() if v.requires_grad}


def atomic_save(write, path):
    """Write to a temporary file beside `path`, then rename: an interruption never leaves half a file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


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
    cfg = QPEFTConfig(**json.loads(config_file.read_text())["qpeft"])
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
def rerank(llm, template, rerankers, candidates, tokens, token_budget, desc):
    """Scores {method: {qid: {docid: score}}} for every (query, candidate) pair. Passages are
    batched by a token budget (length-bucketed); each batch's keys/values are computed once and
    shared by every method with the frozen instruction and by every query that has the passage."""
    pairs_of = {}
    for qid, docids in candidates.items():
        for d in docids:
            pairs_of.setdefault(d, []).append(qid)
    docids = sorted(pairs_of)
    lengths = [len(template.prefix(tokens.passages[d])) for d in docids]
    batches = data.token_budget_batches(lengths, token_budget)
    scores = {m: {q: {} for q in candidates} for m in rerankers}
    seconds = {m: 0.0 for m in rerankers}
    shared_seconds = 0.0
    for batch in tqdm(batches, desc=desc, unit="batch"):
        passages = [tokens.passages[docids[i]] for i in batch]
        start = time.perf_counter()
        shared = encode_prefixes(llm, template, None, passages)
        shared_seconds += time.perf_counter() - start
        pairs = [(row, qid) for row, i in enumerate(batch) for qid in pairs_of[docids[i]]]
        for method, reranker in rerankers.items():
            start = time.perf_counter()
            own_prompt = reranker.cfg.method == "prompt"
            prefix = encode_prefixes(llm, template, reranker, passages) if own_prompt else shared
            for chunk in range(0, len(pairs), len(batch)):  # suffix batches no larger than the passage batch
                part = pairs[chunk:chunk + len(batch)]
                s = score_pairs(llm, template, reranker, prefix, [r for r, _ in part],
                                [tokens.queries[q] for _, q in part], [passages[r] for r, _ in part])
                for (r, qid), value in zip(part, s.tolist()):
                    scores[method][qid][docids[batch[r]]] = value
            seconds[method] += time.perf_counter() - start
    # Each method is charged the shared passage pass too, as if it had run alone.
    timing = {m: seconds[m] + (shared_seconds if r.cfg.method != "prompt" else 0.0) for m, r in rerankers.items()}
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


SHOWN = {"ndcg_cut_10": "nDCG@10", "mrr_10": "MRR@10", "recall_10": "R@10", "recall_20": "R@20", "success_5": "HR@5"}


def evaluate_run(run, qrels, level):
    """Per-query values of the SHOWN measures; MRR@10 = recip_rank on the top 10 (trec_eval's has no cutoff)."""
    per_query = ir.evaluate(qrels, run, ["ndcg_cut_10", "recall_10", "recall_20", "success_5"], relevance_level=level)
    mrr = ir.evaluate(qrels, ir.cut_run(run, 10), ["recip_rank"], relevance_level=level)
    for qid in per_query:
        per_query[qid]["mrr_10"] = mrr[qid]["recip_rank"]
    return per_query


def ndcg_delta(per_query, name, base):
    """Mean nDCG@10 of `name` minus `base` and the two-sided paired t-test p-value over queries."""
    delta, _, p = ir.paired_t_test({q: v["ndcg_cut_10"] for q, v in per_query[base].items()},
                                   {q: v["ndcg_cut_10"] for q, v in per_query[name].items()})
    return delta, p


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
PRESETS = {
    # The default: about 4 minutes on a 2-core CPU (README has the measured wall time).
    "laptop": dict(depth=30, steps=100, methods="zeroshot,qpeft-a", train_data=""),
    # The paper's protocol as far as this data allows: all 100 candidates, more steps, 1,474 train queries.
    "paper": dict(depth=100, steps=1500, methods="zeroshot,prompt,qpeft-r,qpeft-a", train_data="msmarco_train_extra",
                  lr=3e-2, eval_every=100, patience=6),
}


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
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="LLM compute dtype")
    p.add_argument("--token-budget", type=int, default=4096, help="prompt tokens per scoring batch")
    p.add_argument("--compile", action="store_true", help="torch.compile the LLM's blocks for reranking "
                   "(0.85-1.30x eager's scoring speed in bench runs on a 2-core CPU; the 15-30 s of compiling counts in pairs/s; "
                   "needs a C++ compiler)")
    p.add_argument("--train-queries", type=int, default=0, help="use only the first N train queries (0 = all)")
    for f in fields(QPEFTConfig):
        if f.name != "method":
            add_field(p, f)
    for f in fields(TrainConfig):
        add_field(p, f)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.eval_only and not args.checkpoint:
        p.error("--eval-only needs --checkpoint FILE")
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


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(message):  # to the terminal (around progress bars) and appended to out/log.txt
        tqdm.write(message)
        with open(out / "log.txt", "a", encoding="utf-8") as f:
            f.write(message + "\n")

    dtype = getattr(torch, args.dtype)
    start = run_start = time.perf_counter()
    llm, tokenizer = load(args.model, dtype=dtype)
    log(f"$ python qpeft.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    log(f"model {args.model}: {sum(p.numel() for p in llm.parameters()) / 1e6:.1f}M frozen parameters, "
        f"{args.dtype}, cpu x {torch.get_num_threads()} threads, loaded in {time.perf_counter() - start:.1f} s")
    dataset = data.load_dataset(args.data)
    base_cfg = pick(QPEFTConfig, args)
    tc = pick(TrainConfig, args)

    def template_for(cfg):
        return Template(tokenizer, cfg.instruction)

    template = template_for(base_cfg)
    # Queries without candidates are left out, like trec_eval leaves out queries missing from a run.
    first_stage = {q: docs for q, docs in dataset.first_stage(args.split, 1000).items() if docs}
    candidates = {q: list(docs)[:args.depth] for q, docs in first_stage.items()}
    rerankers = {}
    if args.eval_only:  # several modules share one pass over the passages (if they share the instruction)
        for file in args.checkpoint.split(","):
            reranker = load_module(file, llm, template_for)
            rerankers[Path(file).stem] = reranker
            template, base_cfg = template_for(reranker.cfg), reranker.cfg
        if len({(r.cfg.instruction, r.cfg.max_passage_tokens) for r in rerankers.values()}) > 1:
            raise SystemExit("qpeft.py: error: --checkpoint: the modules differ in instruction or max_passage_tokens")
    methods = list(rerankers) or args.methods.split(",")
    texts = {d: " " + dataset.corpus[d] for docs in candidates.values() for d in docs}
    train_examples, dev_examples = [], []
    if not args.eval_only and any(m != "zeroshot" for m in methods):
        train_set = data.merge_datasets(dataset, *[data.load_dataset(n) for n in args.train_data.split(",") if n])
        train_examples = data.training_examples(train_set, "train", seed=tc.seed)
        if args.train_queries:
            train_examples = train_examples[:args.train_queries]
        if "dev" not in dataset.splits:
            raise SystemExit(f"qpeft.py: error: {dataset.path} has no dev split (qrels/dev.tsv), "
                             f"needed for early stopping; use --eval-only to rerank with a trained module")
        dev_examples = data.training_examples(dataset, "dev", seed=tc.seed)[:tc.dev_queries]
        for e in train_examples + dev_examples:
            texts[e.positive_docid] = " " + train_set.corpus[e.positive_docid]
            texts[e.hard_negative_docid] = " " + train_set.corpus[e.hard_negative_docid]
        queries = {e.qid: train_set.queries[e.qid] for e in train_examples + dev_examples}
    else:
        queries = {}
    queries.update({q: dataset.queries[q] for q in candidates})
    tokens = TokenIds(passages=data.tokenize_texts(tokenizer, texts, max_tokens=base_cfg.max_passage_tokens),
                      queries=data.tokenize_texts(tokenizer, queries))
    log(f"data {args.data}: {len(candidates)} {args.split} queries x depth {args.depth}, "
        f"{len(train_examples)} train / {len(dev_examples)} dev queries for training")

    resumed = args.resume and (out / "metrics.json").exists()  # keeps the training records of reused modules
    metrics = json.loads((out / "metrics.json").read_text()) if resumed else {}
    for method in methods:
        if method in rerankers:
            continue
        cfg = QPEFTConfig(**{**asdict(base_cfg), "method": method})
        module_file = out / f"{method}.safetensors"
        torch.manual_seed(tc.seed)  # a method's initial weights do not depend on which methods ran before
        reranker = Reranker(cfg, llm, template) if not (args.resume and module_file.exists()) else None
        if method != "zeroshot":
            if reranker is None:
                reranker = load_module(module_file, llm, template_for)
                if reranker.cfg != cfg:  # its prompt, cut or shape would not match this run's
                    raise SystemExit(f"qpeft.py: error: {module_file} was trained with other settings "
                                     f"({asdict(reranker.cfg)}); rerun with the same flags or without --resume")
                log(f"{method}: reusing trained module {module_file} (training flags such as --steps are ignored)")
            else:
                log(f"{method}: {reranker.trainable_parameters():,} trainable parameters (fp32)")
                start = time.perf_counter()
                reranker, state = train(llm, template, reranker, train_examples, dev_examples, tokens, tc, out, log,
                                        resume=args.resume)
                seconds = time.perf_counter() - start
                save_module(reranker, module_file, {"train": asdict(tc), "model": args.model, "data": args.data,
                                                    "history": state["history"], "train_seconds": seconds})
                metrics.setdefault(method, {})["training"] = {
                    "seconds": round(seconds, 1), "steps": state["step"], "best_step": state["best_step"],
                    "best_dev_loss": state["best_loss"], "train_queries": len(train_examples)}
                (out / f"{method}.resume.pt").unlink(missing_ok=True)
        rerankers[method] = reranker

    if args.compile:  # after training: compiling the backward graphs took longer than it saved
        llm.compile_blocks()
    scores, timing = rerank(llm, template, rerankers, candidates, tokens, args.token_budget, f"rerank {args.split}")
    qrels, level = dataset.qrels[args.split], dataset.relevance_level(args.split)
    runs = {"bm25": first_stage, **{m: with_tail(scores[m], first_stage) for m in rerankers}}
    per_query = {}
    n_pairs = sum(len(c) for c in candidates.values())
    for name, run in runs.items():
        ir.write_run(out / f"{name}.{args.split}.trec", run, tag=name.replace("-", "_"))
        per_query[name] = evaluate_run(run, qrels, level)
    for name in runs:
        entry = {**ir.summarize(per_query[name]), "queries": len(per_query[name])}
        for base in ("bm25", "zeroshot"):
            if base in runs and name not in (base, "bm25"):
                entry[f"ndcg_cut_10_delta_{base}"], entry[f"ndcg_cut_10_p_{base}"] = ndcg_delta(per_query, name, base)
        if name in rerankers:
            entry.update(seconds=round(timing[name], 1), pairs_per_s=round(n_pairs / timing[name], 2),
                         depth=args.depth, trainable_parameters=rerankers[name].trainable_parameters())
        metrics.setdefault(name, {})[args.split] = entry
    atomic_save(lambda f: Path(f).write_text(json.dumps(metrics, indent=1)), out / "metrics.json")
    log(results_table({name: metrics[name][args.split] for name in runs}, args.split, level, args.depth))
    log(f"total wall time {time.perf_counter() - run_start:.0f} s; runs, modules and metrics.json in {out}/")


def results_table(results, split, level, depth):
    """One row per method: the SHOWN means, nDCG@10 deltas to BM25 and zero-shot with p-values, speed."""
    lines = [f"{split}: {results['bm25']['queries']} queries, BM25 top-{depth} reranked; trec_eval semantics "
             f"(nDCG graded; MRR/R/HR at relevance >= {level}; queries in both run and qrels); p: paired t-test",
             f"{'method':10}" + "".join(f"{v:>9}" for v in SHOWN.values())
             + f"{'Δ BM25':>9}{'p':>7}{'Δ zero':>9}{'p':>7}{'pairs/s':>9}"]
    for name, r in results.items():
        row = f"{name:10}" + "".join(f"{r[m]:9.4f}" for m in SHOWN)
        for base in ("bm25", "zeroshot"):
            key = f"ndcg_cut_10_delta_{base}"
            row += f"{r[key]:+9.4f}{r[f'ndcg_cut_10_p_{base}']:7.3f}" if key in r else f"{'':16}"
        lines.append(row + (f"{r['pairs_per_s']:9.1f}" if "pairs_per_s" in r else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
