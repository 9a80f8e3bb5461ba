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

import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
from eval import atomic_save
from model import default_dtype, load

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


@dataclass
class TokenIds:
    """Token ids of passages and queries, kept apart: MS MARCO numbers both with the same kind
    of id strings (passage 1072603 and query 1072603 both exist), so one table would mix them."""

    passages: dict  # docid -> ids of " {passage}", cut to max_passage_tokens
    queries: dict  # qid -> ids of "{query}"
    cut: dict = field(default_factory=dict)  # "passages"/"queries" -> {cut, of, limit, mean}


# ---- Devices and torchrun: one process per device, PyTorch's DistributedDataParallel --------
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
                raise ValueError(
                    f"--device {name}: under torchrun each process takes "
                    f"cuda:LOCAL_RANK; pass --device cuda"
                )
            if local >= torch.cuda.device_count():
                raise ValueError(
                    f"--device cuda: local rank {local} but only {torch.cuda.device_count()} GPUs "
                    f"on this node (use --nproc_per_node {torch.cuda.device_count()} or fewer)"
                )
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


# ---- The trainable part of each method ------------------------------------------------------
class Reranker(nn.Module):
    """The trainable parameters of one method around a frozen LLM. The LLM is passed to every
    call instead of being a submodule, so it is never trained, moved or saved with this module."""

    def __init__(self, cfg, llm, template):
        super().__init__()
        self.cfg = cfg
        E = llm.tok_embeddings.weight.detach()  # (V, D) frozen
        D = E.shape[1]
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
        if self.cfg.method == "qpeft-r":
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
    over the query's tokens and eos. query, passage: token ids. Returns a float32 scalar. The fast
    path below (encode_prefixes + score_pairs) computes the same for batches of pairs, sharing
    what does not depend on the query; tests/test_qpeft.py checks that the two agree."""
    dev = llm.tok_embeddings.weight.device
    method = reranker.cfg.method if reranker is not None else "zeroshot"
    E = llm.tok_embeddings  # the frozen table
    pieces = [E(torch.tensor(template.prefix(passage), device=dev))]  # (S, D) P + passage
    if method == "prompt":  # the trainable P in place of the instruction's embeddings
        b, P = len(template.bos), len(template.prompt)
        soft_prompt = reranker.soft_prompt.to(pieces[0].dtype)  # (P, D)
        pieces[0] = torch.cat([pieces[0][:b], soft_prompt, pieces[0][b + P :]])
    if method == "qpeft-r":  # H = MLP(E'("hints: "), E'(the k passage tokens nearest), E'("\n"))
        hints = top_k_tokens(reranker, llm, query, passage, reranker.cfg.top_k)
        ids = torch.tensor(template.hints_open + hints + template.hints_close, device=dev)
        pieces.append(reranker.hint_mlp(reranker.embed_hint_ids(llm, ids)).to(pieces[0].dtype))
    if method == "qpeft-a":  # H = MLP(E'("hints: "), attention(E'(query), E(passage)), E'("\n"))
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
    if reranker is None or reranker.cfg.method != "prompt":
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
    if reranker is not None and reranker.cfg.method in ("qpeft-r", "qpeft-a"):
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


# ---- Saved modules --------------------------------------------------------------------------
def trainable_state(reranker):
    return {k: v for k, v in reranker.named_parameters() if v.requires_grad}


ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def model_fingerprint(folder):
    """sha256 of a model folder's config.json and safetensors headers (every tensor's name, shape,
    dtype and offsets): another checkpoint changes it, and it reads kilobytes, not the weights."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            size = f.read(8)
            digest.update(size + f.read(int.from_bytes(size, "little")))
    return digest.hexdigest()


def load_llm(model, dtype=None, device="cpu"):
    """The frozen LLM (a name under $QPEFT_HOME/models or a folder) and its tokenizer; llm.name
    and llm.sha256 say which model an adapter trained on it belongs to."""
    folder = data.find_asset(model, "models")
    device = torch.device(device)
    llm, tokenizer = load(folder, dtype=dtype or default_dtype(device), device=device)
    llm.name, llm.sha256 = folder.name, model_fingerprint(folder)
    return llm, tokenizer


def save_adapter(reranker, folder, llm, extra):
    """A peft-style adapter folder: the trainable parameters only (never the frozen LLM) in
    adapter_model.safetensors, and adapter_config.json with every QPEFTConfig field (the method
    among them), the base model's name and fingerprint, and `extra` (training data, dev history)."""
    folder.mkdir(parents=True, exist_ok=True)
    # the config goes first and comes back last: a crash in between leaves no adapter to reuse
    (folder / ADAPTER_CONFIG).unlink(missing_ok=True)
    weights = {k: v.contiguous() for k, v in trainable_state(reranker).items()}
    atomic_save(lambda f: save_file(weights, f), folder / ADAPTER_WEIGHTS)
    base = {"base_model_name_or_path": llm.name, "base_model_sha256": llm.sha256}
    config = {"qpeft": asdict(reranker.cfg), **base, **extra}
    atomic_save(lambda f: Path(f).write_text(json.dumps(config, indent=1)), folder / ADAPTER_CONFIG)


def load_adapter(folder, llm, template_for, any_base_model=False):
    """A trained module from its adapter folder, refused on another base model than it was trained
    on (unless any_base_model); weights checked by name and shape."""
    folder = Path(folder)
    if folder.suffix == ".safetensors" and folder.with_suffix(".json").is_file():
        raise ValueError(
            f"{folder}: a single-file module of an older qpeft; adapters are folders "
            f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}): retrain it to get one"
        )
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        files = f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        raise FileNotFoundError(f"{config_file}: missing (an adapter is a folder with {files})")
    try:
        config = json.loads(config_file.read_text())
        cfg = QPEFTConfig(**config["qpeft"])
        base, base_sha = config["base_model_name_or_path"], config["base_model_sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:  # TypeError: unknown or missing field
        error = f"{type(e).__name__}: {e}"
        raise ValueError(f"{config_file}: not an adapter config ({error})") from None
    if cfg.method not in METHODS:
        raise ValueError(f"{config_file}: unknown method {cfg.method!r} (known: {METHODS})")
    if base_sha != llm.sha256 and not any_base_model:
        raise ValueError(
            f"{folder}: trained on {base} (sha256 {base_sha[:12]}), not on {llm.name} "
            f"(sha256 {llm.sha256[:12]}); --any-base-model loads it anyway"
        )
    reranker = Reranker(cfg, llm, template_for(cfg))
    try:
        saved = load_file(folder / ADAPTER_WEIGHTS)
    except Exception as e:  # safetensors raises its own error types for a bad file
        raise ValueError(f"{folder / ADAPTER_WEIGHTS}: not a safetensors file ({e})") from None
    expected = trainable_state(reranker)
    for name in expected.keys() | saved.keys():
        if name not in saved or name not in expected or saved[name].shape != expected[name].shape:
            raise ValueError(
                f"{folder / ADAPTER_WEIGHTS}: tensor '{name}' is missing, unexpected or "
                f"mis-shaped for method {cfg.method} on {llm.name}"
            )
    reranker.load_state_dict(saved)
    return reranker.eval()


# ---- Reranking ------------------------------------------------------------------------------
@torch.no_grad()
def rerank(llm, template, rerankers, candidates, tokens, token_budget, desc, prefixes=None):
    """Scores {method: {qid: {docid: score}}} for every (query, candidate) pair. Passages are
    batched by a token budget (length-bucketed); each batch's keys/values are computed once and
    shared by every method with the frozen instruction and by every query that has the passage.
    `prefixes`, a dict, keeps those keys/values for the next call on the same candidates (a
    training run's dev checks: the frozen prefix does not change). desc None: no progress bar."""
    pairs_of = {}  # docid -> the qids that have it
    for qid, docids in candidates.items():
        for d in docids:
            pairs_of.setdefault(d, []).append(qid)
    docids = sorted(pairs_of)
    lengths = [len(template.prefix(tokens.passages[d])) for d in docids]
    batches = data.token_budget_batches(lengths, token_budget)
    seconds = {m: 0.0 for m in rerankers}
    shared_seconds, keys = 0.0, []
    mine = range(rank(), len(batches), world())  # under torchrun: every world()-th passage batch
    values = {m: [] for m in rerankers}  # score tensors, read back to the host once at the end
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
        # (passage row, qid) of every pair in the batch; every method scores them in this order
        pairs = [(row, qid) for row, i in enumerate(batch) for qid in pairs_of[docids[i]]]
        keys += [(qid, docids[batch[row]]) for row, qid in pairs]
        for method, reranker in rerankers.items():
            start = time.perf_counter()
            own_prompt = reranker.cfg.method == "prompt"
            prefix = encode_prefixes(llm, template, reranker, passages) if own_prompt else shared
            # suffix batches no larger than the passage batch
            for chunk in range(0, len(pairs), len(batch)):
                part = pairs[chunk : chunk + len(batch)]
                rows, queries = [r for r, _ in part], [tokens.queries[q] for _, q in part]
                pair_passages = [passages[r] for r in rows]
                scored = score_pairs(llm, template, reranker, prefix, rows, queries, pair_passages)
                values[method].append(scored)  # (len(part),)
            seconds[method] += time.perf_counter() - start
    scores = {m: {} for m in rerankers}
    for method in rerankers:  # one host read per method; then every process gets every score
        pairs = zip(keys, torch.cat(values[method]).tolist() if values[method] else [])
        for share in gather([(qid, docid, value) for (qid, docid), value in pairs]):
            for qid, docid, value in share:
                scores[method].setdefault(qid, {})[docid] = value
    # Each method is charged the shared passage pass too, as if it had run alone; under torchrun
    # the slowest process's time.
    timing = {
        m: max(gather(seconds[m] + (shared_seconds if r.cfg.method != "prompt" else 0.0)))
        for m, r in rerankers.items()
    }
    return scores, timing


# ---- Python API: the calls the command line makes too (rerank, load_adapter, train.fit) -----
class Ranker:
    """A frozen LLM with one reranker, zero-shot or a trained adapter, for your own code:

    ranker = qpeft.load_ranker()              # or load_ranker(adapter="runs/qpeft/qpeft-a")
    ranker.rank("capital of france", ["Berlin is ...", "Paris is ..."], top_k=1)  # [(1, -2.3)]
    """

    def __init__(self, llm, tokenizer, reranker, token_budget=4096):
        self.llm, self.tokenizer, self.reranker = llm, tokenizer, reranker
        self.template = Template(tokenizer, reranker.cfg.instruction)
        self.token_budget = token_budget

    def rerank(self, queries, candidates, corpus):
        """{qid: {docid: score}} for queries {qid: text}, candidates {qid: [docid]} and corpus
        {docid: text}; each passage's keys/values are computed once for every query that meets it.
        Scores are mean log-probabilities of the query: higher is better."""
        passages = {d: corpus[d] for docs in candidates.values() for d in docs}
        tokens = tokenize(self.tokenizer, self.reranker.cfg, queries, passages)
        rerankers = {"ranker": self.reranker}
        scores, _ = rerank(
            self.llm, self.template, rerankers, candidates, tokens, self.token_budget, None
        )
        return {q: scores["ranker"].get(q, {}) for q in candidates}

    def score(self, query, passages):
        """[score of each passage] for one query, in the passages' order."""
        ids = [str(i) for i in range(len(passages))]
        scores = self.rerank({"q": query}, {"q": ids}, dict(zip(ids, passages)))["q"]
        return [scores[i] for i in ids]

    def rank(self, query, passages, ids=None, top_k=None):
        """[(id, score)] best first (ids default to the passages' positions), top_k first only."""
        ids = list(range(len(passages))) if ids is None else list(ids)
        ranked = sorted(zip(ids, self.score(query, passages)), key=lambda pair: -pair[1])
        return ranked[:top_k] if top_k else ranked

    def save(self, folder, **extra):
        """Write the trained module as an adapter folder (load it with load_ranker(adapter=...))."""
        save_adapter(self.reranker, Path(folder), self.llm, extra)


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
        reranker = load_adapter(
            adapter, llm, lambda cfg: Template(tokenizer, cfg.instruction), any_base_model
        )
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
    import train  # train.py imports this module

    llm, tokenizer = load_llm(model, dtype, setup_device(device))
    return train.train_adapter(llm, tokenizer, method, data, out, log, **settings)


def tokenize(tokenizer, cfg, queries, passages, log=None):
    """TokenIds of {qid: text} and {docid: text}, cut to the module's limits; a passage is
    tokenised with its leading space (the template ends with "Passage:")."""
    texts, cut = {d: " " + text for d, text in passages.items()}, {}
    p_ids, q_ids = data.tokenize_texts(tokenizer, texts), data.tokenize_texts(tokenizer, queries)
    p_ids = cut_to(p_ids, cfg.max_passage_tokens, "passages", log, cut)
    q_ids = cut_to(q_ids, cfg.max_query_tokens, "queries", log, cut)
    return TokenIds(passages=p_ids, queries=q_ids, cut=cut)


# ---- Token limits ---------------------------------------------------------------------------
def cut_to(ids, limit, what="", log=None, counts=None):
    """Token ids cut to `limit` (keeping the start); how many were cut, and by how many tokens on
    average, go to the log and to counts[what]."""
    cuts = [len(v) - limit for v in ids.values() if len(v) > limit]
    mean = statistics.fmean(cuts) if cuts else 0.0
    if counts is not None:
        counts[what] = {"cut": len(cuts), "of": len(ids), "limit": limit, "mean": round(mean, 2)}
    if cuts and log:
        log(f"{what}: {len(cuts)} of {len(ids)} cut to {limit} tokens, by {mean:.1f} on average")
    return {k: v[:limit] for k, v in ids.items()}


def check_positions(llm, template, tokens, cfg):
    """The longest sequence any pair can make must fit the model's max_position_embeddings."""
    if llm.cfg.max_positions is None or not tokens.queries:
        return
    qid, query = max(tokens.queries.items(), key=lambda item: len(item[1]))
    hints = len(template.hints_open) + len(template.hints_close) + max(len(query), cfg.top_k)
    passage = max(tokens.passages.values(), key=len, default=[])
    longest = len(template.prefix(passage)) + hints + len(template.question) + len(query) + 1  # eos
    if longest > llm.cfg.max_positions:
        raise ValueError(
            f"query {qid!r}: its longest sequence has {longest} tokens, more than the model's "
            f"{llm.cfg.max_positions} positions (lower --max-query-tokens or --max-passage-tokens)"
        )


if __name__ == "__main__":
    import cli

    cli.main()
