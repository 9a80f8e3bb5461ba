"""IR evaluation for qpeft: read/write TREC runs and qrels, score them the way trec_eval does.

The measures reproduce trec_eval 9.0 (https://github.com/usnistgov/trec_eval), the version
that pytrec_eval bundles, on plain dicts:
    qrels = {qid: {docid: grade}}    run = {qid: {docid: score}}
Its rules, which every number here follows:
  * a run is ranked by score descending, the score read as a 32-bit float, ties broken by
    docid descending; the rank column and the line order of the file are ignored;
  * nDCG gain = the grade itself, discount 1/log2(rank + 1), the ideal DCG from all judged
    documents of the query; binary measures count grade >= relevance_level as relevant;
    negative grades mean "unjudged": gain 0, never relevant, not in the ideal ranking;
  * a query is evaluated when it is in both the run and the qrels (complete=False), or
    whenever it is in the qrels (complete=True, trec_eval -c; missing queries score 0).
The paired t-test p-value uses the regularized incomplete beta function of Numerical
Recipes (3rd ed., section 6.4), written out below so that no scipy is needed.

    python eval.py QRELS RUN [-m ndcg_cut.10 recip_rank ...] [-l 2] [-c] [-q] [-M 10]
    python eval.py QRELS RUN_A RUN_B [-m ...]        # means, delta and paired t-test p
"""

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

DEFAULT_MEASURES = ["ndcg_cut_10", "recip_rank", "map", "recall_100"]
MEASURES_HELP = "ndcg, ndcg_cut_K, recip_rank, map, P_K, recall_K, success_K ('.K' also accepted)"

# -----------------------------------------------------------------------------
# reading and writing files


def read_qrels(path, check=None):
    """Judgments {qid: {docid: grade}} from TREC qrels ('qid 0 docid grade') or BEIR TSV
    ('query-id<TAB>corpus-id<TAB>score', a header line first or not). The first line decides the
    format; a line with a TAB is split at TABs, so an id holding a space is refused, never read
    as another column. check(line_no, qid, docid), when given, vets each judgment: it raises to
    refuse the file, or returns False to leave the judgment out."""
    qrels, n_fields = {}, None
    for line_no, line in text_lines(path):
        line = line.rstrip("\r\n")
        fields = line.split("\t") if "\t" in line else line.split()
        if not line.strip():
            continue
        if n_fields is None:
            n_fields = len(fields)
            if fields[:2] == ["query-id", "corpus-id"]:
                continue  # the BEIR header; any other first line must be a judgment
        if len(fields) != n_fields or n_fields not in (3, 4):
            raise ValueError(
                f"{path}:{line_no}: expected 'query-id<TAB>corpus-id<TAB>integer score' (BEIR) "
                f"or 'qid 0 docid grade' (TREC), got {line!r}"
            )
        qid, docid, grade = fields[0], fields[-2], fields[-1].strip()
        if not qid or not docid or any(c.isspace() for c in qid + docid):
            raise ValueError(
                f"{path}:{line_no}: id {qid!r} or {docid!r} is empty or holds whitespace"
            )
        if not re.fullmatch(r"-?\d+", grade):
            raise ValueError(f"{path}:{line_no}: grade {grade!r} is not an integer")
        if check is not None and check(line_no, qid, docid) is False:
            continue
        if docid in qrels.setdefault(qid, {}):
            raise ValueError(f"{path}:{line_no}: query {qid!r} judges passage {docid!r} twice")
        qrels[qid][docid] = int(grade)
    return qrels


BOM = "\ufeff"  # what Windows editors put before UTF-8 text


def without_bom(text, path):
    """text without a leading byte-order mark, with a warning naming the file: every reader of
    ours (runs, qrels, jsonl, tsv, JSON) strips it the same way, so it never becomes part of an id
    or a header."""
    if not text.startswith(BOM):
        return text
    print(f"warning: {path}: starts with a UTF-8 byte-order mark; ignored", file=sys.stderr)
    return text[1:]


def text_lines(path):
    """(line number, line) of a UTF-8 text file; a line that is not UTF-8 is an error naming it."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{line_no}: not valid UTF-8") from None
            yield line_no, without_bom(line, path) if line_no == 1 else line


def read_json(path, required=False):
    """A JSON file's object ({} when it is absent and not required). Not UTF-8, not JSON or not
    an object: one line naming the file."""
    path = Path(path)
    if not path.exists() and not required:
        return {}
    try:
        value = json.loads(without_bom(path.read_text(encoding="utf-8"), path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: unreadable ({e.strerror})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object (found {type(value).__name__})")
    return value


def read_run(path, check=None):
    """Scores {qid: {docid: score}} from a TREC run ('qid Q0 docid rank score tag').
    The rank column is not used: like trec_eval, we rank by score. check(line_no, qid, docid),
    when given, vets each line and raises to refuse the file."""
    run = {}
    for line_no, line in text_lines(path):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 6:
            raise ValueError(
                f"{path}:{line_no}: expected 6 fields 'qid Q0 docid rank score tag', "
                f"got {len(fields)}"
            )
        qid, _, docid, _, score, _ = fields
        try:
            score = float(score)
        except ValueError:
            raise ValueError(f"{path}:{line_no}: score '{score}' is not a number") from None
        if not math.isfinite(score):
            raise ValueError(f"{path}:{line_no}: score {score} is not finite")
        if check is not None:
            check(line_no, qid, docid)
        if docid in run.setdefault(qid, {}):
            # trec_eval refuses these too: which of the two scores would count?
            raise ValueError(f"{path}:{line_no}: passage {docid!r} listed twice for query {qid!r}")
        run[qid][docid] = score
    return run


def temporary(path):
    """The temporary name a file is written under before it is renamed to `path`."""
    return path.with_name(path.name + f".tmp{os.getpid()}")


def atomic_save(write, path):
    """Write a temporary file beside `path`, then rename: no interruption leaves half a file."""
    path = Path(path)
    tmp = temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:  # a failed write (disk full, an error) leaves no temporary file behind
        tmp.unlink(missing_ok=True)


class Outputs:
    """A command's files, committed together: add(write, path) as for atomic_save, then commit()
    writes every one to a temporary file and renames them into place only once all are written.
    An error before commit (a table that cannot be computed) or during the writes (disk full)
    leaves every earlier file as it was."""

    def __init__(self):
        self.pending = []

    def add(self, write, path):
        self.pending.append((write, Path(path)))

    def commit(self):
        staged = []
        try:
            for write, path in self.pending:
                staged.append((temporary(path), path))
                write(staged[-1][0])
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        for tmp, path in staged:
            os.replace(tmp, path)
        self.pending = []


def atomic_folder(write, folder):
    """Write a folder beside `folder` (write(staging)), then swap it into place: the earlier
    folder is renamed aside and removed only once the new one is there. A failed write leaves the
    earlier folder untouched; only a crash between the two renames (microseconds) leaves it
    under its aside name, .{name}.old{pid}, nothing lost."""
    folder = Path(folder).resolve()  # "." has no name to put beside
    staging, aside = (folder.with_name(f".{folder.name}.{k}{os.getpid()}") for k in ("new", "old"))
    for stale in (staging, aside):  # left by a crash of a process with the same pid
        shutil.rmtree(stale, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if folder.exists():
        os.replace(folder, aside)
    os.replace(staging, folder)
    shutil.rmtree(aside, ignore_errors=True)


def write_run(path, run, tag, save=atomic_save):
    """Write a TREC run whose rank column is trec_eval's order. Scores are written with repr(),
    the shortest text that reads back as the same float, so no ties are invented. Written
    through a temporary file (atomic_save, or Outputs.add): a crash leaves no half a run."""
    if not tag or any(c.isspace() for c in tag):
        raise ValueError(f"run tag '{tag}' must be one word")
    lines = [
        f"{qid} Q0 {docid} {rank} {float(scores[docid])!r} {tag}\n"
        for qid, scores in run.items()
        for rank, docid in enumerate(trec_ranking(scores), 1)
    ]
    save(lambda f: Path(f).write_text("".join(lines), encoding="utf-8"), path)


def write_per_query(path, per_query, save=atomic_save):
    """Per-query values as eval.py -q prints them ('measure<TAB>qid<TAB>value'), but with every
    digit (repr): the values behind a table, small enough to keep in the repository."""
    lines = [
        f"{m}\t{qid}\t{value!r}\n"
        for qid, values in per_query.items()
        for m, value in values.items()
    ]
    save(lambda f: Path(f).write_text("".join(lines), encoding="utf-8"), path)


def read_per_query(path):
    """{qid: {measure: value}} from eval.py -q output or write_per_query (the 'all' lines, the
    means, are left out: they are recomputed from the queries)."""
    per_query = {}
    for line_no, line in text_lines(path):
        fields = line.split()
        if not fields:
            continue
        try:
            measure, qid, value = fields
            value = float(value)
        except ValueError:
            raise ValueError(f"{path}:{line_no}: expected 'measure qid value'") from None
        if qid != "all":
            per_query.setdefault(qid, {})[measure] = value
    return per_query


# -----------------------------------------------------------------------------
# ranking


def trec_ranking(scores):
    """Docids of one query in trec_eval's order: score descending, ties by docid descending.
    trec_eval stores scores as C floats, so scores equal in float32 (1.0000000003 and
    1.0000000001) are ties; and it breaks ties with strcmp on the docids, reversed. Python's
    str comparison is by code point, which for UTF-8 text is the same as byte order."""
    return sorted(scores, key=lambda docid: (np.float32(scores[docid]), docid), reverse=True)


def cut_run(run, depth):
    """Each query's top `depth` documents in trec_eval's order (trec_eval -M). MRR@10 is
    recip_rank on cut_run(run, 10), since trec_eval's recip_rank has no cutoff."""
    if depth < 1:
        raise ValueError(f"the cut depth must be >= 1, got {depth}")
    return {
        qid: {docid: scores[docid] for docid in trec_ranking(scores)[:depth]}
        for qid, scores in run.items()
    }


# -----------------------------------------------------------------------------
# measures


def parse_measure(name):
    """(name, base, k): 'ndcg_cut.10' or 'ndcg_cut_10' -> ('ndcg_cut_10', 'ndcg_cut', 10);
    'map' -> ('map', 'map', None)."""
    if name in ("ndcg", "recip_rank", "map"):
        return name, name, None
    match = re.fullmatch(r"(ndcg_cut|P|recall|success)[._]([1-9][0-9]*)", name)
    if not match:
        raise ValueError(f"unknown measure '{name}' (known: {MEASURES_HELP})")
    return f"{match[1]}_{match[2]}", match[1], int(match[2])


def dcg(gains):
    return sum(gain / math.log2(rank + 1) for rank, gain in enumerate(gains, 1))


def measure_query(base, k, ranking, judgments, relevance_level):
    """One measure for one query: `ranking` is the docids in trec_eval order."""
    grades = [judgments.get(docid, 0) for docid in ranking]  # unjudged = grade 0
    if base in ("ndcg", "ndcg_cut"):
        # Gains are grades; negative grades ("unjudged") gain nothing and are not ideal.
        ideal = sorted((g for g in judgments.values() if g > 0), reverse=True)
        return dcg([max(g, 0) for g in grades[:k]]) / dcg(ideal[:k]) if ideal else 0.0
    relevant = [g >= relevance_level for g in grades]
    n_relevant = sum(g >= relevance_level for g in judgments.values())
    hit_ranks = [rank for rank, rel in enumerate(relevant, 1) if rel]
    if base == "recip_rank":
        return 1 / hit_ranks[0] if hit_ranks else 0.0
    if base == "map":  # precision at the rank of each relevant doc; unretrieved ones add 0
        precision_sum = sum(n_hits / rank for n_hits, rank in enumerate(hit_ranks, 1))
        return precision_sum / n_relevant if n_relevant else 0.0
    if base == "P":
        return sum(relevant[:k]) / k  # divides by k even when fewer were retrieved
    if base == "recall":
        return sum(relevant[:k]) / n_relevant if n_relevant else 0.0
    if base == "success":
        return float(any(relevant[:k]))  # hit rate HR@k
    raise AssertionError(base)


def evaluate(qrels, run, measures, relevance_level=1, complete=False):
    """Per-query values {qid: {measure: value}}, like pytrec_eval, with trec_eval's names
    ('ndcg_cut.10' is returned as 'ndcg_cut_10'). Evaluated queries are those in both the
    qrels and the run; with complete=True (trec_eval -c) every qrels query, a query missing
    from the run being scored as an empty ranking, i.e. 0 for every measure. Run queries
    without qrels are ignored. A qrels query with no relevant document is evaluated (0)."""
    if relevance_level < 1:  # else documents missing from the qrels (grade 0) would be relevant
        raise ValueError(f"relevance level must be >= 1, got {relevance_level}")
    parsed = [parse_measure(m) for m in ([measures] if isinstance(measures, str) else measures)]
    qids = qrels.keys() if complete else qrels.keys() & run.keys()
    per_query = {}
    for qid in sorted(qids):
        ranking = trec_ranking(run.get(qid, {}))
        per_query[qid] = {
            name: measure_query(base, k, ranking, qrels[qid], relevance_level)
            for name, base, k in parsed
        }
    return per_query


def summarize(per_query):
    """Mean of each measure over the queries of `per_query` (what trec_eval prints as 'all').
    Which queries those are is decided by evaluate(..., complete=)."""
    if not per_query:
        return {}
    measures = next(iter(per_query.values()))
    return {m: statistics.fmean(values[m] for values in per_query.values()) for m in measures}


# -----------------------------------------------------------------------------
# paired t-test


def incomplete_beta(a, b, x):
    """Regularized incomplete beta I_x(a, b), by its continued fraction evaluated with the
    modified Lentz method (Numerical Recipes 3rd ed., 6.4, 'betacf')."""
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    if x > (a + 1) / (a + b + 2):
        # The fraction converges quickly only below this point; use I_x(a,b) = 1 - I_1-x(b,a).
        return 1.0 - incomplete_beta(b, a, 1.0 - x)
    tiny = 1e-300  # keeps the Lentz denominators away from zero
    log_inv_beta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)  # -log B(a, b)
    front = math.exp(log_inv_beta + a * math.log(x) + b * math.log1p(-x)) / a
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 10000):
        # each step m adds two terms of the fraction: an even one and an odd one
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for term in (even, odd):
            d = 1.0 + term * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + term / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * fraction


def student_t_p_value(t, df):
    """Two-sided p-value P(|T| >= |t|) of Student's t with df degrees of freedom:
    I_x(df/2, 1/2) with x = df / (df + t^2). For small |t|, x rounds to 1 and the answer to
    1 - 1e-16, so there we use 1 - I_(1-x)(1/2, df/2) with 1 - x = t^2 / (df + t^2) exact."""
    if t * t > df:
        return incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1.0 - incomplete_beta(0.5, df / 2, t * t / (df + t * t))


def paired_t_test(a, b):
    """Two-sided paired t-test of b against a ({qid: value} each) over their common queries.
    Returns (mean of b - a, t, p). Identical runs give (0.0, 0.0, 1.0)."""
    common = sorted(a.keys() & b.keys())
    if len(common) < 2:
        raise ValueError(f"a paired t-test needs at least 2 common queries, got {len(common)}")
    deltas = [b[qid] - a[qid] for qid in common]
    mean_delta, sd = statistics.fmean(deltas), statistics.stdev(deltas)
    if sd == 0.0:  # every query moved by the same amount: no noise, t is 0 or infinite
        return (
            mean_delta,
            (0.0 if mean_delta == 0 else math.copysign(math.inf, mean_delta)),
            (1.0 if mean_delta == 0 else 0.0),
        )
    t = mean_delta / (sd / math.sqrt(len(deltas)))
    return mean_delta, t, student_t_p_value(t, len(deltas) - 1)


def t_quantile(level, df):
    """The t that Student's t with df degrees of freedom exceeds in absolute value with
    probability 1 - level (2.228 for level 0.95 and df 10), by bisection on the p-value."""
    low, high = 0.0, 1.0
    while student_t_p_value(high, df) > 1 - level:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_p_value(middle, df) > 1 - level else (low, middle)
    return (low + high) / 2


def paired_confidence_interval(a, b, level=0.95):
    """(low, high): the `level` confidence interval of the mean of b - a over their common
    queries, from the same t distribution as paired_t_test."""
    deltas = [b[qid] - a[qid] for qid in sorted(a.keys() & b.keys())]
    if len(deltas) < 2:
        raise ValueError(f"an interval needs at least 2 common queries, got {len(deltas)}")
    half = t_quantile(level, len(deltas) - 1) * statistics.stdev(deltas) / math.sqrt(len(deltas))
    return statistics.fmean(deltas) - half, statistics.fmean(deltas) + half


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = argparse.ArgumentParser(
        usage="%(prog)s QRELS RUN [RUN_B] [-m MEASURE ...] [-l LEVEL] [-c] [-q] [-M DEPTH]",
        description="Evaluate TREC runs with trec_eval's semantics; with two runs, compare them "
        "(means, B - A, two-sided paired t-test p over the queries both evaluate).",
    )
    parser.add_argument(
        "qrels", metavar="QRELS", help="TREC 'qid 0 docid grade' or BEIR TSV with header"
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="one run, or two to compare (A B)")
    parser.add_argument(
        "-m",
        dest="measures",
        nargs="+",
        action="extend",
        metavar="MEASURE",
        help=f"{MEASURES_HELP}; default: {' '.join(DEFAULT_MEASURES)}",
    )
    parser.add_argument(
        "-l",
        dest="relevance_level",
        type=int,
        default=1,
        metavar="LEVEL",
        help="lowest grade that counts as relevant for binary measures "
        "(1 for MS MARCO, 2 for TREC DL; nDCG uses the grades)",
    )
    parser.add_argument(
        "-c",
        dest="complete",
        action="store_true",
        help="average over all qrels queries, those missing from the run as 0",
    )
    parser.add_argument(
        "-q", dest="per_query", action="store_true", help="also print per-query values"
    )
    parser.add_argument(
        "-M",
        dest="depth",
        type=int,
        help="use each query's top DEPTH docs only (trec_eval order); MRR@10 = -M 10 -m recip_rank",
    )
    args = parser.parse_args(argv)
    try:  # bad input is one line on stderr naming the file, line or flag, and exit code 2
        if len(args.runs) > 2 or (args.per_query and len(args.runs) == 2):
            raise ValueError("give one RUN (also with -q), or two RUNs to compare")
        measures = list(
            dict.fromkeys(parse_measure(m)[0] for m in args.measures or DEFAULT_MEASURES)
        )
        qrels, results = read_qrels(args.qrels), []
        for path in args.runs:
            run = read_run(path) if args.depth is None else cut_run(read_run(path), args.depth)
            results.append(evaluate(qrels, run, measures, args.relevance_level, args.complete))
            if not results[-1]:
                raise ValueError(f"{path}: no query in common with {args.qrels}")
        if len(results) == 1:
            per_query = results[0] if args.per_query else {}
            lines = [
                f"{m}\t{qid}\t{values[m]:.4f}"
                for qid, values in per_query.items()
                for m in measures
            ]
            lines += [f"{m}\tall\t{mean:.4f}" for m, mean in summarize(results[0]).items()]
        else:
            common = results[0].keys() & results[1].keys()
            lines = [f"measure\tA\tB\tB-A\tp (paired t-test over {len(common)} queries)"]
            for m in measures:
                a, b = ({qid: per_query[qid][m] for qid in common} for per_query in results)
                delta, _, p = paired_t_test(a, b)
                mean_a, mean_b = statistics.fmean(a.values()), statistics.fmean(b.values())
                lines.append(f"{m}\t{mean_a:.4f}\t{mean_b:.4f}\t{delta:+.4f}\t{p:.4f}")
    except (OSError, ValueError) as e:
        message = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) else e
        print(f"eval.py: error: {message}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
