"""The command line of qpeft.py: train on a dataset's train split, choose on dev, rerank the
split asked for, and write runs, modules, metrics.json and a table (see README)."""

import argparse
import hashlib
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import eval as ir
from model import default_dtype, find_asset, load
from qpeft import (METHODS, QPEFTConfig, Reranker, Template, TokenIds, atomic_save,
                   check_positions, cut_to, load_module, rank, rerank, save_module, setup_device,
                   world)
from train import (MEASURES, SELECT_ON, TrainConfig, dev_check, dev_line, evaluate_run, make_dev_set, train,
                   with_tail)

# The table's measures: graded qrels (TREC DL) show recall, binary QA labels the paper's hit rates.
SHOWN_GRADED = {"ndcg_cut_10": "nDCG@10", "mrr_10": "MRR@10", "recall_10": "R@10", "recall_20": "R@20",
                "success_5": "HR@5"}
SHOWN_BINARY = {"ndcg_cut_10": "nDCG@10", "mrr_10": "MRR@10", "success_1": "HR@1", "success_5": "HR@5",
                "success_20": "HR@20"}
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
# Flags
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


