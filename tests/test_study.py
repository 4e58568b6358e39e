"""The study pipeline end to end in its QUICK variant (what `make study QUICK=1` runs)."""
import pandas as pd

from qbench.results import ResultStore
from qbench.study import mechanism_logs, mechanism_table, run_study, write_study


def test_quick_study_runs_and_writes_tables_traceable_to_records(tmp_path):
    from qbench.paths import models_dir

    store = ResultStore(tmp_path / "results")
    records = run_study(store, quick=True, progress=False)
    assert records and all(r["status"] == "ok" for r in records)
    path = write_study(store, tmp_path / "out", models_dir(), quick=True)
    text = path.read_text()
    assert "## 1. Mechanism" in text and "## 2. The tiny zoo" in text
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
