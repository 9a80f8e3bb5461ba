"""How fast qpeft runs on this machine, in one run: `python bench.py` (no flags needed;
`--device cuda` on a GPU, `--shape tinyllama-1.1b` or `llama2-7b` for random weights in those shapes).

1. the matmul peak of this device in the dtype used (the fastest of five sizes), the yardstick for
   everything below;
2. zero-shot and Q-PEFT-A scoring of msmarco_small test pairs: pairs/s, tokens/s, GFLOP/s, % of peak;
3. Q-PEFT-A training steps: the fast path (passage keys/values computed once per batch, logits only
   at query positions) against the naive one (every pair's full sequence, logits everywhere);
4. if `transformers` is importable, the same pairs through LlamaForCausalLM, same dtype and batches;
5. zero-shot scoring again with torch.compile'd blocks (qpeft.py --compile), where inductor works.
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

import data
import qpeft
from model import LlamaConfig, Transformer, default_dtype, find_asset, load, rope_frequencies

# Random weights in the shapes of bigger Llamas (config.json values), with the tokenizer of --model:
# the vocabulary is the tokenizer's, so the logits cost what that tokenizer's would.
SHAPES = {"tinyllama-1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, head_dim=64, hidden_dim=5632),
          "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, hidden_dim=11008)}


def random_model(cfg, shape, dtype, device):
    """A frozen Llama with `cfg`'s vocabulary and special ids in `shape`, random N(0, 0.02)
    matrices and unit norms (GPT-2's init: the residual stream stays tame over many layers)."""
    cfg = LlamaConfig(**{**vars(cfg), **shape, "tie_embeddings": False})
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg).to(dtype)
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

TOKEN_BUDGET = 4096  # prompt tokens per scoring batch: qpeft.py's --token-budget default, for every path below


def matmul_peak(dtype, device, sizes=(768, 1024, 1280, 1536, 2048), flop_per_try=1e11):
    """GFLOP/s of the fastest n x n x n matmul over a few sizes, best of 3 tries each: the
    machine's practical peak. One size is not enough: on the 2-core EPYC, 2048 ran at 736-781
    GFLOP/s in bf16 where 768-1280 ran at 815-896, and the model's own weight shapes at 3,700 rows
    at 800-870, above a 2048-only "peak"."""
    best_gflops = 0.0
    if device.type == "cuda":  # a GPU needs bigger matmuls and more of them to reach its peak
        sizes, flop_per_try = (4096, 8192, 16384), 1e14
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        a @ b
        repeats = max(1, round(flop_per_try / (2 * n ** 3)))
        for _ in range(3):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            synchronize(device)
            best_gflops = max(best_gflops, 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9)
    return best_gflops


def timed(fn, repeats, device):
    """fn's result and its best wall time over `repeats` calls, after one untimed call: the first
    pass grows the heap to its working set (tens of thousands of page faults; after a one-query
    warm-up the first two timed passes still had them) and compiles, under --compile."""
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
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--data", default="msmarco_small")
    p.add_argument("--queries", type=int, default=8, help="test queries to score")
    p.add_argument("--depth", type=int, default=20, help="candidates per query")
    p.add_argument("--train-steps", type=int, default=4, help="training steps timed per path")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement; the best counts")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="auto: bfloat16 on CUDA and where the CPU multiplies it natively, else float32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES),
                   help="random weights in this model's shape instead of --model's (its tokenizer is kept)")
    args = p.parse_args()
    device = qpeft.setup_device(args.device)
    if args.dtype == "auto":
        args.dtype = str(default_dtype(device))[len("torch."):]
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device) \
        if device.type == "cuda" else str(device)
    peak = matmul_peak(dtype, device)
    print(f"matmul peak ({where}): {args.dtype} {peak:.0f} GFLOP/s (measured again at the end; the higher counts)")

    llm, tokenizer = load(args.model, dtype=dtype, device=device)
    if args.shape:
        llm = random_model(llm.cfg, SHAPES[args.shape], dtype, device)
    cfg = llm.cfg
    # Parameters outside the embedding table and lm_head (named_parameters lists a tied table once).
    dense = sum(p.numel() for n, p in llm.named_parameters() if n not in ("tok_embeddings.weight", "output.weight"))
    dataset = data.load_dataset(args.data)
    candidates = dict(list(dataset.candidates("test", args.depth).items())[:args.queries])
    template = qpeft.Template(tokenizer, qpeft.QPEFTConfig().instruction)
    examples = data.training_examples(dataset, "train", seed=0)
    texts = {d: " " + dataset.corpus[d] for docs in candidates.values() for d in docs}
    texts.update({d: " " + dataset.corpus[d] for e in examples for d in (e.positive_docid, e.hard_negative_docid)})
    query_ids = list(candidates) + [e.qid for e in examples]
    tokens = qpeft.TokenIds(
        passages=data.tokenize_texts(tokenizer, texts, max_tokens=qpeft.QPEFTConfig().max_passage_tokens),
        queries=data.tokenize_texts(tokenizer, {q: dataset.queries[q] for q in query_ids}))
    pairs = [(q, d) for q, docs in candidates.items() for d in docs]
    prefix_len = {d: len(template.prefix(ids)) for d, ids in tokens.passages.items()}  # P + passage tokens
    n_pairs = len(pairs)
    zeroshot = qpeft.Reranker(qpeft.QPEFTConfig(method="zeroshot"), llm, template)
    qpeft_a = qpeft.Reranker(qpeft.QPEFTConfig(method="qpeft-a"), llm, template).eval()

    def attention_flops(start, length):
        """Scores and weighted values of `length` tokens at positions start.. (causal: key count = position + 1)."""
        key_pairs = (start + 1 + start + length) * length // 2
        return 4 * cfg.n_heads * cfg.head_dim * cfg.n_layers * key_pairs

    head = len(template.head)

    def passage_work(n_batches, docids):
        """Tokens and forward FLOPs of the passage passes: the shared head (bos, P, "Passage:") once
        per batch, then each passage's own tokens, which also attend to the head."""
        own = [prefix_len[d] - head for d in docids]
        n_tokens = n_batches * head + sum(own)
        return n_tokens, (2 * dense * n_tokens + n_batches * attention_flops(0, head)
                          + sum(attention_flops(head, n) for n in own))

    def scoring_flops(hint_tokens):
        docids = sorted({d for _, d in pairs})                                     # once per passage
        n_batches = len(data.token_budget_batches([prefix_len[d] for d in docids], TOKEN_BUDGET))  # as rerank does
        prefix_tokens, prefix_flops = passage_work(n_batches, docids)
        targets = sum(len(tokens.queries[q]) + 1 for q, _ in pairs)
        suffixes = [(prefix_len[d], len(template.question) + hint_tokens(q)
                     + len(tokens.queries[q]) + 1) for q, d in pairs]
        n_tokens = prefix_tokens + sum(n for _, n in suffixes)
        flops = (prefix_flops + 2 * dense * sum(n for _, n in suffixes) + 2 * cfg.dim * cfg.vocab_size * targets
                 + sum(attention_flops(s, n) for s, n in suffixes))
        return n_tokens, flops

    rows, figures, gflops_of = [], {}, {}
    wrap = len(template.hints_open) + len(template.hints_close)
    for name, reranker, hint_tokens in [("zeroshot", zeroshot, lambda q: 0),
                                        ("qpeft-a", qpeft_a, lambda q: wrap + len(tokens.queries[q]))]:
        reset_memory(device)
        (ours, _), seconds = timed(lambda: qpeft.rerank(llm, template, {name: reranker}, candidates, tokens,
                                                        TOKEN_BUDGET, f"score {name}"), args.repeats, device)
        n_tokens, flops = scoring_flops(hint_tokens)
        rows.append((f"score {name}", n_pairs / seconds, n_tokens / seconds, flops / seconds / 1e9,
                     peak_memory(device)))
        if name == "zeroshot":
            zeroshot_scores = ours[name]
            figures["score_pairs_per_s"] = round(n_pairs / seconds, 2)
            gflops_of["score"] = flops / seconds / 1e9

    # Training: the same batches through the fast path and the naive one.
    batches = data.train_batches(examples, 4, seed=0)[:args.train_steps]
    train = {}
    for path in ("fast", "naive"):
        reranker = qpeft.Reranker(qpeft.QPEFTConfig(method="qpeft-a"), llm, template).train()
        optimizer = torch.optim.AdamW([p for p in reranker.parameters() if p.requires_grad], lr=3e-2, fused=True)

        def step(batch):
            if path == "fast":
                loss, _ = qpeft.batch_loss(llm, template, reranker, batch, tokens, margin=0.0)
            else:
                pairs_ = qpeft.batch_pairs(batch)
                scores = qpeft.score_pairs_uncached(llm, template, reranker,
                                                    [tokens.queries[batch[i].qid] for i, _, _ in pairs_],
                                                    [tokens.passages[d] for _, d, _ in pairs_])
                loss, _ = qpeft.ranking_loss(scores, pairs_, margin=0.0)
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
        passages, passage_flops = passage_work(len(batches), [
            d for b in batches for d in {e.positive_docid for e in b} | {e.hard_negative_docid for e in b}])
        pairs_ = [(len(tokens.queries[b[i].qid]), prefix_len[d]) for b in batches for i, d, _ in qpeft.batch_pairs(b)]
        targets = sum(n + 1 for n, _ in pairs_)                                       # query tokens + eos
        suffixes = [(s, wrap + len(template.question) + 2 * n + 1) for n, s in pairs_]  # H holds n vectors too
        suffix = sum(n for _, n in suffixes)
        flops = (passage_flops                                                         # forward only
                 + 2 * (2 * dense * suffix + sum(attention_flops(s, n) for s, n in suffixes))  # forward + backward
                 + 4 * cfg.dim * cfg.vocab_size * targets)
        train[path] = trained_pairs / seconds
        rows.append((f"train qpeft-a ({path})", trained_pairs / seconds, (passages + suffix) / seconds,
                     flops / seconds / 1e9, peak_memory(device)))
        if path == "fast":
            figures["train_pairs_per_s"] = round(trained_pairs / seconds, 2)
            gflops_of["train"] = flops / seconds / 1e9
    figures["train_speedup_vs_naive"] = round(train["fast"] / train["naive"], 2)

    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is not None and not args.shape:
        hf = transformers.LlamaForCausalLM.from_pretrained(find_asset(args.model, "models"), dtype=dtype)
        hf = hf.to(device).eval()
        lengths = [prefix_len[d] for _, d in pairs]
        batches = data.token_budget_batches(lengths, TOKEN_BUDGET)  # the same passage batches as ours (one pair each)

        def hf_scores():  # what a transformers user writes: full sequences, full logits, log_softmax
            scores = {}
            with torch.no_grad():
                for batch in batches:
                    queries = [tokens.queries[pairs[i][0]] for i in batch]
                    seqs = [template.prefix(tokens.passages[pairs[i][1]]) + template.question + q + [template.eos]
                            for i, q in zip(batch, queries)]
                    ids, mask = qpeft.pad_ids(seqs, device)
                    logprobs = torch.log_softmax(hf(input_ids=ids, attention_mask=mask.long()).logits.float(), -1)
                    for row, (i, seq, q) in enumerate(zip(batch, seqs, queries)):
                        at = torch.arange(len(seq) - len(q) - 2, len(seq) - 1, device=device)  # predicting q + eos
                        scores[pairs[i]] = logprobs[row, at, torch.tensor(seq, device=device)[at + 1]].mean().item()
            return scores

        reset_memory(device)
        theirs, seconds = timed(hf_scores, args.repeats, device)
        rows.append(("score zeroshot (transformers)", n_pairs / seconds, float("nan"), float("nan"),
                     peak_memory(device)))
        figures["hf_ratio"] = round(figures["score_pairs_per_s"] / (n_pairs / seconds), 2)
        figures["hf_max_abs_score_diff"] = round(max(abs(theirs[q, d] - zeroshot_scores[q][d]) for q, d in pairs), 4)

    # torch.compile'd blocks (qpeft.py --compile), last because compiling changes the model for good.
    try:
        llm.compile_blocks()
        reset_memory(device)
        _, seconds = timed(lambda: qpeft.rerank(llm, template, {"zeroshot": zeroshot}, candidates, tokens,
                                                TOKEN_BUDGET, "score zeroshot compiled"), args.repeats, device)
        n_tokens, flops = scoring_flops(lambda q: 0)
        rows.append(("score zeroshot (--compile)", n_pairs / seconds, n_tokens / seconds, flops / seconds / 1e9,
                     peak_memory(device)))
        figures["score_pairs_per_s_compiled"] = round(n_pairs / seconds, 2)
        gflops_of["score_compiled"] = flops / seconds / 1e9
    except Exception as e:  # no C++ compiler, or an inductor bug on this platform: the eager figures stand
        print(f"torch.compile failed here, no compiled row: {type(e).__name__}: {str(e).splitlines()[0]}")

    peak = max(peak, matmul_peak(dtype, device))
    figures = {"device": where, "dtype": args.dtype, "shape": args.shape or args.model,
               "peak_gflops": round(peak, 1), **figures}
    figures.update({f"{key}_frac_peak": round(g / peak, 3) for key, g in gflops_of.items()})
    print(f"\n{n_pairs} test pairs ({args.queries} queries x {args.depth}), {args.dtype} on {where}, "
          f"{args.shape or args.model}, {dense / 1e6:.1f}M dense parameters; % of the {args.dtype} matmul "
          f"peak ({peak:.0f} GFLOP/s, the higher of the two measurements)")
    print(f"{'':34}{'pairs/s':>9}{'tokens/s':>10}{'GFLOP/s':>9}{'% peak':>8}{'peak MB':>9}")
    for name, pairs_s, tokens_s, gflops, memory in rows:
        print(f"{name:34}{pairs_s:9.2f}{tokens_s:10.0f}{gflops:9.1f}{100 * gflops / peak:7.1f}%{memory:9.0f}")
    print(f"training: fast path {figures['train_speedup_vs_naive']:.2f}x the naive path's pairs/s"
          + (f"; zero-shot scoring {figures['hf_ratio']:.2f}x transformers (scores agree within "
             f"{figures['hf_max_abs_score_diff']})" if "hf_ratio" in figures else
             "; transformers not installed (pip install transformers to compare)"))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
