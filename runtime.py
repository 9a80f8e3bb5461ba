"""The runtime around the method of qpeft.py: devices and torchrun processes, loading the frozen
LLM, adapter folders (a trained module and where it came from), tokenising texts within the
module's limits, and reranking a candidate set through the fast path in passage batches."""

import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import cpu
import data
from eval import atomic_folder, read_json
from model import Transformer
from qpeft import (
    QPEFTConfig,
    Reranker,
    Template,
    encode_prefixes,
    score_pairs,
    trainable_state,
)
from tokenizer import Tokenizer


# ---- Devices and torchrun: one process per device, PyTorch's DistributedDataParallel --------
def process_index():
    """This process's index under torchrun, its rank (0 when run alone): process 0 logs and writes
    every file."""
    return dist.get_rank() if dist.is_initialized() else 0


def process_count():
    """How many processes torchrun started (1 when run alone)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def setup_device(name):
    """The device of this process for --device auto|cpu|cuda|cuda:N|mps (auto: cuda when there
    is one). Under torchrun (WORLD_SIZE > 1) also joins the process group: nccl between GPUs,
    gloo on CPUs; each process of a node takes GPU LOCAL_RANK. Errors name the flag."""
    processes, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise ValueError(f"--device {name}: unknown (auto, cpu, cuda, cuda:N or mps)")
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
    if process_count() == 1:
        return [value]
    values = [None] * process_count()
    dist.all_gather_object(values, value)
    return values


# ---- The frozen LLM and adapter folders ---------------------------------------------------
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
ADAPTER_FILES = {ADAPTER_WEIGHTS, ADAPTER_CONFIG}


def model_fingerprint(folder, samples=8, block=4096):
    """sha256 of what makes a model folder this model: config.json, the tokenizer files, and each
    safetensors file's header (every tensor's name, shape, dtype and offsets) with `samples`
    blocks of each tensor's bytes, evenly spaced from its first to its last (the whole tensor
    when it is small). Another checkpoint of the same shapes changes it, a fine-tune changes every
    block; it reads ~9 MB of SmolLM2's 269 MB."""
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer.model"):
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            size = f.read(8)
            header = f.read(int.from_bytes(size, "little"))
            digest.update(size + header)
            start = 8 + len(header)
            for name, entry in sorted(json.loads(header).items()):
                if name == "__metadata__":
                    continue
                begin, end = (start + offset for offset in entry["data_offsets"])
                last = max(end - block, begin)  # where the last block starts
                for k in range(samples):  # overlapping, so all of a tensor <= samples x block
                    f.seek(begin + (last - begin) * k // (samples - 1))
                    digest.update(f.read(min(block, end - begin)))
    return digest.hexdigest()


def default_dtype(device):
    """bfloat16 on CUDA GPUs that support it and on CPUs that multiply it natively, else float32
    (emulated bf16 matmuls are far slower than fp32). MPS: float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu.native_bf16() else torch.float32


def load_llm(model, dtype=None, device="cpu"):
    """The frozen LLM (a name under $QPEFT_HOME/models or a folder) and its tokenizer; llm.name
    and llm.sha256 say which model an adapter trained on it belongs to. On the CPU in float32 the
    model is cpu.PackedTransformer (the same numbers, less work); else model.Transformer."""
    kinds = {
        str(k).removeprefix("torch."): k for k in (torch.float32, torch.bfloat16, torch.float16)
    }
    dtype = kinds.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype is not None and dtype not in kinds.values():
        raise ValueError(
            f"dtype: {dtype!r} is not one of {', '.join(kinds)} (or None: the default)"
        )
    folder = data.find_asset(model, "models")
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    model_class = Transformer
    if device.type == "cpu":
        cpu.reuse_freed_memory()
        if dtype == torch.float32:  # where bench.py measures it faster than SDPA
            model_class = cpu.PackedTransformer
    llm, tokenizer = load_model(folder, dtype, device, model_class)
    llm.name, llm.sha256 = folder.name, model_fingerprint(folder)
    return llm, tokenizer


def load_model(folder, dtype=torch.float32, device="cpu", model_class=Transformer):
    """The frozen LLM in `folder` (model.py) and its tokenizer (tokenizer.py), checked to belong
    together: every token id has an embedding row, and eos (which ends every query) is one.
    model_class: model.Transformer or cpu.PackedTransformer."""
    model = model_class.from_pretrained(folder, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_pretrained(folder)
    rows = model.cfg.vocab_size
    if tokenizer.eos_id is None or not 0 <= tokenizer.eos_id < rows:
        raise ValueError(
            f"{folder}: the eos token id {tokenizer.eos_id} is missing or outside the "
            f"{rows}-row embedding table (query likelihood ends with eos)"
        )
    if tokenizer.vocab_size > rows:
        raise ValueError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} ids but the embedding "
            f"table 'model.embed_tokens.weight' has only {rows} rows"
        )
    return model, tokenizer


def compile_blocks(llm):
    """torch.compile every block of the LLM, dynamic shapes: one graph serves all batch sizes,
    lengths and blocks (weights are inputs). Inductor fuses the elementwise work around the
    matmuls into a few C++ loops; needs a C++ compiler and time to compile, so it is off unless
    asked for."""
    for layer in llm.layers:
        layer.compile(dynamic=True)
    return llm


def save_adapter(reranker, folder, llm, extra):
    """A peft-style adapter folder: the trainable parameters only (never the frozen LLM) in
    adapter_model.safetensors, and adapter_config.json with every QPEFTConfig field (the method
    among them), the base model's name and fingerprint, and `extra` (training data, dev history).
    Written beside and renamed into place (eval.atomic_folder): a failed save (disk full) leaves
    the earlier adapter as it was."""
    folder = Path(folder)
    if folder.is_dir() and (other := {p.name for p in folder.iterdir()} - ADAPTER_FILES):
        raise ValueError(
            f"{folder}: holds {sorted(other)[0]!r}, not only an adapter's files; the folder is "
            f"replaced whole, so save into a new or empty folder"
        )
    weights = {k: v.contiguous() for k, v in trainable_state(reranker).items()}
    base = {"base_model_name_or_path": llm.name, "base_model_sha256": llm.sha256}
    config = json.dumps({"qpeft": asdict(reranker.cfg), **base, **extra}, indent=1)

    def write(staging):
        save_file(weights, staging / ADAPTER_WEIGHTS)
        (staging / ADAPTER_CONFIG).write_text(config, encoding="utf-8")

    atomic_folder(write, folder)


def load_adapter(folder, llm, tokenizer, any_base_model=False):
    """A trained module from its adapter folder, refused on another base model than it was trained
    on (unless any_base_model); weights checked by name and shape."""
    folder = Path(folder)
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        files = f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        raise FileNotFoundError(f"{config_file}: missing (an adapter is a folder with {files})")
    try:
        config = read_json(config_file)
        cfg = QPEFTConfig(**config["qpeft"])
        base, base_sha = config["base_model_name_or_path"], config["base_model_sha256"]
    except (KeyError, TypeError) as e:  # TypeError: unknown or missing field
        error = f"{type(e).__name__}: {e}"
        raise ValueError(f"{config_file}: not an adapter config ({error})") from None
    except ValueError as e:  # a setting out of range: QPEFTConfig checks it, as for a flag
        raise ValueError(f"{config_file}: {e}") from None
    if base_sha != llm.sha256 and not any_base_model:
        raise ValueError(
            f"{folder}: trained on {base} (sha256 {base_sha[:12]}), not on {llm.name} "
            f"(sha256 {llm.sha256[:12]}); --any-base-model loads it anyway"
        )
    reranker = Reranker(cfg, llm, Template(tokenizer, cfg.instruction))
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
def rerank(
    llm, template, rerankers, candidates, tokens, token_budget, desc, prefixes=None, share=(0, 1)
):
    """Scores {method: {qid: {docid: score}}} and seconds {method: s} for every (query,
    candidate) pair. Passages are batched by a token budget (length-bucketed); each batch's
    keys/values are computed once and shared by every method with the frozen instruction and by
    every query that has the passage. `prefixes`, a dict, keeps those keys/values for the next call
    on the same candidates (a training run's dev checks: the frozen prefix does not change).
    share (i, n): only passage batches i, i + n, ... and their pairs (rerank_everywhere deals them
    out). Each method is charged the shared passage pass too, as if it had run alone. desc None:
    no progress bar."""
    pairs_of = {}  # docid -> the qids that have it
    for qid, docids in candidates.items():
        for d in docids:
            pairs_of.setdefault(d, []).append(qid)
    docids = sorted(pairs_of)
    lengths = [len(template.prefix(tokens.passages[d])) for d in docids]
    batches = data.token_budget_batches(lengths, token_budget)
    seconds = {m: 0.0 for m in rerankers}
    shared_seconds, keys = 0.0, []
    values = {m: [] for m in rerankers}  # score tensors, read back to the host once at the end
    mine = range(share[0], len(batches), share[1])
    for b in tqdm(mine, desc=desc, unit="batch", disable=desc is None):
        batch = batches[b]
        passages = [tokens.passages[docids[i]] for i in batch]
        start = time.perf_counter()
        if prefixes is not None and b in prefixes:
            shared = prefixes[b]
        elif any(r.soft_prompt is None for r in rerankers.values()):
            shared = encode_prefixes(llm, template, None, passages)
        if prefixes is not None:
            prefixes[b] = shared
        shared_seconds += time.perf_counter() - start
        # (passage row, qid) of every pair in the batch; every method scores them in this order
        pairs = [(row, qid) for row, i in enumerate(batch) for qid in pairs_of[docids[i]]]
        keys += [(qid, docids[batch[row]]) for row, qid in pairs]
        for method, reranker in rerankers.items():
            start = time.perf_counter()
            own_prompt = reranker.soft_prompt is not None
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
    for method in rerankers:  # one host read per method
        for (qid, docid), value in zip(keys, torch.cat(values[method]).tolist() if keys else []):
            scores[method].setdefault(qid, {})[docid] = value
    passage_pass = {
        m: shared_seconds if r.soft_prompt is None else 0.0 for m, r in rerankers.items()
    }
    return scores, {m: seconds[m] + passage_pass[m] for m in rerankers}


def rerank_everywhere(
    llm, template, rerankers, candidates, tokens, token_budget, desc, prefixes=None
):
    """rerank with the passage batches dealt out over torchrun's processes: every process gets
    every score, and the slowest process's seconds. Process 0 alone shows the progress bar."""
    share = (process_index(), process_count())
    desc = desc if share[0] == 0 else None
    args = (llm, template, rerankers, candidates, tokens, token_budget, desc, prefixes, share)
    mine, seconds = rerank(*args)
    scores = {m: {} for m in rerankers}
    for shares in gather(mine):
        for method, of_query in shares.items():
            for qid, of_doc in of_query.items():
                scores[method].setdefault(qid, {}).update(of_doc)
    return scores, {m: max(s[m] for s in gather(seconds)) for m in rerankers}


def check_finite(scores, model):
    """NaN or inf would reach the runs and the table: an error naming method, query and passage."""
    for method, per_query in scores.items():
        for qid, docs in per_query.items():
            for docid, value in docs.items():
                if not math.isfinite(value):
                    raise ValueError(
                        f"{method} scored query {qid!r} passage {docid!r} as {value} "
                        f"(model {model}): non-finite scores are not ranked"
                    )


# ---- Texts to token ids within the module's limits -----------------------------------------
@dataclass
class TokenIds:
    """Token ids of passages and queries, kept apart: MS MARCO numbers both with the same kind
    of id strings (passage 1072603 and query 1072603 both exist), so one table would mix them."""

    passages: dict  # docid -> ids of " {passage}", cut to max_passage_tokens
    queries: dict  # qid -> ids of "{query}"
    cut: dict = field(default_factory=dict)  # "passages"/"queries" -> {cut, of, limit, mean}


def tokenize(tokenizer, cfg, queries, passages, log=None):
    """TokenIds of {qid: text} and {docid: text}, cut to the module's limits; a passage is
    tokenised with its leading space (the template ends with "Passage:")."""
    texts, cut = {d: " " + text for d, text in passages.items()}, {}
    # one id past each limit tells cut_to which texts were cut; the rest is never tokenised
    p_ids = data.tokenize_texts(tokenizer, texts, cfg.max_passage_tokens + 1)
    q_ids = data.tokenize_texts(tokenizer, queries, cfg.max_query_tokens + 1)
    p_ids = cut_to(p_ids, cfg.max_passage_tokens, "passages", log, cut)
    q_ids = cut_to(q_ids, cfg.max_query_tokens, "queries", log, cut)
    return TokenIds(passages=p_ids, queries=q_ids, cut=cut)


# ---- Token limits ---------------------------------------------------------------------------
def cut_to(ids, limit, what="", log=None, counts=None):
    """Token ids cut to `limit` (keeping the start); how many were cut goes to the log and to
    counts[what]."""
    cuts = sum(len(v) > limit for v in ids.values())
    if counts is not None:
        counts[what] = {"cut": cuts, "of": len(ids), "limit": limit}
    if cuts and log:
        log(f"{what}: {cuts} of {len(ids)} cut to {limit} tokens")
    return {k: v[:limit] for k, v in ids.items()}


def check_positions(llm, template, tokens, cfg):
    """The longest sequence any pair can make (its longest passage's prefix and longest query's
    suffix: no padded batch is longer) must fit the model's max_position_embeddings and its
    sliding window (model.py refuses longer sequences rather than attend differently)."""
    limits = {"positions": llm.cfg.max_positions, "sliding_window": llm.cfg.sliding_window}
    limits = {k: v for k, v in limits.items() if v is not None}
    if not limits or not tokens.queries:
        return
    kind, limit = min(limits.items(), key=lambda item: item[1])
    qid, query = max(tokens.queries.items(), key=lambda item: len(item[1]))
    hints = len(template.hints_open) + len(template.hints_close) + max(len(query), cfg.top_k)
    passage = max(tokens.passages.values(), key=len, default=[])
    longest = len(template.prefix(passage)) + hints + len(template.question) + len(query) + 1  # eos
    if longest > limit:
        raise ValueError(
            f"query {qid!r}: its longest sequence has {longest} tokens, more than the model's "
            f"{limit} {kind} (lower --max-query-tokens or --max-passage-tokens)"
        )
