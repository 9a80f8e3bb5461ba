"""Does the listwise loss reward flattening? Its value on a run's lists at several temperatures.

    python results/list_temperature.py RUN QRELS QUERIES [--depth 20] [-T 1 2 3 ...]

RUN is a reranked TREC run whose scores are qpeft's (mean log p(q | d) per query token; the
candidates below --depth, BM25's tail, are left out), QRELS and QUERIES (BEIR queries.jsonl) the
dataset's. Each of a query's positives in the top --depth forms a list with that query's judged
negatives there; S = score x the query's target count (its tokens + eos, as qpeft.ranking_loss
counts them) and the list costs -log softmax(S / T)[positive]. Printed: the mean cost at each T
(T = 1: the loss `--loss listwise` trains), the T where it is lowest, and how much of the T = 1
cost the worst tenth of the lists holds. If the mean falls as T grows past 1, the model can
lower the loss by shrinking every gap at once, without ranking anything better.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as ir  # noqa: E402

TEMPERATURES = [1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 7, 10, 20]


def lists(run, qrels, targets, depth):
    """[(summed score of a positive, [summed scores of the query's judged negatives])]."""
    out = []
    for qid, scores in run.items():
        top = sorted(scores, key=scores.get, reverse=True)[:depth]
        judged = qrels.get(qid, {})
        negatives = [targets[qid] * scores[d] for d in top if d in judged and judged[d] <= 0]
        for d in top:
            if judged.get(d, 0) > 0 and negatives:
                out.append((targets[qid] * scores[d], negatives))
    return out


def list_costs(scored_lists, temperature):
    """-log softmax(S / T)[positive] of each list, the line qpeft.ranking_loss computes."""
    costs = []
    for positive, negatives in scored_lists:
        z = torch.tensor([positive] + negatives, dtype=torch.float64) / temperature  # (1 + m,)
        costs.append((z.logsumexp(0) - z[0]).item())
    return costs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("qrels")
    p.add_argument("queries")
    p.add_argument("--depth", type=int, default=20)
    model = Path.home() / ".cache/qpeft/models/SmolLM2-135M-Instruct"
    p.add_argument("--model", default=str(model), help="the model folder (its tokenizer)")
    p.add_argument("--max-query-tokens", type=int, default=64)
    p.add_argument("-T", dest="temperatures", type=float, nargs="+", default=TEMPERATURES)
    args = p.parse_args(argv)
    from tokenizer import Tokenizer  # here: the hand-checked test needs no model

    tokenizer = Tokenizer.from_pretrained(args.model)
    run, qrels = ir.read_run(args.run), ir.read_qrels(args.qrels)
    with open(args.queries, encoding="utf-8") as f:
        text = {q["_id"]: q["text"] for q in map(json.loads, f)}
    targets = {q: len(tokenizer.encode(text[q], args.max_query_tokens)) + 1 for q in run}
    scored = lists(run, qrels, targets, args.depth)
    means = {t: sum(list_costs(scored, t)) / len(scored) for t in args.temperatures}
    top = f"the top {args.depth}"
    print(f"{len(scored)} lists (a positive and its query's judged negatives in {top})")
    for t, mean in means.items():
        print(f"T {t:>5g}: mean -log softmax(S / T)[d+] {mean:.4f}")
    at_one = sorted(list_costs(scored, 1), reverse=True)
    worst = sum(at_one[: max(1, len(at_one) // 10)]) / sum(at_one)
    median = at_one[len(at_one) // 2]
    print(f"lowest at T = {min(means, key=means.get):g}; at T = 1 the worst tenth of the lists")
    print(f"hold {worst:.1%} of the cost, the median list costs {median:.4f}")


if __name__ == "__main__":
    main()
