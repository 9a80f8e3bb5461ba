"""How fast qpeft runs on this machine, in one run: `python bench.py` (no flags needed; `--device
cuda` on a GPU, `--shape tinyllama-1.1b` or `llama2-7b` for random weights in those shapes).

1. the matmul peak of this device in the dtype used (the fastest of five sizes), the yardstick for
   everything below;
2. zero-shot and Q-PEFT-A scoring of msmarco_small test pairs: pairs/s, tokens/s, GFLOP/s, % of
   peak;
3. Q-PEFT-A training steps: the fast path (passage keys/values computed once per batch, logits only
   at query positions) against the naive one (qpeft.score: each pair's whole sequence on its own);
4. if `transformers` is importable, the same pairs through LlamaForCausalLM, same dtype and batches;
5. on the CPU, zero-shot scoring and training through the other of model.Transformer (SDPA over
   padded batches) and cpu.PackedTransformer (runtime.load_llm's choice for float32 on the CPU):
   the packed path stays only while it is faster here;
6. zero-shot scoring again with torch.compile'd blocks (qpeft.py --compile), where inductor works.
Timings on shared machines are noisy: compare the ratios within one run, not across runs.
The last line is one JSON object with the headline figures.

FLOP accounting (useful work only: padding is not counted, and the head shared by all passages,
bos + instruction + "Passage:", counts once per batch, as it runs): 2 x (frozen LLM parameters
outside the embedding table) per token forward, plus 4 x heads x head_dim per layer for each
(query, key) pair that causal attention computes (scores and weighted values), plus 2 x dim x vocab
per position where logits are computed; a training step's backward through the frozen LLM doubles
the work of the tokens after the passage (input gradients only, no weight gradients).
Every timing is the best of `--repeats` runs after one untimed run, like the matmul peak it is
compared with.
"""

import argparse
import json
import time

import torch

import cpu
import data
import qpeft
import runtime
import train
from model import LlamaConfig, Transformer, rope_frequencies

# Random weights in the shapes of bigger Llamas (config.json values), with the tokenizer of --model:
# the vocabulary is the tokenizer's, so the logits cost what that tokenizer's would.
SHAPES = {
    "tinyllama-1.1b": dict(
        dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, head_dim=64, hidden_dim=5632
    ),
    "llama2-7b": dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, hidden_dim=11008
    ),
}


def random_model(cfg, shape, dtype, device, model_class):
    """A frozen Llama with `cfg`'s vocabulary and special ids in `shape`, random N(0, 0.02)
    matrices and unit norms (GPT-2's init: the residual stream stays tame over many layers)."""
    cfg = LlamaConfig(**{**vars(cfg), **shape, "tie_embeddings": False})
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
            else:
                p.fill_(1.0)
    model.inv_freq = rope_frequencies(cfg).to(device)  # fp32, whatever the weights' dtype
    return model.eval().requires_grad_(False)


def synchronize(device):
    """Wait for the device's queued work, so that wall times measure it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# prompt tokens per scoring batch: qpeft.py's --token-budget default, for every path below
TOKEN_BUDGET = 4096


def matmul_peak(dtype, device, sizes=(768, 1024, 1280, 1536, 2048), flop_per_try=1e11):
    """GFLOP/s of the fastest n x n x n matmul over a few sizes, best of 3 tries each: the
    machine's practical peak. One size is not enough: on some CPUs a mid-sized matmul runs faster
    than the largest, and the model's own weight shapes can beat a one-size "peak"."""
    best_gflops = 0.0
    if device.type == "cuda":  # a GPU needs bigger matmuls and more of them to reach its peak
        sizes, flop_per_try = (4096, 8192, 16384), 1e14
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        a @ b
        repeats = max(1, round(flop_per_try / (2 * n**3)))
        for _ in range(3):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            synchronize(device)
            best_gflops = max(best_gflops, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best_gflops


def timed(fn, repeats, device):
    """fn's result and its best wall time over `repeats` calls, after one untimed call: the first
    pass grows the heap to its working set (page faults a short warm-up does not exhaust) and
    compiles, under --compile."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return result, best


def reset_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """MB of device memory at its peak since reset_memory (CUDA only; nan elsewhere)."""
    if device.type != "cuda":
        return float("nan")
    return torch.cuda.max_memory_allocated(device) / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--data", default="msmarco_small")
    p.add_argument("--queries", type=int, default=8, help="test queries to score")
    p.add_argument("--depth", type=int, default=20, help="candidates per query")
    p.add_argument("--train-steps", type=int, default=4, help="training steps timed per path")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best counts")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="auto: bfloat16 on CUDA and where the CPU multiplies it natively, else float32",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--shape",
        default=None,
        choices=sorted(SHAPES),
        help="random weights in this model's shape instead of --model's (its tokenizer is kept)",
    )
    args = p.parse_args(argv)
    device = runtime.setup_device(args.device)
    if args.dtype == "auto":
        args.dtype = str(runtime.default_dtype(device))[len("torch.") :]
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    where = str(device)
    if device.type == "cpu":
        where = f"{torch.get_num_threads()} threads"
    elif device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    peak = matmul_peak(dtype, device)
    print(
        f"matmul peak ({where}): {args.dtype} {peak:.0f} GFLOP/s (measured again at the end; "
        "the higher counts)"
    )

    model_dir = data.find_asset(args.model, "models")
    llm, tokenizer = runtime.load_llm(model_dir, dtype, device)
    # the same weights in the other model class, to measure what the CPU's packed path earns
    other, other_name = None, ""
    if device.type == "cpu":
        packed = isinstance(llm, cpu.PackedTransformer)
        other_class, other_name = (
            (Transformer, "SDPA") if packed else (cpu.PackedTransformer, "packed")
        )
        if args.shape:  # random weights in another shape: the other class gets the same
            other = random_model(llm.cfg, SHAPES[args.shape], dtype, device, other_class)
        else:
            other = other_class.from_pretrained(model_dir, dtype, device)
    if args.shape:
        llm = random_model(llm.cfg, SHAPES[args.shape], dtype, device, type(llm))
    cfg = llm.cfg
    # Parameters outside the embedding table and lm_head (named_parameters lists a tied table once).
    tables = ("tok_embeddings.weight", "output.weight")
    dense = sum(p.numel() for n, p in llm.named_parameters() if n not in tables)
    dataset = data.load_dataset(args.data)
    candidates = dict(list(dataset.candidates("test", args.depth).items())[: args.queries])
    template = qpeft.Template(tokenizer, qpeft.QPEFTConfig().instruction)
    examples = data.training_examples(dataset, "train", seed=0)
    texts = {d: " " + dataset.corpus[d] for docs in candidates.values() for d in docs}
    train_docids = [d for e in examples for d in (e.positive_docid, e.hard_negative_docid)]
    texts.update({d: " " + dataset.corpus[d] for d in train_docids})
    query_ids = list(candidates) + [e.qid for e in examples]
    max_tokens = qpeft.QPEFTConfig().max_passage_tokens
    tokens = runtime.TokenIds(
        passages=data.tokenize_texts(tokenizer, texts, max_tokens=max_tokens),
        queries=data.tokenize_texts(tokenizer, {q: dataset.queries[q] for q in query_ids}),
    )
    pairs = [(q, d) for q, docs in candidates.items() for d in docs]
    # P + passage tokens
    prefix_len = {d: len(template.prefix(ids)) for d, ids in tokens.passages.items()}
    n_pairs = len(pairs)
    zeroshot = qpeft.Reranker(qpeft.QPEFTConfig(method="zeroshot"), llm, template)
    qpeft_a = qpeft.Reranker(qpeft.QPEFTConfig(method="qpeft-a"), llm, template).eval()

    def attention_flops(start, length):
        """Scores and weighted values of `length` tokens at positions start.. (causal: key count =
        position + 1)."""
        key_pairs = (start + 1 + start + length) * length // 2
        return 4 * cfg.n_heads * cfg.head_dim * cfg.n_layers * key_pairs

    head = len(template.head)

    def passage_work(n_batches, docids):
        """Tokens and forward FLOPs of the passage passes: the shared head (bos, P, "Passage:") once
        per batch, then each passage's own tokens, which also attend to the head."""
        own = [prefix_len[d] - head for d in docids]
        n_tokens = n_batches * head + sum(own)
        attention = n_batches * attention_flops(0, head) + sum(
            attention_flops(head, n) for n in own
        )
        return n_tokens, 2 * dense * n_tokens + attention

    def scoring_flops(hint_tokens):
        docids = sorted({d for _, d in pairs})  # once per passage
        # passage batches as rerank makes them
        n_batches = len(data.token_budget_batches([prefix_len[d] for d in docids], TOKEN_BUDGET))
        prefix_tokens, prefix_flops = passage_work(n_batches, docids)
        targets = sum(len(tokens.queries[q]) + 1 for q, _ in pairs)
        suffix_len = {
            q: len(template.question) + hint_tokens(q) + len(tokens.queries[q]) + 1
            for q in candidates
        }
        suffixes = [(prefix_len[d], suffix_len[q]) for q, d in pairs]
        n_tokens = prefix_tokens + sum(n for _, n in suffixes)
        flops = (
            prefix_flops
            + 2 * dense * sum(n for _, n in suffixes)
            + 2 * cfg.dim * cfg.vocab_size * targets
            + sum(attention_flops(s, n) for s, n in suffixes)
        )
        return n_tokens, flops

    rows, figures, gflops_of = [], {}, {}

    def add_row(name, n_done, n_tokens, flops, seconds):
        """A table row: pairs/s, tokens/s, GFLOP/s and the peak memory since reset_memory."""
        row = (
            name,
            n_done / seconds,
            n_tokens / seconds,
            flops / seconds / 1e9,
            peak_memory(device),
        )
        rows.append(row)

    wrap = len(template.hints_open) + len(template.hints_close)
    hints = {"zeroshot": lambda q: 0, "qpeft-a": lambda q: wrap + len(tokens.queries[q])}

    def score(name, reranker, desc, model=llm):
        return runtime.rerank(
            model, template, {name: reranker}, candidates, tokens, TOKEN_BUDGET, desc
        )

    for name, reranker in [("zeroshot", zeroshot), ("qpeft-a", qpeft_a)]:
        reset_memory(device)
        (ours, _), seconds = timed(
            lambda: score(name, reranker, f"score {name}"), args.repeats, device
        )
        n_tokens, flops = scoring_flops(hints[name])
        add_row(f"score {name}", n_pairs, n_tokens, flops, seconds)
        if name == "zeroshot":
            zeroshot_scores = ours[name]
            figures["score_pairs_per_s"] = round(n_pairs / seconds, 2)
            gflops_of["score"] = flops / seconds / 1e9
    if other is not None:
        zeroshot_other = qpeft.Reranker(qpeft.QPEFTConfig(method="zeroshot"), other, template)
        row = f"score zeroshot ({other_name})"
        _, seconds = timed(
            lambda: score("zeroshot", zeroshot_other, row, other), args.repeats, device
        )
        add_row(row, n_pairs, *scoring_flops(hints["zeroshot"]), seconds)
        ratio = figures["score_pairs_per_s"] * seconds / n_pairs  # this model's over the other's
        figures["score_packed_vs_sdpa"] = round(ratio if packed else 1 / ratio, 2)

    # Training: the same batches through the fast path and the naive one.
    batches = data.train_batches(examples, 4, seed=0)[: args.train_steps]
    train_speed, paper = {}, train.TrainConfig(loss="paper", margin=0.0)
    paths = [("fast", llm), ("naive", llm)] + ([(f"fast, {other_name}", other)] if other else [])
    for path, model in paths:
        reranker = qpeft.Reranker(qpeft.QPEFTConfig(method="qpeft-a"), model, template).train()
        trainable = [p for p in reranker.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=3e-2, fused=True)

        def step(batch):
            if path != "naive":
                loss, _ = train.batch_loss(model, template, reranker, batch, tokens, paper)
            else:
                pairs_ = qpeft.batch_pairs(batch)
                queries = [tokens.queries[batch[i].qid] for i, _, _ in pairs_]
                passages = [tokens.passages[d] for _, d, _ in pairs_]
                scores = torch.stack(  # the definition, one pair at a time
                    [
                        qpeft.score(model, template, reranker, q, d)
                        for q, d in zip(queries, passages)
                    ]
                )
                loss, _ = qpeft.ranking_loss(scores, pairs_, paper)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return len(qpeft.batch_pairs(batch))

        reset_memory(device)
        step(batches[0])  # warm-up
        synchronize(device)
        start = time.perf_counter()
        trained_pairs = sum(step(b) for b in batches)
        synchronize(device)
        seconds = time.perf_counter() - start
        # FLOPs of the fast path's work (the naive path does more, all of it counted as waste)
        batch_docids = [
            {e.positive_docid for e in b} | {e.hard_negative_docid for e in b} for b in batches
        ]
        passages, passage_flops = passage_work(len(batches), [d for ds in batch_docids for d in ds])
        pairs_ = [
            (len(tokens.queries[b[i].qid]), prefix_len[d])
            for b in batches
            for i, d, _ in qpeft.batch_pairs(b)
        ]
        targets = sum(n + 1 for n, _ in pairs_)  # query tokens + eos
        # after the passage: hints (H holds the query's n vectors too), question, query, eos
        suffixes = [(s, wrap + len(template.question) + 2 * n + 1) for n, s in pairs_]
        suffix = sum(n for _, n in suffixes)
        suffix_flops = 2 * dense * suffix + sum(attention_flops(s, n) for s, n in suffixes)
        # the passages forward only; the rest forward and backward; logits at the targets
        flops = passage_flops + 2 * suffix_flops + 4 * cfg.dim * cfg.vocab_size * targets
        train_speed[path] = trained_pairs / seconds
        add_row(f"train qpeft-a ({path})", trained_pairs, passages + suffix, flops, seconds)
        if path == "fast":
            figures["train_pairs_per_s"] = round(trained_pairs / seconds, 2)
            gflops_of["train"] = flops / seconds / 1e9
    figures["train_speedup_vs_naive"] = round(train_speed["fast"] / train_speed["naive"], 2)
    if other is not None:
        ratio = train_speed["fast"] / train_speed[f"fast, {other_name}"]
        figures["train_packed_vs_sdpa"] = round(ratio if packed else 1 / ratio, 2)

    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is not None and not args.shape:
        hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
        hf = hf.to(device).eval()
        lengths = [prefix_len[d] for _, d in pairs]
        # the same passage batches as ours (one pair each)
        batches = data.token_budget_batches(lengths, TOKEN_BUDGET)

        def hf_scores():  # what a transformers user writes: whole sequences, logits, log_softmax
            scores = {}
            with torch.no_grad():
                for batch in batches:
                    queries = [tokens.queries[pairs[i][0]] for i in batch]
                    prefixes = [template.prefix(tokens.passages[pairs[i][1]]) for i in batch]
                    seqs = [
                        p + template.question + q + [template.eos]
                        for p, q in zip(prefixes, queries)
                    ]
                    ids, mask = qpeft.pad_ids(seqs, device)
                    logits = hf(input_ids=ids, attention_mask=mask.long()).logits
                    logprobs = torch.log_softmax(logits.float(), -1)
                    for row, (i, seq, q) in enumerate(zip(batch, seqs, queries)):
                        # the positions predicting q + eos
                        at = torch.arange(len(seq) - len(q) - 2, len(seq) - 1, device=device)
                        target = torch.tensor(seq, device=device)[at + 1]
                        scores[pairs[i]] = logprobs[row, at, target].mean().item()
            return scores

        reset_memory(device)
        theirs, seconds = timed(hf_scores, args.repeats, device)
        add_row("score zeroshot (transformers)", n_pairs, float("nan"), float("nan"), seconds)
        figures["hf_ratio"] = round(figures["score_pairs_per_s"] / (n_pairs / seconds), 2)
        diff = max(abs(theirs[q, d] - zeroshot_scores[q][d]) for q, d in pairs)
        figures["hf_max_abs_score_diff"] = round(diff, 4)

    # torch.compile'd blocks (qpeft.py --compile), last: compiling changes the model for good.
    try:
        runtime.compile_blocks(llm)
        reset_memory(device)
        compiled = "score zeroshot compiled"
        _, seconds = timed(lambda: score("zeroshot", zeroshot, compiled), args.repeats, device)
        n_tokens, flops = scoring_flops(hints["zeroshot"])
        add_row("score zeroshot (--compile)", n_pairs, n_tokens, flops, seconds)
        figures["score_pairs_per_s_compiled"] = round(n_pairs / seconds, 2)
        gflops_of["score_compiled"] = flops / seconds / 1e9
    except Exception as e:  # no C++ compiler, or an inductor bug here: the eager figures stand
        first_line = str(e).splitlines()[0]
        print(f"torch.compile failed here, no compiled row: {type(e).__name__}: {first_line}")

    peak = max(peak, matmul_peak(dtype, device))
    figures = {
        "device": where,
        "dtype": args.dtype,
        "shape": args.shape or args.model,
        "peak_gflops": round(peak, 1),
        **figures,
    }
    figures.update({f"{key}_frac_peak": round(g / peak, 3) for key, g in gflops_of.items()})
    print(
        f"\n{n_pairs} test pairs ({args.queries} queries x {args.depth}), {args.dtype} on {where}, "
        f"{args.shape or args.model}, {dense / 1e6:.1f}M dense parameters; % of the {args.dtype} "
        f"matmul peak ({peak:.0f} GFLOP/s, the higher of the two measurements)"
    )
    print(f"{'':34}{'pairs/s':>9}{'tokens/s':>10}{'GFLOP/s':>9}{'% peak':>8}{'peak MB':>9}")
    for name, pairs_s, tokens_s, gflops, memory in rows:
        share = 100 * gflops / peak
        print(f"{name:34}{pairs_s:9.2f}{tokens_s:10.0f}{gflops:9.1f}{share:7.1f}%{memory:9.0f}")
    versus_hf = "; transformers not installed (pip install transformers to compare)"
    if "hf_ratio" in figures:
        versus_hf = (
            f"; zero-shot scoring {figures['hf_ratio']:.2f}x transformers (scores agree "
            f"within {figures['hf_max_abs_score_diff']})"
        )
    speedup = figures["train_speedup_vs_naive"]
    print(f"training: fast path {speedup:.2f}x the naive path's pairs/s" + versus_hf)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
