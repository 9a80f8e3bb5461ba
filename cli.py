"""The command line of qpeft.py: train on a dataset's train split, choose on dev, rerank the
split asked for, and write runs, modules, metrics.json and a table (see README)."""

import argparse
import fcntl
import hashlib
import json
import platform
import shlex
import statistics
import sys
import time
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import eval as ir
from eval import atomic_save, read_json
from qpeft import LOSSES, METHODS, QPEFTConfig, Reranker, Template
from runtime import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    check_finite,
    check_positions,
    compile_blocks,
    load_adapter,
    load_llm,
    process_count,
    process_index,
    rerank_everywhere,
    setup_device,
    tokenize,
)
from train import (
    MEASURES,
    SELECT_ON,
    Setting,
    TrainConfig,
    dev_check,
    dev_line,
    evaluate_run,
    fit,
    qpeft_commit,
    training_inputs,
    with_tail,
)

# The table's measures: graded qrels (TREC DL) show recall, binary QA labels the paper's hit rates.
SHOWN_GRADED = {
    "ndcg_cut_10": "nDCG@10",
    "mrr_10": "MRR@10",
    "recall_10": "R@10",
    "recall_20": "R@20",
    "success_5": "HR@5",
}
SHOWN_BINARY = {
    "ndcg_cut_10": "nDCG@10",
    "mrr_10": "MRR@10",
    "success_1": "HR@1",
    "success_5": "HR@5",
    "success_20": "HR@20",
}


def mean_over_seeds(per_query_runs):
    """{qid: {measure: mean over the runs}}: a trained method's per-query values over its seeds."""
    first = per_query_runs[0]
    return {
        q: {m: sum(r[q][m] for r in per_query_runs) / len(per_query_runs) for m in first[q]}
        for q in first
    }


def ndcg_delta(per_query, name, base):
    """Mean nDCG@10 of `name` minus `base` and the two-sided paired t-test p-value over queries
    (None with fewer than 2 queries: no test is possible)."""
    a = {q: v["ndcg_cut_10"] for q, v in per_query[base].items()}
    b = {q: v["ndcg_cut_10"] for q, v in per_query[name].items()}
    if len(a.keys() & b.keys()) < 2:
        return statistics.fmean(b[q] - a[q] for q in a.keys() & b.keys()), None
    delta, _, p = ir.paired_t_test(a, b)
    return delta, p


# ---- Flags ----------------------------------------------------------------------------------
PRESETS = {
    # The default job (README has its measured wall time).
    "laptop": dict(depth=30, steps=100, methods="zeroshot,qpeft-a", train_data="", seeds=1),
    # The paper's protocol as far as this data allows: all 100 candidates, more steps, 1,474 train
    # queries, 3 seeds.
    "paper": dict(
        depth=100,
        steps=1500,
        methods="zeroshot,prompt,qpeft-r,qpeft-a",
        train_data="msmarco_train_extra",
        lr=3e-2,
        eval_every=100,
        patience=6,
        seeds=3,
    ),
    # Issue 27's best arm, not the paper's loss: a softmax over each question's positive and its
    # own BM25 negatives at temperature 3, one epoch, reranking at the paper's depth. Measured on
    # nq_small (README, Results): +0.013 nDCG@10 over zero-shot, 3 seeds, uncorrected p 0.041.
    "listwise": dict(
        depth=100,
        methods="zeroshot,qpeft-a",
        train_data="",
        loss="listwise",
        pointwise_weight=0.0,
        list_temperature=3.0,
        lr=1e-3,
        epochs=1,
        eval_every=150,
        patience=2,
        seeds=3,
    ),
}

# The range of each numeric flag that is not a QPEFTConfig or TrainConfig field (those check
# themselves: qpeft.check_fields): (lowest allowed, first not allowed or None).
RANGES = {
    "depth": (1, None),
    "token_budget": (1, None),
    "train_queries": (0, None),
    "seeds": (1, None),
}


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--data",
        help="dataset name under $QPEFT_HOME/data, or a BEIR-format folder: "
        "its train and dev splits train the methods, its --split is reranked",
    )
    p.add_argument("--run", help="rerank this TREC run instead (with --queries and --corpus)")
    p.add_argument("--queries", help="--run's queries: jsonl {_id, text} or tsv id<TAB>text")
    p.add_argument(
        "--corpus", help="--run's passages: jsonl {_id, text[, title]} or tsv id<TAB>text"
    )
    p.add_argument(
        "--qrels",
        help="judgments for --run or --requests (query-id<TAB>corpus-id<TAB>grade); "
        "without them the runs are written and nothing is evaluated",
    )
    p.add_argument(
        "--requests",
        help="rerank rank_llm JSONL requests instead ({query: {qid, text}, "
        "candidates: [{docid, score, doc}]}); writes JSONL in the same format too",
    )
    p.add_argument(
        "--model",
        default="SmolLM2-135M-Instruct",
        help="model name under $QPEFT_HOME/models, or a folder",
    )
    p.add_argument(
        "--preset", default="laptop", choices=sorted(PRESETS), help="defaults for the flags below"
    )
    p.add_argument(
        "--methods",
        help=f"comma-separated, from {','.join(METHODS)} (without --data: zeroshot; with "
        "--adapter: the rows to score, zeroshot and the adapters' methods, all by default)",
    )
    p.add_argument("--depth", type=int, help="rerank the top-N first-stage candidates")
    p.add_argument("--split", default="test", help="the split of --data to rerank and report")
    p.add_argument(
        "--train-data", help="extra train-only datasets, comma-separated (e.g. msmarco_train_extra)"
    )
    p.add_argument(
        "--out", default="runs/qpeft", help="output folder: runs, adapters, metrics.json, log.txt"
    )
    p.add_argument(
        "--adapter",
        help="rerank with these trained adapter folder(s), comma-separated, instead of training",
    )
    p.add_argument(
        "--any-base-model",
        action="store_true",
        help="load --adapter even on another base model than it was trained on",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda, cuda:N or mps (auto: cuda when available); "
        "under torchrun each process takes cuda:LOCAL_RANK",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="LLM compute dtype; auto: bfloat16 on CUDA and where the CPU multiplies it "
        "natively, else float32",
    )
    p.add_argument("--token-budget", type=int, default=4096, help="prompt tokens per scoring batch")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the LLM's blocks for reranking "
        "(needs a C++ compiler; see README, Speed)",
    )
    p.add_argument(
        "--train-queries", type=int, default=0, help="use only the first N train queries (0 = all)"
    )
    p.add_argument(
        "--seeds",
        type=int,
        help="train and score each trained method with N seeds "
        "(--seed, --seed + 1, ...); the table gives the mean and SD over them",
    )
    for f in fields(QPEFTConfig):
        if f.name != "method":
            add_field(p, f)
    for f in fields(TrainConfig):
        add_field(p, f)
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    args = p.parse_args(argv)
    if args.adapter and args.methods is None:  # zero-shot beside the adapters, whatever they are
        args.methods = ",".join(METHODS)
    if args.data is None and args.methods is None:
        args.methods = "zeroshot"
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for name, (low, high) in RANGES.items():
        value = getattr(args, name, None)
        if value is not None and not (low <= value and (high is None or value < high)):
            bound = f">= {low}" + (f" and < {high}" if high is not None else "")
            p.error(f"--{name.replace('_', '-')}: {value} is out of range (must be {bound})")
    check_flags(p, args)
    for settings in (QPEFTConfig, TrainConfig):
        try:
            pick(settings, args)
        except ValueError as e:  # "name: what is wrong" -> "--name: what is wrong"
            name, what = str(e).split(":", 1)
            p.error(f"--{name.replace('_', '-')}:{what}")
    return args


def check_flags(p, args):
    """The combinations of flags that make sense; p.error names the flag at fault."""
    if sum(x is not None for x in (args.data, args.run, args.requests)) == 0:
        p.error("give --data NAME, or --run FILE (with --queries and --corpus), or --requests FILE")
    if args.run and args.requests:
        p.error("--run and --requests: give one of them")
    if args.run and not (args.queries and args.corpus):
        p.error("--run needs --queries FILE and --corpus FILE")
    if (args.queries or args.corpus) and not args.run:
        p.error("--queries and --corpus go with --run")
    if args.qrels and not (args.run or args.requests):
        p.error("--qrels goes with --run or --requests (--data has its own qrels)")
    if args.loss is not None and args.loss not in LOSSES:
        p.error(f"--loss: unknown loss {args.loss!r} (choose from {', '.join(LOSSES)})")
    if unknown := [m for m in args.methods.split(",") if m not in METHODS]:
        p.error(f"--methods: unknown method {unknown[0]!r} (choose from {', '.join(METHODS)})")
    trained = [m for m in args.methods.split(",") if m != "zeroshot"]
    if trained and not args.adapter and args.data is None:
        p.error(
            f"--methods {trained[0]} trains on a dataset: add --data NAME, or rerank with "
            f"--adapter DIR"
        )


def add_field(parser, f):
    flag = "--" + f.name.replace("_", "-")
    if f.type in (bool, "bool"):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
    else:
        kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
        parser.add_argument(flag, type=kind, default=None)


def pick(dataclass_type, args):
    """A config from the CLI: the flags given, else the preset's, else the dataclass default."""
    given = {
        f.name: getattr(args, f.name)
        for f in fields(dataclass_type)
        if getattr(args, f.name, None) is not None
    }
    return dataclass_type(**given)


def provenance(args, argv, device, llm, files):
    """What a number depends on, recorded beside it in metrics.json: every resolved flag, the
    qpeft commit, versions, the device, the model's fingerprint (runtime.model_fingerprint) and the
    sha256 of every data file read (msmarco_small: 10 files, 7.1 MB, cheap to hash)."""
    return {
        "argv": argv if argv is not None else sys.argv[1:],
        "flags": vars(args),
        "qpeft_commit": qpeft_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": __import__("numpy").__version__,
        "device": device_name(device),
        "processes": process_count(),
        "model": {"name": llm.name, "sha256": llm.sha256},
        "data": {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files},
    }


def device_name(device):
    """The GPU's name, or the CPU's model name (Linux /proc/cpuinfo) and thread count."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type != "cpu":
        return str(device)
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
        if line.startswith("model name")
    ]
    return f"cpu ({names[0] if names else cpu}), {torch.get_num_threads()} threads"


# ---- The job, step by step ------------------------------------------------------------------
def main(argv=None):
    """The command line. Errors in the input (data, model folder, adapter, flags) are one line,
    `qpeft.py: error: ...`, and exit code 2, as in eval.py; --debug shows their traceback."""
    args = parse_args(argv)
    try:
        run_command(args, argv)
    except (ValueError, OSError) as e:  # OSError: a full or read-only disk, a missing file
        if args.debug:
            raise
        if isinstance(e, OSError) and e.filename and e.strerror:
            e = f"{e.filename}: {e.strerror}"
        print(f"qpeft.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


class Log:
    """Rank 0's log: to the terminal (around progress bars) and to out/log.txt. Lines wait until
    --out exists, and --out is made only once the inputs are read and checked."""

    def __init__(self, out):
        self.out, self.held = out, []

    def __call__(self, message):
        if process_index() == 0:
            tqdm.write(message)
            self.held.append(message)
            if self.out.is_dir():
                with open(self.out / "log.txt", "a", encoding="utf-8") as f:
                    f.write("\n".join(self.held) + "\n")
                self.held.clear()


def read_target(args):
    """(dataset, split, requests, files): what is reranked, the rank_llm records when the input is
    --requests, and the files read. Bad data fails here, before the minutes of loading a model."""
    dataset = data.load_dataset(args.data) if args.data else None
    requests = None
    if args.run:
        target = data.run_dataset(args.run, args.queries, args.corpus, args.qrels)
        files = [Path(f) for f in (args.run, args.queries, args.corpus, args.qrels) if f]
    elif args.requests:
        target, requests = data.requests_dataset(args.requests, args.qrels)
        files = [Path(f) for f in (args.requests, args.qrels) if f]
    else:
        target, files = dataset, []
    split = args.split if target is dataset else target.splits[0]
    if args.qrels and not target.qrels[split].keys() & target.runs[split].keys():
        raise ValueError(f"--qrels {args.qrels} judges none of the queries to rerank")
    for folder in args.adapter.split(",") if args.adapter else []:
        if not (Path(folder) / ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(f"--adapter {folder}: no {ADAPTER_CONFIG} there")
        module = read_json(Path(folder) / ADAPTER_CONFIG).get("qpeft")
        module = module if isinstance(module, dict) else {}  # load_adapter says what is wrong
        if (method := module.get("method")) in METHODS and method not in args.methods.split(","):
            raise ValueError(
                f"--methods {args.methods}: {folder} holds a {method} module; list {method} "
                f"to rerank with it, zeroshot too to score zero-shot beside it"
            )
        for key, value in module.items():
            if getattr(args, key, None) not in (None, value):  # a module flag it would override
                raise ValueError(
                    f"--{key.replace('_', '-')} {getattr(args, key)}: {folder} was trained with "
                    f"{key} {value!r}, and an adapter keeps its own module settings; drop the flag"
                )
        files += [Path(folder) / ADAPTER_CONFIG, Path(folder) / ADAPTER_WEIGHTS]
    return dataset, target, split, requests, files


def first_stage_of(target, split, depth, log, every_run_query=False):
    """{qid: {docid: score}} the whole first stage, and {qid: [docid]} its top `depth` to rerank:
    of the judged queries of a dataset's split, or (every_run_query: --run, --requests) of every
    query of the given run, judged or not. Queries without candidates or text are left out, as
    trec_eval leaves out queries missing from a run."""
    longest = max(map(len, target.runs.get(split, {}).values()), default=0)
    qids = list(target.runs[split]) if every_run_query else None
    first_stage = target.first_stage(split, max(1000, depth, longest), qids)  # a given run: whole
    if empty := [q for q in first_stage if not target.queries[q].strip()]:
        log(
            f"warning: {len(empty)} {split} queries have no text and are skipped "
            f"({', '.join(empty[:3])})"
        )
    first_stage = {q: docs for q, docs in first_stage.items() if docs and q not in empty}
    return first_stage, {q: list(docs)[:depth] for q, docs in first_stage.items()}


def adapters(args, llm, tokenizer):
    """{row name: reranker} of --adapter folders, named by their folder, and {row name: the
    training record saved with it, or None}; they share one pass over the passages, so they must
    share the instruction and the token limits."""
    rerankers, training = {}, {}
    for folder in args.adapter.split(","):
        name = Path(folder).name
        if any(c.isspace() for c in name):  # it becomes the run's tag
            raise ValueError(f"--adapter {folder}: the folder's name holds whitespace")
        if name in rerankers or name in ("bm25", "zeroshot"):
            raise ValueError(
                f"--adapter: two rows would be called {name!r} ({folder}); rename the folder"
            )
        rerankers[name] = load_adapter(folder, llm, tokenizer, args.any_base_model)
        training[name] = read_json(Path(folder) / ADAPTER_CONFIG).get("training")
    configs = [r.cfg for r in rerankers.values()]
    if len({(c.instruction, c.max_passage_tokens, c.max_query_tokens) for c in configs}) > 1:
        raise ValueError(
            "--adapter: the adapters differ in instruction or max_passage/query_tokens"
        )
    return rerankers, training


def run_name(method, seed, seeds):
    """Files and log lines of one trained run: the method, with the seed when there are several."""
    return method if seeds == 1 else f"{method}-seed{seed}"


def run_command(args, argv):
    out, log = Path(args.out), Log(Path(args.out))
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    read_json(out / "metrics.json")  # an earlier one it cannot merge into: now, not at the end
    dataset, target, split, requests, files = read_target(args)
    trains = not args.adapter and any(m != "zeroshot" for m in args.methods.split(","))
    extra_train = [data.load_dataset(n) for n in args.train_data.split(",") if n and trains]
    run_start, device = time.perf_counter(), setup_device(args.device)
    llm, tokenizer = load_model(args, argv, device, log)
    base_cfg, tc = pick(QPEFTConfig, args), pick(TrainConfig, args)
    if "qpeft-a" in args.methods.split(",") and llm.cfg.dim % base_cfg.heads:
        width = f"the width of {args.model} ({llm.cfg.dim})"
        raise ValueError(f"--heads {base_cfg.heads} does not divide {width}")

    every_run_query = target is not dataset  # --run, --requests
    first_stage, candidates = first_stage_of(target, split, args.depth, log, every_run_query)
    if not candidates:
        raise ValueError(f"{split}: no query has both a text and first-stage candidates to rerank")
    rerankers, adapter_training = adapters(args, llm, tokenizer) if args.adapter else ({}, {})
    if rerankers:  # the longest hint block any adapter can write must fit the model
        top_k = max(r.cfg.top_k for r in rerankers.values())
        base_cfg = replace(next(iter(rerankers.values())).cfg, top_k=top_k)
        if "zeroshot" in args.methods.split(","):
            limits = f"max_passage_tokens {base_cfg.max_passage_tokens}, max_query_tokens "
            limits += f"{base_cfg.max_query_tokens}, instruction {base_cfg.instruction!r}"
            log(f"zeroshot: scored with the adapters' settings ({limits}), as they are")
    template = Template(tokenizer, base_cfg.instruction)
    listed = args.methods.split(",")
    # with --adapter: the adapters, and zero-shot beside them when --methods lists it
    methods = ["zeroshot"] * ("zeroshot" in listed) + list(rerankers) if args.adapter else listed
    trained = [] if args.adapter else [m for m in methods if m != "zeroshot"]
    seeds = [tc.seed + i for i in range(args.seeds)]
    passages = {d: target.corpus[d] for docs in candidates.values() for d in docs}
    queries = {q: target.queries[q] for q in candidates}
    if trained:
        examples, dev, train_passages, train_queries = training_inputs(
            dataset, extra_train, tc, seeds, args.train_queries
        )
        for kind, texts, more in (
            ("passage", passages, train_passages),
            ("query", queries, train_queries),
        ):
            if clash := next((i for i in more if texts.get(i, more[i]) != more[i]), None):
                raise ValueError(
                    f"{kind} {clash!r} has one text in {target.name} and another "
                    f"in the training data; give them distinct ids"
                )
            texts.update(more)
    if trained or target is dataset:
        files += dataset_files([dataset] + extra_train * bool(trained))
    tokens = tokenize(tokenizer, base_cfg, queries, passages, log)
    check_positions(llm, template, tokens, base_cfg)
    record = provenance(args, argv, device, llm, sorted(set(files)))
    record["truncation"] = tokens.cut  # of every text this run tokenised
    out.mkdir(parents=True, exist_ok=True)
    log_provenance(record, log)
    log(f"data {target.name}: {len(candidates)} {split} queries x depth {args.depth}")
    metrics = {}  # this command's rows, merged into metrics.json at the end (save_metrics)
    groups = {m: [m] for m in methods if m not in trained}  # table row -> its runs (one per seed)
    for name, training in adapter_training.items():  # the adapter's own record, not a stale one
        metrics.setdefault(name, {})["training"] = training
    if "zeroshot" in groups:
        rerankers["zeroshot"] = Reranker(QPEFTConfig(method="zeroshot"), llm, template)
    if trained:
        reference = log_training_inputs(llm, template, examples[seeds[0]], dev, tc, tokens, log)
        metrics.setdefault("zeroshot", {})["dev_check"] = reference
        setting = Setting(llm, tokenizer, dev, tokens, Path(args.out), log, args.resume)
        for method in trained:
            cfg = replace(base_cfg, method=method)
            runs = train_seeds(setting, cfg, tc, seeds, examples, args)
            for name, (reranker, training) in runs.items():
                rerankers[name] = reranker
                if training:  # None: an adapter reused by --resume keeps its earlier record
                    metrics.setdefault(name, {})["training"] = training
            groups[method] = list(runs)
    if args.compile:  # after training: compiling the backward graphs would cost more than it saves
        compile_blocks(llm)
    scores, timing = rerank_everywhere(
        llm, template, rerankers, candidates, tokens, args.token_budget, f"rerank {split}"
    )
    check_finite(scores, args.model)
    if process_index() == 0:  # every score is here: rank 0 evaluates, then writes all at once
        runs = {"bm25": first_stage}
        runs.update({name: with_tail(scores[name], first_stage) for name in rerankers})
        outputs, table = ir.Outputs(), None
        write_runs(runs, split, requests, out, outputs.add)
        if any(target.qrels[split].get(q) for q in candidates):  # a reranked query is judged
            table = report(
                target,
                split,
                args,
                metrics,
                runs,
                candidates,
                groups,
                rerankers,
                timing,
                record,
                outputs.add,
            )
        else:
            for row in groups:
                entry = {"queries": len(candidates), "depth": args.depth, "provenance": record}
                metrics.setdefault(row, {})[split] = entry
        outputs.commit()
        save_metrics(metrics, out)
        log(table or f"no qrels for {split}: runs written to {out}/, nothing evaluated")
    seconds = time.perf_counter() - run_start
    log(f"total wall time {seconds:.0f} s; runs, adapters and metrics.json in {out}/")
    if dist.is_initialized():  # leave together: a process that tears its connections down while
        dist.barrier()  # process 0 still writes was once seen to abort (SIGABRT) under load
        dist.destroy_process_group()


def train_seeds(setting, cfg, tc, seeds, examples, args):
    """{run name: (reranker, training record)}: the method of `cfg` trained once per seed, each
    run saved as the adapter folder --out/{run name} (train.fit)."""
    inputs = {
        "data": Path(args.data).name,
        "train_data": [n for n in args.train_data.split(",") if n],
    }
    runs = {}
    for seed in seeds:
        name = run_name(cfg.method, seed, len(seeds))
        runs[name] = fit(setting, cfg, replace(tc, seed=seed), examples[seed], name, inputs)
    return runs


def load_model(args, argv, device, log):
    """The frozen LLM and its tokenizer, and the command line and the model in the log."""
    start = time.perf_counter()
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    llm, tokenizer = load_llm(args.model, dtype, device)
    log(f"$ python qpeft.py {shlex.join(argv if argv is not None else sys.argv[1:])}")
    where = f"cpu x {torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    where += f", {process_count()} processes" if process_count() > 1 else ""
    size = sum(p.numel() for p in llm.parameters()) / 1e6
    dtype = str(llm.tok_embeddings.weight.dtype).removeprefix("torch.")
    seconds = time.perf_counter() - start
    log(
        f"model {args.model}: {size:.1f}M frozen parameters, {dtype}, {where}, loaded in "
        f"{seconds:.1f} s"
    )
    return llm, tokenizer


def dataset_files(datasets):
    """The files of BEIR folders that a run reads, for their fingerprints."""
    patterns = ("*.jsonl", "qrels/*.tsv", "runs/*.trec")
    return [f for d in datasets for pattern in patterns for f in sorted(d.path.glob(pattern))]


def log_provenance(record, log):
    log(
        f"provenance: qpeft {record['qpeft_commit']}, python {record['python']}, torch "
        f"{record['torch']}, {record['device']}, model sha256 {record['model']['sha256'][:12]}, "
        f"{len(record['data'])} data files fingerprinted (all in metrics.json)"
    )


def write_runs(runs, split, requests, out, save):
    """A TREC run per row, and rank_llm JSONL beside it when the input was --requests."""
    for name, run in runs.items():
        ir.write_run(out / f"{name}.{split}.trec", run, name.replace("-", "_"), save)
        if requests is not None:
            data.write_requests(out / f"{name}.{split}.jsonl", requests, run, save)


def save_metrics(rows, out):
    """Merge this command's rows into out/metrics.json per row and key (a split, "training",
    "dev_check"), reading the file at write time under a lock: the rows of other commands on the
    same --out stay, even of one that wrote while this one ran."""
    path = out / "metrics.json"
    with open(out / ".metrics.json.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        metrics = read_json(path)
        for row, entries in rows.items():
            metrics.setdefault(row, {}).update(entries)
        atomic_save(lambda f: Path(f).write_text(json.dumps(metrics, indent=1)), path)


def log_training_inputs(llm, template, examples, dev, tc, tokens, log):
    """What the trained methods learn from and are chosen on, and zero-shot's dev check: the
    reference every dev check is read against (returned, for metrics.json)."""
    sources = ", ".join(f"{n} {k}" for k, n in Counter(e.negative_source for e in examples).items())
    with_loss = sum(len(b) for b in dev.batches)
    per_epoch = max(1, len(examples) // tc.queries_per_batch)
    length = f"{tc.epochs} epochs of {per_epoch} steps" if tc.epochs else f"{tc.steps} steps"
    if tc.loss == "listwise":
        pool = statistics.fmean(len(e.list_negatives) for e in examples)
        loss = f"listwise, {tc.list_negatives} of a mean {pool:.1f} first-stage negatives, "
        loss += f"temperature {tc.list_temperature}"
    else:
        loss = f"paper (pointwise + hinge, margin {tc.margin})"
    fit = f"; train fit: {len(dev.fit.candidates)} train queries" if dev.fit else ""
    log(
        f"train: {len(examples)} queries, {length}, loss {loss}, hard negatives from: {sources} "
        f"(data.hard_negative_pool); dev: {len(dev.candidates)} queries of {dev.split} (depth "
        f"{tc.dev_depth}; {with_loss} with a positive and a hard negative for the loss terms)"
        f"{fit}; modules chosen on dev {SELECT_ON}"
    )
    zeroshot = Reranker(QPEFTConfig(method="zeroshot"), llm, template)
    record = dev_check(llm, template, zeroshot, dev, tc, tokens)
    log(f"zeroshot: {dev_line(record)} (the dev reference)")
    return record


def report(target, split, args, metrics, runs, candidates, groups, rerankers, timing, record, save):
    """One metrics entry per method and the table: the mean over its seeds of each measure, their
    SD, and deltas with paired t-tests over queries on the per-query mean over seeds. The
    per-query values go to `save` (the command's Outputs)."""
    qrels, level = target.qrels[split], target.relevance_level(split)
    per_run = {name: evaluate_run(run, qrels, level) for name, run in runs.items()}
    for name, values in per_run.items():  # what a table is recomputed from (results/README.md)
        ir.write_per_query(Path(args.out) / f"{name}.{split}.per-query.tsv", values, save)
    per_query = {"bm25": per_run["bm25"]}
    per_query.update(
        {row: mean_over_seeds([per_run[n] for n in names]) for row, names in groups.items()}
    )
    n_pairs = sum(len(c) for c in candidates.values())
    for row in per_query:
        entry = {**ir.summarize(per_query[row]), "queries": len(per_query[row])}
        for base in ("bm25", "zeroshot"):
            if base in per_query and row not in (base, "bm25"):
                delta, p = ndcg_delta(per_query, row, base)
                entry[f"ndcg_cut_10_delta_{base}"], entry[f"ndcg_cut_10_p_{base}"] = delta, p
        if row in groups:
            names = groups[row]
            per_seed = {n: ir.summarize(per_run[n]) for n in names}
            entry.update(
                runs=names,
                per_run=per_seed,
                sd={
                    m: statistics.stdev(v[m] for v in per_seed.values()) if len(names) > 1 else 0.0
                    for m in entry
                    if m in MEASURES + ["mrr_10"]
                },
                best_steps=[metrics.get(n, {}).get("training", {}).get("best_step") for n in names],
                pairs_per_s=round(n_pairs * len(names) / sum(timing[n] for n in names), 2),
                depth=args.depth,
                trainable_parameters=rerankers[names[0]].trainable_parameters(),
            )
        metrics.setdefault(row, {})[split] = {**entry, "provenance": record}
    binary = all(g <= 1 for judged in qrels.values() for g in judged.values())
    return results_table(
        {row: metrics[row][split] for row in per_query},
        split,
        level,
        args.depth,
        SHOWN_BINARY if binary else SHOWN_GRADED,
    )


def results_table(results, split, level, depth, shown):
    """One row per method: the `shown` means (over seeds for trained methods, with nDCG@10's SD),
    nDCG@10 deltas to BM25 and zero-shot with p-values, the dev-chosen step of each seed, speed."""
    lines = [
        f"{split}: {results['bm25']['queries']} queries, BM25 top-{depth} reranked; "
        f"trec_eval semantics (nDCG graded; MRR/R/HR at relevance >= {level}; "
        f"queries in both run and qrels); trained methods: mean over seeds (SD of nDCG@10); "
        f"p: paired t-test over queries",
        f"{'method':10}{'seeds':>6}"
        + "".join(f"{v:>9}" for v in shown.values())
        + f"{'SD':>8}"
        + f"{'Δ BM25':>9}{'p':>7}{'Δ zero':>9}{'p':>7}{'pairs/s':>9}  best step",
    ]
    for name, r in results.items():
        runs = len(r.get("runs", [])) or ""
        row = f"{name:10}{runs:>6}" + "".join(f"{r[m]:9.4f}" for m in shown)
        row += f"{r['sd']['ndcg_cut_10']:8.4f}" if runs and runs > 1 else f"{'':8}"
        for base in ("bm25", "zeroshot"):
            key = f"ndcg_cut_10_delta_{base}"
            p = r.get(f"ndcg_cut_10_p_{base}")
            row += (
                (f"{r[key]:+9.4f}" + (f"{p:7.3f}" if p is not None else f"{'n/a':>7}"))
                if key in r
                else f"{'':16}"
            )
        row += f"{r['pairs_per_s']:9.1f}" if "pairs_per_s" in r else ""
        steps = [s for s in r.get("best_steps", []) if s is not None]
        lines.append(row + (f"  {','.join(map(str, steps))}" if steps else ""))
    if results["bm25"]["queries"] < 2:
        lines.append("p: n/a, a paired test needs at least 2 queries")
    return "\n".join(lines)
