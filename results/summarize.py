"""Recompute a results table from the per-query values behind it, without re-running anything.

    python results/summarize.py BASE ROW=FILE[,FILE...] [ROW=...] [-m MEASURE ...]

BASE and every FILE hold per-query values (qpeft.py's {name}.{split}.per-query.tsv, or eval.py -q
output). A row with several files is a method over seeds: its per-query values are averaged over
the seeds first, as the command line's table does; "± SD" is the SD of the per-seed means. Each
row's Δ is its mean minus BASE's on the first measure, with the 95 % confidence interval and the
two-sided p of the paired t-test over the queries both have (eval.paired_t_test); up/down count
the queries it moves each way, and "n 80%" is how many queries a paired test would need to find
that Δ at the 5 % level with 80 % power (normal approximation: ((z 0.975 + z 0.8) SD / Δ)², SD
of the per-query differences; = queries x ((z 0.975 + z 0.8) / t)² with the test's own t), to say
what a test set this size can and cannot show.
"""

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as ir  # noqa: E402  (the repository root, whatever the working directory)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="per-query values of the reference row (zero-shot)")
    p.add_argument("rows", nargs="+", metavar="ROW=FILE[,FILE...]")
    p.add_argument("-m", dest="measures", nargs="+", default=["ndcg_cut_10", "success_5"])
    args = p.parse_args(argv)
    try:
        base = ir.read_per_query(args.base)
        rows = {Path(args.base).name.split(".")[0]: [base]}
        for row in args.rows:
            name, _, files = row.partition("=")
            if not files or name in rows:
                raise ValueError(f"{row}: expected ROW=FILE[,FILE...], each ROW named once")
            rows[name] = [ir.read_per_query(f) for f in files.split(",")]
        for name, seeds in rows.items():
            for values in seeds:
                measures = set().union(*values.values())
                if missing := [m for m in args.measures if m not in measures]:
                    raise ValueError(f"row {name}: no per-query values of {missing[0]}")
    except (OSError, ValueError) as e:
        print(f"summarize.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    first = args.measures[0]
    print(
        f"{'row':24}{'seeds':>6}"
        + "".join(f"{m:>18}" for m in args.measures)
        + f"{'Δ ' + first:>16}{'95% CI':>20}{'p':>8}{'queries':>9}{'up/down':>9}{'n 80%':>8}"
    )
    for name, seeds in rows.items():
        qids = sorted(set.intersection(*(set(s) for s in seeds)))
        mean = {
            q: {m: statistics.fmean(s[q][m] for s in seeds) for m in args.measures} for q in qids
        }
        line = f"{name:24}{len(seeds):>6}"
        for m in args.measures:
            per_seed = [statistics.fmean(s[q][m] for q in qids) for s in seeds]
            sd = f" ± {statistics.stdev(per_seed):.4f}" if len(seeds) > 1 else ""
            line += f"{statistics.fmean(per_seed):.4f}{sd}".rjust(18)
        if seeds[0] is not base:
            a = {q: base[q][first] for q in base}
            b = {q: v[first] for q, v in mean.items()}
            delta, t, p_value = ir.paired_t_test(a, b)
            low, high = ir.paired_confidence_interval(a, b)
            deltas = [b[q] - a[q] for q in a.keys() & b.keys()]
            line += f"{delta:+16.4f}{f'[{low:+.4f}, {high:+.4f}]':>20}{p_value:8.3f}{len(deltas):9}"
            # 1e-9: the mean over seeds of equal values can be an ulp off (fsum(3 * [x]) / 3)
            moved = f"{sum(d > 1e-9 for d in deltas)}/{sum(d < -1e-9 for d in deltas)}"
            z = statistics.NormalDist().inv_cdf(0.975) + statistics.NormalDist().inv_cdf(0.8)
            need = math.ceil(len(deltas) * (z / t) ** 2) if t else "-"
            line += f"{moved:>9}{need:>8}"
        print(line)


if __name__ == "__main__":
    main()
