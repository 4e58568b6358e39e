"""The study pipeline end to end in its QUICK variant (what `make study QUICK=1` runs)."""
import pandas as pd

from qbench.results import ResultStore
from qbench.study import mechanism_logs, mechanism_table, run_study, write_study
from record_factory import make_record


def test_quick_study_runs_and_writes_tables_traceable_to_records(tmp_path):
    from qbench.paths import models_dir

    store = ResultStore(tmp_path / "results")
    records = run_study(store, quick=True, progress=False)
    assert records and all(r["status"] == "ok" for r in records)
    path = write_study(store, tmp_path / "out", models_dir(), quick=True)
    text = path.read_text()
    assert "1. Mechanism: Bigram-Backcopy" in text and "2. The tiny zoo" in text
    assert (tmp_path / "out" / "plots" / "mechanism_curves.png").stat().st_size > 1000
    # every quantized ppl in the table is the mean of that cell's records in the store
    w8 = [r["metrics"]["ppl"] for r in records if r["model"] == "bb-vga" and r["scheme"] == "w8a8-pt"
          and r["task"] == "ppl"]
    assert len(w8) == 2  # two calibration draws
    assert f"{sum(w8) / 2:.3g}" in text
    again = run_study(store, quick=True, progress=False)  # a rerun computes nothing new
    assert [(r["key"], r["provenance"]["finished_at"]) for r in again] == \
        [(r["key"], r["provenance"]["finished_at"]) for r in records]


def test_mechanism_table_reads_the_bb_training_logs():
    from qbench.paths import models_dir

    logs = mechanism_logs(models_dir())
    assert {"softmax", "vga"} <= set(logs)
    table = mechanism_table(logs).set_index("arm")
    for arm, runs in logs.items():
        final = runs[0][1].iloc[-1]
        assert isinstance(runs[0][1], pd.DataFrame) and final["step"] == 1000
        if len(runs) == 1:
            assert table.loc[arm, "attn_s"] == f"{final['attn_s']:.3g}"


def _ppl_record(model, scheme, ppl, draw=None, **metrics):
    return make_record(model, scheme, "ppl", {"ppl": ppl, **metrics}, key=f"{model}-{scheme}-{draw}",
                       calibration_seed=draw, config={}, provenance={})


def test_ptq_table_cells_are_relative_changes_with_the_draw_spread():
    from qbench.report import comparison_table
    from qbench.study import ptq_table

    records = [_ppl_record("m", "fp32", 20.0), _ppl_record("m", "w8a8-pt", 40.0, 0),
               _ppl_record("m", "w8a8-pt-sq", 21.0, 0), _ppl_record("m", "w8a8-pt-sq", 23.0, 1),
               _ppl_record("a0", "fp32", 10.0), _ppl_record("a0", "w4-gptq-g64", 11.0, 0),
               _ppl_record("a1", "fp32", 10.0), _ppl_record("a1", "w4-gptq-g64", 13.0, 0)]
    table = ptq_table(comparison_table(records), [("m", ["m"]), ("arm a", ["a0", "a1"])]).set_index("model / arm")
    assert table.loc["m", "W8A8-pt"] == "+100 (1)"
    # draws 21 and 23: mean 22 (+10%), std sqrt(2) = 7.1% of fp32 20
    assert table.loc["m", "+ SmoothQuant"] == "+10 ± 7.1 (2)"
    assert table.loc["m", "GPTQ g64"] == "-"
    assert table.loc["arm a", "GPTQ g64"] == "20 ± 14 (2x1)"  # +10% and +30% over two seeds


def test_bb_quant_tables_take_deltas_against_each_checkpoints_fp32():
    from qbench.study import bb_quant_tables

    def bb(model, scheme, acc, draw=None, peak=5.0):
        return _ppl_record(model, scheme, 3.0, draw, copy_acc=acc, copy_loss=1 - acc, bigram_acc=0.5,
                           bigram_loss=1.0, mechanism={"attn_s": 0.2}, residual_peak_per_layer=[peak, 2.0],
                           mechanism_per_layer=[{"layer": 0, "attn_s": 0.2}, {"layer": 1, "attn_s": 0.8}])

    records = [bb("s0", "fp32", 0.90, peak=12.0), bb("s0", "w8a8-pt", 0.80, 0), bb("s0", "w8a8-pt", 0.70, 1),
               bb("s1", "fp32", 0.95), bb("s1", "w8a8-pt", 0.95, 0)]
    by_arm, checkpoints = bb_quant_tables(records, ["s0", "s1"], ["fp32", "w8a8-pt"])
    row = by_arm[(by_arm.arm == "s0") & (by_arm.scheme == "w8a8-pt")].iloc[0]
    assert row["Δcopy_acc"] == "-0.15" and row["n_draws"] == 2  # mean of 0.80 and 0.70, minus 0.90
    ck = checkpoints.set_index("checkpoint")
    assert ck.loc["s0", "fp32 residual peak"] == 12.0 and ck.loc["s0", "worst_scheme"] == "w8a8-pt"
    assert ck.loc["s0", "fp32 sink attn_s"] == 0.8  # the sink's layer, not layer 0
    assert abs(ck.loc["s1", "worst_d_copy_acc"]) < 1e-12


def test_more_text_never_averages_over_protocols():
    """The same checkpoint on the short protocol and the whole split: sections 2-4 see only
    the short cells, section 5 the long ones beside the short relative change."""
    from qbench.report import comparison_table
    from qbench.study import more_text_table, ptq_table, split_protocols

    short_p, long_p = "nonoverlap-w256-bos-sotu-test-first20000c", "nonoverlap-w256-bos-sotu-test"

    def rec(model, scheme, ppl, protocol, draw=None):
        return {**_ppl_record(model, scheme, ppl, draw, tokens=100), "protocol": protocol,
                "key": f"{model}-{scheme}-{draw}-{protocol}"}

    records = [rec("a0", "fp32", 100.0, short_p), rec("a0", "w8a8-pt", 110.0, short_p, 0),
               rec("a0", "w8a8-pt", 130.0, short_p, 1),
               rec("a0", "fp32", 50.0, long_p), rec("a0", "w8a8-pt", 51.0, long_p, 0),
               rec("b0", "fp32", 10.0, "bb-n64-T64-seed1234"), rec("b0", "w8a8-pt", 10.5, "bb-n64-T64-seed1234", 0)]
    short, long = split_protocols(comparison_table(records), 20000)
    assert set(long.protocol) == {long_p} and set(short.protocol) == {short_p, "bb-n64-T64-seed1234"}
    # the PTQ table on the short rows: (110 + 130) / 2 = 120 -> +20%, not mixed with the long +2%
    assert ptq_table(short, [("a", ["a0"])]).set_index("model / arm").loc["a", "W8A8-pt"].startswith("+20 ")
    table = more_text_table(short, long, ["a0"], ["fp32", "w8a8-pt"])
    assert list(table.scheme) == ["w8a8-pt"] and table.loc[0, "tokens"] == 100
    assert table.loc[0, "rel_delta_%"] == "2" and table.loc[0, "rel_delta_% short"] == "20"
    assert more_text_table(short, long, ["b0"], ["fp32", "w8a8-pt"]).empty


def test_mechanism_table_gives_every_layer_of_a_deeper_model():
    from qbench.study import mechanism_table

    def log(l0, l2):
        return pd.DataFrame([{"step": 0, "attn_s": 0.1, "attn_s_l0": 0.1, "attn_s_l1": 0.1, "attn_s_l2": 0.1,
                              "val_s_ratio_l0": 1.0, "val_s_ratio_l1": 1.0, "val_s_ratio_l2": 1.0},
                             {"step": 10, "attn_s": l0, "attn_s_l0": l0, "attn_s_l1": 0.5, "attn_s_l2": l2,
                              "val_s_ratio_l0": 0.9, "val_s_ratio_l1": 0.5, "val_s_ratio_l2": 0.1}])

    table = mechanism_table({"softmax": [("a", log(0.2, 0.9)), ("b", log(0.4, 0.7))]}).set_index("arm")
    assert table.loc["softmax", "attn_s"].startswith("0.3 ±")  # layer 0, mean of 0.2 and 0.4
    assert table.loc["softmax", "attn_s by layer"] == "0.3 / 0.5 / 0.8"
    assert table.loc["softmax", "val_s_ratio by layer"] == "0.9 / 0.5 / 0.1"
    one = mechanism_table({"softmax": [("a", log(0.2, 0.9)[["step", "attn_s", "attn_s_l0"]])]})
    assert "attn_s by layer" not in one


def test_mechanism_plot_draws_a_row_per_layer(tmp_path):
    from qbench.study import mechanism_plot

    frame = pd.DataFrame([{"step": s, **{f"{c}_l{i}": 0.1 + 0.01 * s for c in ("attn_s", "val_s_ratio", "val_s_eff_ratio",
                                                                             "delta_logit_s") for i in range(3)}}
                          for s in (0, 10, 20)])
    one = mechanism_plot({"softmax": [("a", frame[["step", "attn_s_l0"]].rename(columns={"attn_s_l0": "attn_s"}))]},
                         tmp_path / "one.png")
    three = mechanism_plot({"softmax": [("a", frame)]}, tmp_path / "three.png")
    from PIL import Image

    assert Image.open(three).size[1] > 2.5 * Image.open(one).size[1]  # three rows of panels against one


def test_writing_the_study_computes_nothing_and_counts_the_plan(tmp_path, monkeypatch):
    import qbench.runner
    from qbench.paths import models_dir

    def refuse(*args, **kwargs):
        raise AssertionError("write_study computed a cell")

    monkeypatch.setattr(qbench.runner, "run_cell", refuse)
    path = write_study(ResultStore(tmp_path / "empty"), tmp_path / "out", models_dir(), quick=True)
    text = path.read_text()
    assert "The store holds 0 of the" in text and "`qbench study --compute`" in text


def test_a_registered_section_lands_before_the_discussion(tmp_path, monkeypatch):
    from qbench.paths import models_dir
    from qbench.study import writer

    monkeypatch.setattr(writer, "SECTIONS", list(writer.SECTIONS))

    def kv_section(records):
        return f"## KV cache\n\n{len(records)} records"

    writer.register_section(kv_section)
    writer.register_section(kv_section)  # once only
    discussion = tmp_path / "DISCUSSION.md"
    discussion.write_text("## Discussion\n\nnothing to say")
    text = write_study(ResultStore(tmp_path / "empty"), tmp_path / "out", models_dir(), quick=True,
                       discussion=discussion, coverage=False).read_text()
    assert text.count("## KV cache") == 1 and text.index("## KV cache") < text.index("## Discussion")


def test_committed_study_opens_with_the_claims_and_headline():
    from qbench.paths import REPO_ROOT

    text = (REPO_ROOT / "results" / "STUDY.md").read_text()
    lines = text.splitlines()
    first = "\n".join(lines[:40])
    answer = "\n".join(lines[:12])  # the answer is on the first screen, its verdict by the rule's words
    assert "Does VGA make a model more quantizable?" in answer and "primary endpoint" in answer
    assert any(f"*{label}*" in answer for label in ("supported", "contradicted", "not shown", "insufficient"))
    assert "## The claims against our evidence" in first and "| VGA |" in first
    assert "Primary endpoint:" in first and "sample standard deviation" in first  # ± is defined
    assert "The store holds" in first
    headings = [line for line in lines if line.startswith("#")]
    assert len(headings) == len(set(headings)), "a heading appears twice"
    claims = lines[lines.index("## The claims against our evidence"):lines.index("## Headline per arm")]
    headline = lines[lines.index("## Headline per arm"):]
    headline = headline[:next(i for i, line in enumerate(headline) if line.startswith("## <a"))]
    # readable on a wide screen: the headline (and its provenance caption) and the claims rows,
    # which carry each scope's verdict and effect with its interval
    assert max(len(line) for line in headline if line.startswith("|")) <= 160
    assert max(len(line) for line in claims if line.startswith("|")) <= 300
    assert "all six arms" not in text.lower()


def test_the_study_suite_plans_the_cells_the_committed_study_counts():
    """The study's plan is suites/study.yaml, read by the one planner.  STUDY.md was written
    from the old hand-coded plan: planning the suite finds the same cells, the same held
    ones and the same missing ones, stage by stage, as the sentence it printed (a record
    migration that re-keys cells and records alike leaves the sentence unchanged)."""
    import re

    from qbench.paths import REPO_ROOT
    from qbench.study.plan import coverage

    committed = (REPO_ROOT / "results" / "STUDY.md").read_text()
    found = coverage(ResultStore(REPO_ROOT / "results"))
    assert found.planned > found.held > 0
    assert re.sub(r"\s+", " ", found.sentence()) in re.sub(r"\s+", " ", committed)


def test_the_study_suite_stages_keep_their_invariants():
    """What the old plan computed in code is data now: the other draws are exactly the
    calibrated tiny schemes; the PTQ stage has a column label for every scheme; the quick
    suite is two BB models at 4,000 characters."""
    from qbench.plan import plan_suite
    from qbench.quant import get_scheme
    from qbench.study.plan import PTQ_COLUMNS, plan, study_suite

    suite = study_suite(False)
    tiny, draws = suite.stage("tiny"), suite.stage("tiny other draws")
    assert draws.schemes == [s for s in tiny.schemes if "calibration_seed" in get_scheme(s).options]
    assert [scheme for _, scheme in PTQ_COLUMNS] == suite.stage("ptq").schemes
    # the primary endpoint: the whole split, every draw, only the arms named (the zoo's `arm`)
    from qbench.zoo import read_zoo

    primary = suite.stage("primary")
    assert primary.limit is None and primary.calibration_seeds == [0, 1, 2] and "w8a8-pt" in primary.schemes
    zoo = read_zoo()
    assert primary.model_names() == [m for m, e in zoo.items() if e.get("preset") == "tiny"
                                     and e.get("arm") in ("softmax", "vga")]
    assert suite.stages[0] is primary  # computed first
    full = plan(False)
    assert full.calibration_seeds == [0, 1, 2] and full.tiny_tasks == ["ppl", "probes"] and full.task_limit == 500
    quick = plan(True)
    assert (quick.tiny_models, quick.limit, quick.calibration_seeds) == (["bb-softmax", "bb-vga"], 4000, [0, 1])
    cells = [(p.cell.model, p.cell.scheme.name, p.cell.scheme.options.get("calibration_seed"))
             for p in plan_suite(study_suite(True))]
    assert cells == [(m, s, d) for m in ("bb-softmax", "bb-vga") for s, d in
                     (("fp32", None), ("w8a8-dyn", None), ("w8a8-pt", 0))] + \
        [("bb-softmax", "w8a8-pt", 1), ("bb-vga", "w8a8-pt", 1)]
