"""The screen table of issue 27 from the dev-check records that training writes as it goes
({out}/{method}.checks.jsonl, one JSON object per dev check), without re-running anything.

    python results/screen.py ARM=FILE [ARM=FILE ...]

FILE may also be a run's metrics.json: its zero-shot dev check (the reference every arm is
compared with) is read from it as one check at step 0.

Per arm: the checks run, the kept step (best dev nDCG@10, as training keeps it; step 0 is the
untrained module), and at that step dev nDCG@10, HR@5, pairwise accuracy over all judged pairs,
training-set fit nDCG@10, and the NLL gaps of hard and in-batch negatives over positives.
"""

import json
import sys

COLUMNS = [
    ("ndcg_cut_10", "nDCG@10"),
    ("success_5", "HR@5"),
    ("pairwise", "pairwise"),
    ("fit_ndcg_cut_10", "fit nDCG@10"),
    ("gap_hard", "gap hard"),
    ("gap_in_batch", "gap in-batch"),
]


def main(argv):
    if not argv or any("=" not in a for a in argv):
        sys.exit(__doc__.split("\n\n")[1])
    print(
        f"{'arm':<28} {'checks':>6} {'last':>5} {'kept':>5}"
        + "".join(f" {h:>12}" for _, h in COLUMNS)
    )
    for arm in argv:
        name, path = arm.split("=", 1)
        with open(path, encoding="utf-8") as f:
            if path.endswith("metrics.json"):
                checks = [{"step": 0, **json.load(f)["zeroshot"]["dev_check"]}]
            else:
                checks = [json.loads(line) for line in f if line.strip()]
        best = max(checks, key=lambda c: (c["ndcg_cut_10"], -c["step"]))  # earliest of equals
        values = "".join(f" {best[key]:>12.4f}" for key, _ in COLUMNS)
        print(f"{name:<28} {len(checks):>6} {checks[-1]['step']:>5} {best['step']:>5}{values}")


if __name__ == "__main__":
    main(sys.argv[1:])
