"""Training a Q-PEFT module: the loss (method.md §5), AdamW steps, dev checks on a
ranking metric, early stopping, the best module kept, and resuming an interrupted run."""

import hashlib
import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
import eval as ir
from eval import atomic_save, read_json
from qpeft import (
    LOSS_TERMS,
    LOSSES,
    MEAN_OVER,
    METHODS,
    QPEFTConfig,
    Reranker,
    Template,
    batch_pairs,
    check_fields,
    encode_prefixes,
    list_pairs,
    pair_counts,
    ranking_loss,
    score_pairs,
    total_loss,
)
from runtime import (
    ADAPTER_CONFIG,
    check_positions,
    gather,
    load_adapter,
    process_count,
    process_index,
    rerank_everywhere,
    save_adapter,
    tokenize,
    trainable_state,
)


@dataclass
class TrainConfig:
    loss: str = "paper"  # "paper": pointwise + hinge (method.md §5); "listwise": not the paper's
    steps: int = 100  # optimizer steps, one per batch (the official code stepped per 2 pairs)
    epochs: int = 0  # if > 0, train this many passes over the train queries instead of `steps`
    queries_per_batch: int = 4  # paper: 4 (negatives: the batch's other positives + hard negatives)
    list_negatives: int = 7  # listwise: first-stage negatives per query (7: the paper's 8 pairs)
    list_temperature: float = 1.0  # listwise: softmax(S / T), S summed log p(q|d); 1: the posterior
    lr: float = 1e-2  # paper: 3e-2 (AdamW)
    weight_decay: float = 0.01  # paper: 0.01; never on E' (see train)
    margin: float = 0.0  # hinge margin on mean NLL (paper: 0.0-1.1)
    pointwise_weight: float = 1.0  # weight of the query-likelihood term (paper: 1; 0: hinge only)
    eval_every: int = 25  # steps between dev checks, 0: once per epoch (paper: dev loss per epoch)
    save_every: int = 25  # steps between resume checkpoints (and at every dev check)
    patience: int = 3  # stop after this many dev checks without a better dev SELECT_ON
    dev_queries: int = 0  # dev queries checked, the first usable ones (0: all)
    dev_depth: int = 20  # first-stage candidates reranked per dev query at each check
    fit_queries: int = 16  # train queries ranked at each check too: is the train set fitted?
    seed: int = 0

    def __post_init__(self):  # flags, resume files and API keywords all pass here
        check_fields(self, TRAIN_LOWEST)
        if self.loss not in LOSSES:
            raise ValueError(f"loss: {self.loss!r} is not one of {', '.join(LOSSES)}")


TRAIN_LOWEST = dict(steps=0, epochs=0, queries_per_batch=1, list_negatives=1, lr=0.0)
TRAIN_LOWEST.update(list_temperature=0.01)
TRAIN_LOWEST.update(weight_decay=0.0, margin=0.0, pointwise_weight=0.0, eval_every=0)
TRAIN_LOWEST.update(save_every=1, patience=1, dev_queries=0, dev_depth=1, fit_queries=0, seed=0)


def batch_loss(llm, template, reranker, batch, tokens, tc, share=(0, 1), epoch=0):
    """The loss of one batch (and its terms) through the fast path: each passage's keys/values
    computed once. With share (r, n), only the pairs of queries r, r + n, ... (process r of n under
    torchrun), each with the whole batch's negatives, and each term's mean weighed by the share's
    pairs over the whole batch's: the n shares add up to the whole batch's loss."""
    if tc.loss == "paper":
        pairs = batch_pairs(batch)
    else:
        pairs = list_pairs(batch, tc.list_negatives, tc.seed, epoch)
    whole = pair_counts(pairs)
    pairs = [p for p in pairs if p[0] % share[1] == share[0]]
    if not pairs:  # more processes than queries: a zero loss that still reaches every parameter
        device = llm.tok_embeddings.weight.device
        trainable = (p.sum() for p in reranker.parameters() if p.requires_grad)
        zero = sum(trainable, torch.zeros((), device=device)) * 0.0  # ()
        return zero, {k: zero.detach() for k in LOSS_TERMS[tc.loss]}
    docids = sorted({d for _, d, _ in pairs})
    row = {d: i for i, d in enumerate(docids)}
    # each distinct passage once; gradients only reach the prefix through the soft prompt
    with torch.set_grad_enabled(torch.is_grad_enabled() and reranker.soft_prompt is not None):
        prefix = encode_prefixes(llm, template, reranker, [tokens.passages[d] for d in docids])
    rows = [row[d] for _, d, _ in pairs]
    queries = [tokens.queries[batch[i].qid] for i, _, _ in pairs]
    passages = [tokens.passages[d] for _, d, _ in pairs]
    scores = score_pairs(llm, template, reranker, prefix, rows, queries, passages)  # (N,)
    lengths = torch.tensor([len(q) + 1 for q in queries], device=scores.device)  # (N,) query + eos
    loss, terms = ranking_loss(scores, pairs, tc, lengths)
    if share[1] == 1:
        return loss, terms
    mine = pair_counts(pairs)
    weight = {k: mine[over] / max(whole[over], 1) for k, over in MEAN_OVER.items()}
    terms = {k: v * weight[k] for k, v in terms.items()}
    return total_loss(terms, tc), terms


class TrainingLoss(nn.Module):
    """The reranker being trained, called for its loss: DistributedDataParallel (under torchrun)
    wraps a module and averages the gradients of what its forward computed."""

    def __init__(self, reranker):
        super().__init__()
        self.reranker = reranker

    def forward(self, llm, template, batch, tokens, tc, epoch):
        """The loss of this process's share of `batch` and its diagnostics (batch_loss)."""
        share = (process_index(), process_count())
        return batch_loss(llm, template, self.reranker, batch, tokens, tc, share, epoch)


@dataclass
class DevSet:
    """What a dev check looks at: loss terms and NLL diagnostics on (query, positive, hard
    negative) batches, and ranking measures on the first-stage candidates of the same queries
    (complete labels where the dataset has them: msmarco_small's dev.graded). `fit` holds a fixed
    set of train queries, ranked the same way: training-set fit beside dev generalisation."""

    split: str
    batches: list  # lists of TrainExamples
    candidates: dict  # qid -> [docid], the reranked top-N
    first_stage: dict  # qid -> {docid: score}, the whole list (the tail keeps its order)
    qrels: dict
    level: int  # relevance level of the binary measures
    prefixes: dict = field(default_factory=dict)  # passage keys/values: first check, reused after
    fit: "DevSet | None" = None  # train queries (no batches)


SELECT_ON = "ndcg_cut_10"  # the dev measure that picks the module and drives early stopping


@torch.no_grad()
def dev_check(llm, template, reranker, dev, tc, tokens, token_budget=4096):
    """Dev diagnostics of the module as it is now, with dropout off: the mean loss terms over the
    dev batches, the trec_eval means and the pairwise accuracy on the dev candidates, and the
    same ranking measures on the fit queries (prefixed fit_). The loss terms always use the
    paper's pairs (in-batch negatives included), whatever the training loss: the NLL gaps then
    compare across losses. The same on every process."""
    reranker.eval()
    record = {}
    paper = replace(tc, loss="paper")
    share = (process_index(), process_count())
    for batch in dev.batches:  # each process its share of every batch; the shares add up
        loss, terms = batch_loss(llm, template, reranker, batch, tokens, paper, share)
        for name, value in {"dev_loss": loss, **terms}.items():
            record[name] = record.get(name, 0.0) + value.item() / len(dev.batches)
    shares = gather(record)
    record = {name: sum(share[name] for share in shares) for name in record}
    record.update(rank_check(llm, template, reranker, dev, tokens, token_budget))
    if dev.fit is not None:
        fit = rank_check(llm, template, reranker, dev.fit, tokens, token_budget)
        record.update({f"fit_{m}": fit[m] for m in (SELECT_ON, "pairwise")})
    return {k: v if v is None else round(v, 6) for k, v in record.items()}


def rank_check(llm, template, reranker, checked, tokens, token_budget):
    """trec_eval means and the pairwise accuracy of the module on a DevSet's candidates."""
    # the frozen prefix's keys/values do not change with training; the soft prompt's do
    cached = checked.prefixes if reranker.soft_prompt is None else None
    scores, _ = rerank_everywhere(
        llm, template, {"m": reranker}, checked.candidates, tokens, token_budget, None, cached
    )
    run = with_tail(scores["m"], checked.first_stage)
    per_query = evaluate_run(run, checked.qrels, checked.level)
    pairwise = pairwise_accuracy(scores["m"], checked.qrels, checked.level)
    return {**ir.summarize(per_query), "pairwise": pairwise}


def pairwise_accuracy(scores, qrels, level):
    """Mean over queries of the share of (relevant, judged non-relevant) pairs among a query's
    scored candidates that the scores put in the right order, a tie counting half: every judged
    negative of the reranked list, not one. Queries without such a pair are left out; None when
    none has one (msmarco train judges only positives)."""
    shares = []
    for qid, scored in scores.items():
        judged = qrels.get(qid, {})
        pos = [s for d, s in scored.items() if judged.get(d, 0) >= level]
        neg = [s for d, s in scored.items() if 0 <= judged.get(d, -1) < level]  # < 0: unjudged
        if pos and neg:
            right = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
            shares.append(right / (len(pos) * len(neg)))
    return sum(shares) / len(shares) if shares else None


def dev_line(record):
    """One log line of a dev check: the dev loss, its terms and NLL gaps, the ranking measures."""
    fit = record.get(f"fit_{SELECT_ON}")
    return (
        f"dev loss {record['dev_loss']:.4f} (pointwise {record['pointwise']:.4f}, hinge "
        f"{record['hinge']:.4f}, active hinges {record['active']:.2f}), NLL gap to hard / "
        f"in-batch negatives {record['gap_hard']:+.3f} / {record['gap_in_batch']:+.3f}, pairwise "
        f"accuracy {record['accuracy']:.3f} (all judged: {number(record['pairwise'])}), nDCG@10 "
        f"{record['ndcg_cut_10']:.4f}, HR@5 {record['success_5']:.4f}"
        + (f"; train fit nDCG@10 {fit:.4f}" if fit is not None else "")
    )


def number(value):
    return "n/a" if value is None else f"{value:.3f}"


@dataclass
class Setting:
    """What the training runs of one command share: the frozen LLM and its tokenizer, the dev
    set, the token ids of every text they score, the output folder (None: no files), the log,
    and whether to resume interrupted runs there."""

    llm: object  # model.Transformer, frozen
    tokenizer: object
    dev: DevSet
    tokens: object  # runtime.TokenIds
    out: Path | None = None
    log: object = print
    resume: bool = False


def train(setting, reranker, train_examples, tc, name=None):
    """AdamW on the trainable parameters (fp32, like their optimizer state), early stopping on the
    dev ranking measure SELECT_ON; the module of the best dev check is kept, the untrained one
    (step 0) included. Training runs tc.epochs passes over the train queries (else tc.steps
    steps), with a dev check every tc.eval_every steps (0: every epoch); each check's record is
    appended to out/{name}.checks.jsonl as it is made. With `resume`, continues exactly (same
    batches, dropout masks and AdamW state) from out/{name}.resume.json + .safetensors, written
    every tc.save_every steps and at every check (out None: no files). `name` (default: the
    method) names the files and log lines of this run."""
    llm, dev, tokens, out, log = setting.llm, setting.dev, setting.tokens, setting.out, setting.log
    template = Template(setting.tokenizer, reranker.cfg.instruction)
    name = name or reranker.cfg.method
    # No weight decay on E': AdamW's decay would shrink all of its ~49k rows at every step, while a
    # batch's gradient reaches only the few dozen rows of its hint and query tokens.
    trainable = [(n, p) for n, p in reranker.named_parameters() if p.requires_grad]
    decayed = [p for n, p in trainable if n != "hint_embeddings.weight"]
    embeddings = [p for n, p in trainable if n == "hint_embeddings.weight"]
    groups = [{"params": decayed}, {"params": embeddings, "weight_decay": 0.0}]
    # fused: one kernel over all parameters instead of a loop over tensors; E' alone is 28M fp32
    # values updated at every step (its gradient is dense).
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=tc.lr, weight_decay=tc.weight_decay, fused=True
    )
    # Under torchrun each process computes its share of every batch's queries (batch_loss); DDP
    # averages the gradients, so each share's loss is scaled by the number of processes to make
    # the update the single-process one. It also broadcasts rank 0's initial weights.
    model = TrainingLoss(reranker)
    model = nn.parallel.DistributedDataParallel(model) if process_count() > 1 else model

    def snapshot():
        return {k: v.detach().clone() for k, v in trainable_state(reranker).items()}

    resume_files = (
        (out / f"{name}.resume.json", out / f"{name}.resume.safetensors") if out else None
    )
    # what a resumed run must share with the interrupted one: module, training, data
    data_digest = hashlib.sha256(json.dumps([asdict(e) for e in train_examples]).encode())
    llm_sha256 = getattr(llm, "sha256", None)  # runtime.load_llm's fingerprint of the model
    resume_config = [asdict(reranker.cfg), asdict(tc), data_digest.hexdigest(), llm_sha256]
    if setting.resume and resume_files and resume_files[0].exists():
        state = load_resume(resume_files, reranker, optimizer, resume_config)
        log(f"{name}: resumed at step {state['step']} from {resume_files[0]}")
    else:  # the untrained module is the first candidate: training must beat it on dev
        record = dev_check(llm, template, reranker, dev, tc, tokens)
        state = {
            "step": 0,
            "best": snapshot(),
            "best_step": 0,
            "best_dev": record,
            "bad_checks": 0,
            "history": [{"step": 0, **record}],
            "since_check": [0.0, 0.0, 0],  # train loss and accuracy sums, steps
        }
        log(f"{name}: step 0 (untrained) {dev_line(record)}")
    per_epoch = max(1, len(train_examples) // tc.queries_per_batch)  # a last small batch: next
    total = tc.epochs * per_epoch if tc.epochs else tc.steps
    check_every = tc.eval_every or per_epoch
    first = state["step"]  # 0, or the step a resumed run continues from
    bar = tqdm(
        range(first, total),
        desc=f"train {name}",
        initial=state["step"],
        total=total,
        disable=process_index() > 0,
    )
    for step in bar:
        if state["bad_checks"] >= tc.patience:
            gain = f"no dev {SELECT_ON} gain in {tc.patience} checks"
            log(f"{name}: early stop at step {step} ({gain})")
            break
        epoch, index = divmod(step, per_epoch)
        # a new shuffle each epoch (and at the first step of a resumed run), the same for the seed
        if index == 0 or step == first:
            epoch_batches = data.train_batches(
                train_examples, tc.queries_per_batch, seed=tc.seed, epoch=epoch
            )
        reranker.train()
        loss, terms = model(llm, template, epoch_batches[index], tokens, tc, epoch)
        (loss * process_count()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # the whole batch's loss and pairwise accuracy: the sum of the processes' shares
        loss, accuracy = (sum(v) for v in zip(*gather((loss.item(), terms["accuracy"].item()))))
        state["since_check"] = [a + b for a, b in zip(state["since_check"], (loss, accuracy, 1))]
        state["step"] = step + 1
        bar.set_postfix(loss=f"{loss:.3f}", epoch=epoch)
        checks = state["step"] % check_every == 0 or state["step"] == total
        if checks:
            record = dev_check(llm, template, reranker, dev, tc, tokens)
            loss_sum, accuracy_sum, n = state["since_check"]
            train_record = {
                "epoch": round(state["step"] / per_epoch, 3),
                "train_loss": round(loss_sum / n, 6),  # the mean over the steps since the last
                "train_accuracy": round(accuracy_sum / n, 4),
            }
            state["history"].append({"step": state["step"], **train_record, **record})
            state["since_check"] = [0.0, 0.0, 0]
            improved = record[SELECT_ON] > state["best_dev"][SELECT_ON]
            log(
                f"{name}: step {state['step']} (epoch {train_record['epoch']:g}) train loss "
                f"{train_record['train_loss']:.4f}, {dev_line(record)}"
                + (" (best)" if improved else "")
            )
            if improved:
                best = {"best_dev": record, "best_step": state["step"], "best": snapshot()}
                state.update(bad_checks=0, **best)
            else:
                state["bad_checks"] += 1
        if process_index() == 0 and out and (checks or state["step"] % tc.save_every == 0):
            save_resume(resume_files, reranker, optimizer, state, resume_config)
            if checks:  # the per-check record as it goes, one JSON line per check
                history = "".join(json.dumps(h) + "\n" for h in state["history"])
                atomic_save(lambda f: Path(f).write_text(history), out / f"{name}.checks.jsonl")
    bar.close()
    reranker.load_state_dict(state["best"])
    best = state["best_dev"][SELECT_ON]
    log(
        f"{name}: keeping the module of step {state['best_step']} (dev {SELECT_ON} {best:.4f})"
        + (": no training step beat the untrained module on dev" if state["best_step"] == 0 else "")
    )
    return reranker.eval(), state


def save_resume(files, reranker, optimizer, state, config):
    """Everything training needs to continue, without pickle (a pickle runs code when read): the
    tensors (module, best module, AdamW moments, RNG states) as safetensors, the rest as JSON.
    The tensors go to a file of this save, out/{name}.resume.step{N}-{id}.safetensors; the JSON,
    written last, names that file and the save's id, which the file holds too: the pair cannot
    tear, and an interrupted save leaves the previous pair whole. Older tensor files go after."""
    json_file, tensor_base = files
    save_id = f"step{state['step']}-{os.urandom(6).hex()}"
    tensor_file = tensor_base.with_name(f"{tensor_base.stem}.{save_id}.safetensors")
    optim = optimizer.state_dict()
    tensors = {
        **{f"module.{k}": v for k, v in reranker.state_dict().items()},
        **{f"best.{k}": v for k, v in state["best"].items()},
        **{
            f"optimizer.{i}.{k}": v
            for i, moments in optim["state"].items()
            for k, v in moments.items()
        },
        "rng.cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_save(lambda f: save_file(tensors, f, metadata={"save_id": save_id}), tensor_file)
    meta = {
        "config": config,
        "tensors": tensor_file.name,
        "save_id": save_id,
        "param_groups": optim["param_groups"],
        "state": {k: v for k, v in state.items() if k != "best"},
    }
    atomic_save(lambda f: Path(f).write_text(json.dumps(meta)), json_file)
    for old in tensor_base.parent.glob(f"{tensor_base.stem}.step*.safetensors"):
        if old != tensor_file:
            old.unlink(missing_ok=True)


def load_resume(files, reranker, optimizer, config):
    """The training state save_resume wrote, loaded into `reranker` and `optimizer`; the RNG
    continues where it was (dropout masks as if never interrupted). Returns train()'s state."""
    json_file = files[0]
    meta = read_json(json_file, required=True)
    if not {"config", "tensors", "save_id", "param_groups", "state"} <= meta.keys():
        raise ValueError(f"{json_file}: not a resume file of this version; delete it to start over")
    if meta["config"] != config:
        raise ValueError(
            f"{json_file} was written with other settings; "
            f"rerun with the same flags or without --resume"
        )
    tensor_file = json_file.with_name(meta["tensors"])
    try:
        with safe_open(tensor_file, "pt") as f:
            save_id = (f.metadata() or {}).get("save_id")
        tensors = load_file(tensor_file)
    except Exception as e:  # missing, truncated or not safetensors: safetensors' own error types
        raise ValueError(f"{tensor_file}: unreadable resume state ({e})") from None
    if save_id != meta["save_id"]:
        raise ValueError(f"{tensor_file} is not the save {json_file} describes ({save_id})")
    device = next(reranker.parameters()).device
    part = {
        kind: {k[len(kind) + 1 :]: v for k, v in tensors.items() if k.startswith(kind + ".")}
        for kind in ("module", "best", "optimizer")
    }
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


def make_dev_set(dataset, tc, train_set=None, train_examples=()):
    """The dev queries a training run is checked on: the first `dev_queries` (0: all) of the
    completely judged split where there is one (dev.graded), else of dev; the loss terms use those
    of them that have a positive and a hard negative. With train_set, its fit set too: the first
    `fit_queries` of train_examples, ranked at the same depth."""
    if "dev" not in dataset.splits:
        raise ValueError(
            f"{dataset.path} has no dev split (qrels/dev.tsv), needed to choose the "
            f"module; use --adapter DIR to rerank with a trained one"
        )
    split = "dev.graded" if "dev.graded" in dataset.splits else "dev"
    first_stage = dataset.first_stage(split, 1000)
    qids = [q for q in dataset.qrels[split] if first_stage[q]][: tc.dev_queries or None]
    examples = [e for e in data.training_examples(dataset, split, seed=0) if e.qid in qids]
    batches = data.train_batches(examples, tc.queries_per_batch, seed=0)
    dev = ranked_set(dataset, split, first_stage, qids, tc.dev_depth, batches)
    if not dev.batches:
        raise ValueError(
            f"{dataset.name}: the {split} split has no query with a positive and a hard negative"
        )
    if train_set is not None and tc.fit_queries:
        fit_qids = [e.qid for e in train_examples[: tc.fit_queries]]
        ranked = train_set.first_stage("train", 1000, fit_qids)
        dev.fit = ranked_set(train_set, "train", ranked, fit_qids, tc.dev_depth)
    return dev


def ranked_set(dataset, split, first_stage, qids, depth, batches=()):
    """A DevSet of `qids`: their top-`depth` first-stage candidates to rerank, their whole first
    stage (the tail keeps its order), their judgments, and `batches` for the loss terms."""
    return DevSet(
        split,
        list(batches),
        {q: list(first_stage[q])[:depth] for q in qids},
        {q: first_stage[q] for q in qids},
        {q: dataset.qrels[split][q] for q in qids},
        dataset.relevance_level(split),
    )


def training_inputs(dataset, extra_train, tc, seeds, train_queries=0):
    """({seed: train examples}, dev set, {docid: text}, {qid: text}): each seed draws its own
    positives and hard negatives from the train splits of `dataset` and `extra_train`; the texts
    are every passage and query training and dev checks will score."""
    train_set = data.merge_datasets(dataset, *extra_train)
    if "train" not in train_set.splits:
        raise ValueError(
            f"{dataset.path} has no train split (qrels/train.tsv) to train on; use "
            f"--adapter DIR to rerank with a trained module"
        )
    examples = {}
    for seed in seeds:
        drawn = data.training_examples(train_set, "train", seed=seed)
        examples[seed] = drawn[: train_queries or None]  # the first train_queries (0: all)
        if not examples[seed]:
            raise ValueError(
                f"{train_set.name}: the train split has no query with a positive and "
                f"a hard negative"
            )
    # the fit queries: the same for every seed (the examples keep the qrels' order)
    dev = make_dev_set(dataset, tc, train_set, examples[seeds[0]])
    passages, queries = {}, {}
    for e in [e for ex in examples.values() for e in ex] + [e for b in dev.batches for e in b]:
        # the listwise pools of train queries (dev checks score the paper's pairs)
        listed = e.list_negatives if tc.loss == "listwise" and e.qid not in dev.candidates else ()
        for docid in (e.positive_docid, e.hard_negative_docid, *listed):
            passages[docid] = train_set.corpus[docid]
        queries[e.qid] = train_set.queries[e.qid]
    for checked, texts in ((dev, dataset), (dev.fit, train_set)):
        if checked is not None:
            ranked = {d for docs in checked.candidates.values() for d in docs}
            passages.update({d: texts.corpus[d] for d in ranked})
            queries.update({q: texts.queries[q] for q in checked.candidates})
    return examples, dev, passages, queries


def fit(setting, cfg, tc, examples, name, extra=None):
    """One trained module and its training record: trained (or, with setting.resume and a
    finished adapter in out/name, reloaded) and saved as the adapter folder out/name (out None:
    unsaved)."""
    llm, out, log = setting.llm, setting.out, setting.log
    folder = out / name if out else None
    if setting.resume and folder and (folder / ADAPTER_CONFIG).exists():
        reranker = load_adapter(folder, llm, setting.tokenizer)
        saved = read_json(folder / ADAPTER_CONFIG, required=True)
        same_run = {"seed": tc.seed, **(extra or {})}
        found = {"seed": saved["train"]["seed"], **{k: saved.get(k) for k in extra or {}}}
        # its prompt, cut or shape, or its seed or data, would not be this run's
        if reranker.cfg != cfg or found != same_run:
            raise ValueError(
                f"{folder} was trained with other settings ({asdict(reranker.cfg)}, {found}); "
                f"rerun with the same flags or without --resume"
            )
        ignored = "training flags such as --steps are ignored"
        log(f"{name}: reusing trained adapter {folder} ({ignored})")
        return reranker, saved["training"]
    torch.manual_seed(tc.seed)  # a method's initial weights do not depend on which ran before
    reranker = Reranker(cfg, llm, Template(setting.tokenizer, cfg.instruction))
    log(f"{name}: {reranker.trainable_parameters():,} trainable parameters (fp32), seed {tc.seed}")
    start = time.perf_counter()
    reranker, state = train(setting, reranker, examples, tc, name)
    record = {
        "seconds": round(time.perf_counter() - start, 1),
        "seed": tc.seed,
        "steps": state["step"],
        "best_step": state["best_step"],
        "best_dev": state["best_dev"],
        "dev_split": setting.dev.split,
        "train_queries": len(examples),
        "history": state["history"],
    }
    if folder and process_index() == 0:
        meta = {"train": asdict(tc), "training": record, "qpeft_commit": qpeft_commit()}
        save_adapter(reranker, folder, llm, {**meta, **(extra or {})})
        # (and the single tensor file of versions before 282b6ed)
        for file in [*out.glob(f"{name}.resume.json"), *out.glob(f"{name}.resume*.safetensors")]:
            file.unlink(missing_ok=True)
    return reranker, record


def train_adapter(llm, tokenizer, method, data_name, out, log, **settings):
    """api.train_adapter after the model is loaded: the reranker of `method` trained on the
    dataset `data_name`, chosen on its dev split, saved in out/method when out is given."""
    own = {f.name for f in fields(QPEFTConfig)} - {"method"}
    if unknown := settings.keys() - own - {f.name for f in fields(TrainConfig)} - {"train_data"}:
        raise TypeError(f"train_adapter: unknown setting {sorted(unknown)[0]!r}")
    if method not in METHODS or method == "zeroshot":
        raise ValueError(f"train_adapter: method {method!r} is not one that trains ({METHODS[1:]})")
    cfg = QPEFTConfig(method=method, **{k: v for k, v in settings.items() if k in own})
    tc = TrainConfig(**{k: v for k, v in settings.items() if k in asdict(TrainConfig())})
    dataset = data.load_dataset(data_name)
    train_data = settings.get("train_data", [])  # names, or one comma-separated string
    train_data = train_data.split(",") if isinstance(train_data, str) else train_data
    extra = [data.load_dataset(n) for n in train_data if n]
    examples, dev, passages, queries = training_inputs(dataset, extra, tc, [tc.seed])
    tokens = tokenize(tokenizer, cfg, queries, passages, log)

    check_positions(llm, Template(tokenizer, cfg.instruction), tokens, cfg)
    if method == "qpeft-a" and llm.cfg.dim % cfg.heads:
        raise ValueError(f"heads={cfg.heads} does not divide the model's width ({llm.cfg.dim})")
    out = Path(out) if out is not None else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    names = {"data": dataset.name, "train_data": [d.name for d in extra]}
    setting = Setting(llm, tokenizer, dev, tokens, out, log)
    reranker, _ = fit(setting, cfg, tc, examples[tc.seed], method, extra=names)
    return reranker


def qpeft_commit():
    """The git commit of this code ("+uncommitted changes" when the tree differs), or "unknown"."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+uncommitted changes" if dirty.strip() else "")


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


MEASURES = ["ndcg_cut_10", "recall_10", "recall_20", "success_1", "success_5", "success_20"]


def evaluate_run(run, qrels, level):
    """Per-query MEASURES and MRR@10 (recip_rank on the top 10: trec_eval's has no cutoff)."""
    per_query = ir.evaluate(qrels, run, MEASURES, relevance_level=level)
    mrr = ir.evaluate(qrels, ir.cut_run(run, 10), ["recip_rank"], relevance_level=level)
    for qid in per_query:
        per_query[qid]["mrr_10"] = mrr[qid]["recip_rank"]
    return per_query
