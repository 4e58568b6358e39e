"""Quarantine warnings summarised, duplicate models or seeds
counted once, and `|` and line breaks in names kept inside their REPORT.md cell."""
import re

import pandas as pd

from qbench.results import MAX_QUARANTINE_WARNINGS, ResultStore
from record_factory import make_record


def test_many_quarantined_records_print_a_bounded_number_of_lines(tmp_path, capsys):
    """100,000 bad records printed 100,001 warning lines."""
    records = tmp_path / "records"
    records.mkdir()
    for i in range(3 * MAX_QUARANTINE_WARNINGS):
        (records / f"{i:04d}.json").write_text("{not json")
    assert ResultStore(tmp_path).records() == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == MAX_QUARANTINE_WARNINGS + 1, err
    assert f"{2 * MAX_QUARANTINE_WARNINGS} more invalid records skipped" in err[-1]
    assert len(list(records.glob("*.json"))) == 3 * MAX_QUARANTINE_WARNINGS  # reading moves none of them


def _record(key, seed=0):
    return make_record("m", "w8a8-pt", "ppl", {"ppl": 10.0 + seed, "kl": 0.1}, key=key, calibration_seed=seed)


def test_a_record_listed_twice_counts_once():
    """`--model a,a` or `--calibration-seeds 0,0` showed n=4 / n=5 for one record."""
    from qbench.report import comparison_table

    fp = {**_record("f"), "scheme": "fp32", "calibration_seed": None}
    table = comparison_table([fp, _record("k"), _record("k"), _record("k")])
    assert table.set_index("scheme").loc["w8a8-pt", "n"] == 1
    table = comparison_table([fp, _record("k"), _record("k2", seed=1), _record("k2", seed=1)])
    assert table.set_index("scheme").loc["w8a8-pt", "n"] == 2


def test_a_seed_given_twice_is_one_planned_cell(micro_checkpoint):
    from qbench.plan import plan_cells

    planned = plan_cells([str(micro_checkpoint)], ["w8a8-pt"], ["ppl"], limit=2000, calibration_seeds=[0, 0, 1])
    assert [p.cell.scheme.options.get("calibration_seed") for p in planned] == [0, 1]


def test_pipes_and_line_breaks_in_names_stay_inside_their_cell():
    """A model named `a|b` added a column to REPORT.md's rows; `a\\nb` ended a row early."""
    from qbench.report import compact_markdown, markdown_table

    frame = pd.DataFrame({"model": ["a|b", "c\nd", "plain"], "ppl": [1.5, None, 2.0]})
    for text in (markdown_table(frame), compact_markdown(frame)):
        lines = text.splitlines()
        assert len(lines) == 2 + 3, text
        cells = [len(re.findall(r"(?<!\\)\|", line)) for line in lines]
        assert len(set(cells)) == 1, text  # every row has the header's number of cell borders
        assert "a\\|b" in text and "c d" in text
    plain = pd.DataFrame({"model": ["x"], "ppl": [1.25]})
    assert markdown_table(plain) == plain.astype(object).to_markdown(index=False, floatfmt=".4g", missingval="-")
