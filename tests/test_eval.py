"""eval.py against trec_eval: the shared fixture cases, plus textbook cases to check by hand."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import eval as E  # the module eval.py, not the builtin eval()
from conftest import ROOT

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # the checkout and `shared` sit side by side

CASES_PATH = SHARED / "fixtures" / "eval" / "cases.json"
CASES = json.loads(CASES_PATH.read_text())["cases"] if CASES_PATH.exists() else []
DATA = SHARED / "data" / "msmarco_small"


def write(path, text):
    path.write_text(text)
    return path


def load_case(case, tmp_path):
    """The case's qrels and run, read through read_qrels / read_run (inline ones via a file)."""
    if "qrels_file" in case:
        qrels = E.read_qrels(SHARED / case["qrels_file"])
        run = E.read_run(SHARED / case["run_file"])
    else:
        qrels = E.read_qrels(write(tmp_path / "qrels.txt", case["qrels_trec"]))
        run = E.read_run(write(tmp_path / "run.trec", case["run_trec"]))
    if case.get("run_transform") == "top 10 per query":
        run = E.cut_run(run, 10)
    else:
        assert "run_transform" not in case, case["run_transform"]
    return qrels, run


# ---------------------------------------------------------------------------
# every value of the fixture, which trec_eval -q and -q -c produced


@pytest.mark.skipif(not CASES, reason=f"{CASES_PATH} not found")
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fixture_case(case, tmp_path):
    qrels, run = load_case(case, tmp_path)
    for qid, order in case.get("trec_eval_order", {}).items():
        assert E.trec_ranking(run[qid]) == order
    for result in case["results"]:
        where = f"{case['name']} {result['measure']} -l {result['relevance_level']}"
        measure, level = result["pytrec_eval_measure"], result["relevance_level"]
        per_query = E.evaluate(qrels, run, [measure], relevance_level=level)
        values = {qid: v[result["measure"]] for qid, v in per_query.items()}
        assert values.keys() == result["per_query"].keys(), where
        for qid, expected in result["per_query"].items():
            assert values[qid] == pytest.approx(expected, abs=1e-6), f"{where} query {qid}"
        assert len(per_query) == result["n_evaluated"], where
        mean = E.summarize(per_query)[result["measure"]]
        assert mean == pytest.approx(result["mean_over_evaluated"], abs=1e-6), where
        complete = E.evaluate(qrels, run, [measure], relevance_level=level, complete=True)
        assert len(complete) == result["n_qrels_queries"], where
        mean_all = E.summarize(complete)[result["measure"]]
        assert mean_all == pytest.approx(result["mean_over_all_qrels_queries"], abs=1e-6), where


# ---------------------------------------------------------------------------
# textbook cases


def test_ndcg_three_documents_by_hand():
    # Ranked d1, d2, d3 with grades 0, 2, 1; gain = grade, discount 1/log2(rank + 1):
    #   DCG  = 0/log2(2) + 2/log2(3) + 1/log2(4) = 0 + 1.2619 + 0.5    = 1.7619
    #   IDCG = 2/log2(2) + 1/log2(3) + 0/log2(4) = 2 + 0.6309 + 0      = 2.6309  (grades 2, 1, 0)
    #   nDCG = 1.7619 / 2.6309 = 0.6697
    qrels = {"q": {"d1": 0, "d2": 2, "d3": 1}}
    run = {"q": {"d1": 3.0, "d2": 2.0, "d3": 1.0}}
    expected = (2 / math.log2(3) + 1 / 2) / (2 + 1 / math.log2(3))
    values = E.evaluate(qrels, run, ["ndcg", "ndcg_cut.3", "ndcg_cut.1"])["q"]
    assert values["ndcg"] == pytest.approx(expected, abs=1e-12) == pytest.approx(0.6697, abs=1e-4)
    assert values["ndcg_cut_3"] == values["ndcg"]
    assert values["ndcg_cut_1"] == 0.0  # d1 (grade 0) is first, the ideal first has grade 2
    # The ideal uses every judged document, also one the run never retrieved:
    # a grade-3 d4 makes IDCG = 3 + 2/log2(3) + 1/2.
    qrels["q"]["d4"] = 3
    expected = (2 / math.log2(3) + 1 / 2) / (3 + 2 / math.log2(3) + 1 / 2)
    assert E.evaluate(qrels, run, ["ndcg"])["q"]["ndcg"] == pytest.approx(expected, abs=1e-12)


def test_ties_broken_by_docid_descending():
    # Equal scores: trec_eval orders by strcmp on the docids, largest first:
    # '7' > '30' > '100' > '10'.
    assert E.trec_ranking({"10": 5.0, "7": 5.0, "100": 5.0, "30": 5.0}) == ["7", "30", "100", "10"]
    assert E.trec_ranking({"a": 2.0, "b": 1.0, "c": 1.0}) == ["a", "c", "b"]


def test_scores_compared_as_float32():
    # Different as float64, all equal to 1.0 as float32: ties, so docid descending decides.
    scores = {"d1": 1.0000000003, "d2": 1.0000000002, "d3": 1.0000000001}
    assert E.trec_ranking(scores) == ["d3", "d2", "d1"]
    rr = E.evaluate({"q": {"d1": 1}}, {"q": scores}, ["recip_rank"])["q"]["recip_rank"]
    assert rr == pytest.approx(1 / 3)


def test_precision_recall_success_map_by_hand():
    # Ranking a, b, c, d; relevant (grade >= 1): b and d, plus e that was not retrieved.
    qrels = {"q": {"a": 0, "b": 1, "d": 2, "e": 1}}
    run = {"q": {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}}
    v = E.evaluate(
        qrels, run, ["P.2", "P.10", "recall.2", "success.1", "success.2", "recip_rank", "map"]
    )["q"]
    assert v["P_2"] == 1 / 2
    assert v["P_10"] == 2 / 10  # divides by 10 although only 4 were retrieved
    assert v["recall_2"] == 1 / 3  # 1 of the 3 relevant in the qrels
    assert v["success_1"] == 0.0 and v["success_2"] == 1.0  # hit rate: any relevant in the top k
    assert v["recip_rank"] == 1 / 2
    assert v["map"] == pytest.approx((1 / 2 + 2 / 4) / 3)  # precision at b and d; e adds 0
    # At relevance level 2 only d counts.
    v2 = E.evaluate(qrels, run, ["success.2", "recip_rank"], relevance_level=2)["q"]
    assert v2 == {"success_2": 0.0, "recip_rank": 1 / 4}


def test_which_queries_are_evaluated():
    qrels = {"both": {"d": 1}, "qrels_only": {"d": 1}, "no_relevant": {"d": 0}}
    run = {"both": {"d": 1.0}, "run_only": {"d": 1.0}, "no_relevant": {"d": 1.0}}
    per_query = E.evaluate(qrels, run, ["recip_rank"])
    assert per_query == {"both": {"recip_rank": 1.0}, "no_relevant": {"recip_rank": 0.0}}
    assert E.summarize(per_query) == {"recip_rank": 0.5}
    complete = E.evaluate(qrels, run, ["recip_rank"], complete=True)  # trec_eval -c
    assert complete["qrels_only"] == {"recip_rank": 0.0} and "run_only" not in complete
    assert E.summarize(complete) == {"recip_rank": pytest.approx(1 / 3)}


def test_cut_run_keeps_top_depth_in_trec_order():
    run = {"q": {"a": 1.0, "b": 3.0, "c": 3.0, "d": 0.5}}
    assert E.cut_run(run, 2) == {"q": {"c": 3.0, "b": 3.0}}
    assert E.cut_run(run, 10) == run


def test_measure_names():
    assert E.parse_measure("ndcg_cut.10") == ("ndcg_cut_10", "ndcg_cut", 10)
    assert E.parse_measure("P_5") == ("P_5", "P", 5)
    for bad in ["ndcg@10", "P.0", "mrr", "recall"]:
        with pytest.raises(ValueError, match="unknown measure"):
            E.parse_measure(bad)


# ---------------------------------------------------------------------------
# files


def test_qrels_trec_and_beir_formats_agree(tmp_path):
    trec = write(tmp_path / "q.trec", "q1 0 d1 1\nq1 0 d2 0\nq2 0 d1 -1\n")
    beir = write(
        tmp_path / "q.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\nq2\td1\t-1\n"
    )
    assert E.read_qrels(trec) == E.read_qrels(beir) == {"q1": {"d1": 1, "d2": 0}, "q2": {"d1": -1}}


def test_duplicate_docid_in_run_is_an_error(tmp_path):
    path = write(tmp_path / "run.trec", "q1 Q0 d1 1 2.0 t\nq1 Q0 d2 2 1.0 t\nq1 Q0 d1 3 0.5 t\n")
    with pytest.raises(ValueError, match=r"run\.trec:3: passage 'd1' listed twice for query 'q1'"):
        E.read_run(path)


def test_malformed_lines_name_file_and_line(tmp_path):
    run = write(tmp_path / "run.trec", "q1 Q0 d1 1 2.0 t\nq1 Q0 d2 2 t\n")
    with pytest.raises(ValueError, match=r"run\.trec:2: expected 6 fields"):
        E.read_run(run)
    run = write(tmp_path / "run.trec", "q1 Q0 d1 1 high t\n")
    with pytest.raises(ValueError, match=r"run\.trec:1: score 'high' is not a number"):
        E.read_run(run)
    qrels = write(tmp_path / "qrels.txt", "q1 0 d1 1\nq1 0 d2 relevant\n")
    with pytest.raises(ValueError, match=r"qrels\.txt:2: grade 'relevant' is not an integer"):
        E.read_qrels(qrels)
    qrels = write(tmp_path / "qrels.txt", "q1 0 d1 1\nq1 d2 1\n")  # TREC, then a 3-field line
    with pytest.raises(ValueError, match=r"qrels\.txt:2: expected"):
        E.read_qrels(qrels)
    # a headerless BEIR file whose first grade is not an integer: an error, not a "header" to skip
    qrels = write(tmp_path / "qrels.tsv", "q1\td1\tyes\nq1\td2\t1\n")
    with pytest.raises(ValueError, match=r"qrels\.tsv:1: grade 'yes' is not an integer"):
        E.read_qrels(qrels)
    # a BEIR id holding a space is refused, not read as a 4-column TREC line (qid "q", docid "d1")
    qrels = write(tmp_path / "qrels.tsv", "q 1\td1\t1\n")
    with pytest.raises(ValueError, match=r"qrels\.tsv:1: id 'q 1' or 'd1' is empty or holds white"):
        E.read_qrels(qrels)
    (tmp_path / "latin1.trec").write_bytes(b"q1 Q0 d1 1 2.0 t\nq1 Q0 d\xe9 2 1.0 t\n")
    with pytest.raises(ValueError, match=r"latin1\.trec:2: not valid UTF-8"):
        E.read_run(tmp_path / "latin1.trec")
    run = write(tmp_path / "run.trec", "q1 Q0 d1 1 inf t\n")
    with pytest.raises(ValueError, match=r"run\.trec:1: score inf is not finite"):
        E.read_run(run)


def test_write_run_round_trip_keeps_order_and_invents_no_ties(tmp_path):
    # '%.6f' would print e and f both as 1.000000, a tie that trec_eval would break as f, e.
    # 0.1 + 0.2 and 0.3 differ in float64 (kept exactly) but not in float32 (a trec_eval tie).
    run = {
        "q2": {"a": 0.3, "b": 0.1 + 0.2, "c": -7.25, "e": 1.0000002, "f": 1.0000001},
        "q1": {"x": 1e-12, "y": 12345.678901234567},
    }
    path = tmp_path / "out.trec"
    E.write_run(path, run, "qpeft")
    assert E.read_run(path) == run  # the exact same floats
    lines = [line.split() for line in path.read_text().splitlines()]
    ranks = [
        ("q2", "e", "1"),
        ("q2", "f", "2"),
        ("q2", "b", "3"),
        ("q2", "a", "4"),
        ("q2", "c", "5"),
    ]
    ranks += [("q1", "y", "1"), ("q1", "x", "2")]
    assert [(f[0], f[2], f[3]) for f in lines] == ranks
    assert all(f[1] == "Q0" and f[5] == "qpeft" for f in lines)
    assert [p.name for p in tmp_path.iterdir()] == ["out.trec"]  # no temporary file left


# ---------------------------------------------------------------------------
# paired t-test


def test_student_t_p_values_known_by_hand():
    assert E.student_t_p_value(2.0, 10) == pytest.approx(0.0733880347707404, abs=1e-10)
    assert E.student_t_p_value(0.0, 7) == 1.0
    for t in [0.001, 0.5, 1.0, 3.0, 50.0]:
        # Closed forms: df=1 is the Cauchy distribution, p = 1 - (2/pi) atan|t|;
        # df=2 has p = 1 - |t| / sqrt(t^2 + 2).
        assert E.student_t_p_value(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-12)
        assert E.student_t_p_value(-t, 2) == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-12)
    for t in [0.5, 1.96, 3.0]:  # large df: Student's t becomes the normal distribution
        assert E.student_t_p_value(t, 1e6) == pytest.approx(math.erfc(t / math.sqrt(2)), abs=1e-6)


def test_paired_t_test_by_hand():
    # deltas b - a = 1, 2, 3: mean 2, sd 1, t = 2 / (1/sqrt(3)) = 3.4641, df = 2.
    a, b = {"q1": 0.0, "q2": 0.0, "q3": 0.0, "only_a": 9.0}, {"q1": 1.0, "q2": 2.0, "q3": 3.0}
    delta, t, p = E.paired_t_test(a, b)
    assert delta == 2.0 and t == pytest.approx(2 * math.sqrt(3))
    assert p == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-12)  # = 0.0742
    assert E.paired_t_test(b, b) == (0.0, 0.0, 1.0)  # identical runs: p = 1, not NaN
    with pytest.raises(ValueError, match="at least 2"):
        E.paired_t_test({"q1": 1.0}, {"q1": 2.0})
    # 95 % interval: 2 +- t * sd / sqrt(3), t the 0.975 quantile of t(2): p(t) = 1 - t/sqrt(t^2+2)
    # = 0.05 gives t^2 = 0.9025 (t^2 + 2), t = sqrt(1.805 / 0.0975) = 4.3027
    half = math.sqrt(1.805 / 0.0975) / math.sqrt(3)
    low, high = E.paired_confidence_interval(a, b)
    assert low == pytest.approx(2 - half, abs=1e-9) and high == pytest.approx(2 + half, abs=1e-9)


def test_t_quantiles_match_the_printed_tables():
    for df, t in [(1, 12.7062), (10, 2.2281), (42, 2.0181), (299, 1.9679)]:
        assert E.t_quantile(0.95, df) == pytest.approx(t, abs=1e-4)


# ---------------------------------------------------------------------------
# command line


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "eval.py", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.skipif(not DATA.exists(), reason=f"{DATA} not found")
def test_cli_dl19_ndcg_cut_10():
    out = run_cli(DATA / "qrels/test.tsv", DATA / "runs/test.bm25.trec", "-m", "ndcg_cut.10")
    assert (out.returncode, out.stdout, out.stderr) == (0, "ndcg_cut_10\tall\t0.5058\n", "")


def test_cli_per_query_and_comparison(tmp_path):
    qrels = write(tmp_path / "qrels.txt", "q1 0 a 1\nq2 0 b 1\nq3 0 a 1\n")
    run_a = write(
        tmp_path / "a.trec", "q1 Q0 a 1 2 t\nq1 Q0 b 2 1 t\nq2 Q0 a 1 2 t\nq2 Q0 b 2 1 t\n"
    )
    run_b = write(tmp_path / "b.trec", "q1 Q0 a 1 2 t\nq2 Q0 b 1 2 t\n")
    out = run_cli(qrels, run_a, "-q", "-m", "recip_rank", "-c")
    assert (
        out.stdout == "recip_rank\tq1\t1.0000\nrecip_rank\tq2\t0.5000\nrecip_rank\tq3\t0.0000\n"
        "recip_rank\tall\t0.5000\n"
    )
    out = run_cli(qrels, run_a, run_b, "-m", "recip_rank", "P.1")
    lines = out.stdout.splitlines()
    assert lines[0].startswith("measure\tA\tB\tB-A\tp")
    assert lines[1:] == [
        "recip_rank\t0.7500\t1.0000\t+0.2500\t0.5000",  # deltas 0, 0.5: t = 1, df = 1
        "P_1\t0.5000\t1.0000\t+0.5000\t0.5000",
    ]


@pytest.mark.parametrize(
    "case", ["missing file", "malformed line", "unknown measure", "duplicate docid"]
)
def test_cli_bad_input_is_one_line_and_exit_2(case, tmp_path):
    qrels = write(tmp_path / "qrels.txt", "q1 0 a 1\n")
    run = write(tmp_path / "run.trec", "q1 Q0 a 1 2 t\n")
    args, expected = {
        "missing file": ([qrels, tmp_path / "nope.trec"], "nope.trec: No such file"),
        "malformed line": (
            [qrels, write(tmp_path / "bad.trec", "q1 Q0 a 1 2 t\nq1 a 2\n")],
            "bad.trec:2:",
        ),
        "unknown measure": ([qrels, run, "-m", "ndcg@10"], "unknown measure 'ndcg@10'"),
        "duplicate docid": (
            [qrels, write(tmp_path / "dup.trec", "q1 Q0 a 1 2 t\nq1 Q0 a 2 1 t\n")],
            "dup.trec:2: passage 'a' listed twice for query 'q1'",
        ),
    }[case]
    out = run_cli(*args)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and expected in out.stderr, out.stderr


def test_per_query_files_recompute_a_table(tmp_path, capsys):
    """results/summarize.py on hand-made per-query files: a row over two seeds is averaged per
    query before the paired test (the deltas are then 1, 2, 3, as in the t-test above)."""
    zero = {"q1": {"ndcg_cut_10": 0.0}, "q2": {"ndcg_cut_10": 0.0}, "q3": {"ndcg_cut_10": 0.0}}
    seeds = [
        {q: {"ndcg_cut_10": v + shift} for q, v in zip(zero, (1, 2, 3))} for shift in (-0.5, 0.5)
    ]
    E.write_per_query(tmp_path / "zeroshot.test.per-query.tsv", zero)
    for i, values in enumerate(seeds):
        E.write_per_query(tmp_path / f"a{i}.tsv", values)
        assert E.read_per_query(tmp_path / f"a{i}.tsv") == values  # every digit comes back
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "results" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    files = f"{tmp_path / 'a0.tsv'},{tmp_path / 'a1.tsv'}"
    summarize.main(
        [str(tmp_path / "zeroshot.test.per-query.tsv"), f"A={files}", "-m", "ndcg_cut_10"]
    )
    row = capsys.readouterr().out.splitlines()[-1].split()
    # seeds' means 1.5 and 2.5: 2.0000 ± 0.7071; delta 2, CI 2 -+ 2.4841, p 0.074, 3 queries,
    # all 3 up; SD of the deltas 1, so (2.8016 * 1 / 2)^2 = 1.96: 2 queries for 80 % power
    assert row == [
        "A",
        "2",
        "2.0000",
        "±",
        "0.7071",
        "+2.0000",
        "[-0.4841,",
        "+4.4841]",
        "0.074",
        "3",
        "3/0",
        "2",
    ]


def test_summarize_refuses_a_row_named_twice_or_a_missing_measure(tmp_path, capsys):
    E.write_per_query(tmp_path / "zeroshot.tsv", {"q1": {"ndcg_cut_10": 0.5}})
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "results" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    base = str(tmp_path / "zeroshot.tsv")
    for argv, message in [
        ([base, f"zeroshot={base}"], "each ROW named once"),
        ([base, f"A={base}", "-m", "success_5"], "row zeroshot: no per-query values of success_5"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            summarize.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_list_temperature_by_hand():
    """results/list_temperature.py: each positive in the top `depth` meets its query's judged
    negatives there, scores summed over the query's targets, and costs -log softmax(S / T)[d+]."""
    spec = importlib.util.spec_from_file_location("lt", ROOT / "results" / "list_temperature.py")
    lt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lt)
    run = {"q1": {"A": -1.0, "a": -0.5, "u": -0.7, "b": -3.0, "tail": -9.0}, "q2": {"B": -1.0}}
    qrels = {"q1": {"A": 1, "a": 0, "b": 0, "tail": 1}, "q2": {"B": 1}}
    # depth 4 drops q1's tail; u is unjudged, q2 has no negative: one list, 2 targets -> x 2
    scored = lt.lists(run, qrels, {"q1": 2, "q2": 3}, depth=4)
    assert scored == [(-2.0, [-1.0, -6.0])]
    for t in (1, 2):
        expected = math.log(math.exp(-2 / t) + math.exp(-1 / t) + math.exp(-6 / t)) + 2 / t
        assert lt.list_costs(scored, t) == [pytest.approx(expected, abs=1e-12)]
    # a list ranked wrongly costs less at a higher temperature: 1.3182 at T = 1, 1.0239 at T = 2
    assert lt.list_costs(scored, 2)[0] < lt.list_costs(scored, 1)[0]
