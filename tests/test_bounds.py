"""A bound on every size a user can ask for (cells per plan, threads,
recipe dimensions and batch against memory), and the suite inputs that were tracebacks."""
import pytest
import torch
from test_retrofit import base_folder  # noqa: F401  (a fixture)

from qbench import validate
from qbench.cli import EXIT_USAGE, main


def _suite(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def test_a_suite_over_the_cell_limit_is_refused_with_its_count_before_planning(tmp_path, monkeypatch, capsys):
    """A 1 MB suite could ask for 10^7 cells; planning 10^6 took 147 s and 2.5 GB."""
    monkeypatch.setattr(validate, "MAX_CELLS", 10)
    suite = _suite(tmp_path, "models: [m1, m2, m3]\nschemes: [fp32, w8a8-dyn]\ncalibration_seeds: [0, 1]\n")
    assert main(["sweep", str(suite), "--results", str(tmp_path / "r")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "asks for 12 cells, over the limit of 10" in err, err


def test_a_plan_over_the_cell_limit_is_refused_before_any_model_is_resolved(monkeypatch):
    from qbench.plan import plan_cells

    monkeypatch.setattr(validate, "MAX_CELLS", 2)
    with pytest.raises(validate.UsageError, match="asks for 3 cells"):  # not "unknown model": nothing resolved
        plan_cells(["no-such-model"], ["fp32", "w8a8-dyn", "w8a8-pt"], ["ppl"])


@pytest.mark.parametrize("text,needle", [
    ("resources: [1, 2]\n", "`resources` must be a mapping"),
    ("resources: {num_cpus: 1000000}\n", "num_cpus must be a number in (0, 1024]"),
    ("resources: {num_cpus: 0}\n", "num_cpus must be a number"),
    ("resources: {num_gpus: x}\n", "num_gpus must be a number"),
    ("corpus: [a, b]\n", "`corpus` must be one corpus name or path, got a list"),
    ("corpus: 12\n", "`corpus` must be one corpus name or path, got a int"),
])
def test_malformed_suite_values_are_one_line_exit_2(tmp_path, capsys, text, needle):
    suite = _suite(tmp_path, "models: [m]\nschemes: [fp32]\n" + text)
    assert main(["sweep", str(suite), "--results", str(tmp_path / "r")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_worker_threads_never_pass_the_cpu_count(monkeypatch):
    """resources num_cpus reached torch.set_num_threads(10^6) (the machine's load hit 868)."""
    import qbench.sweep as sweep

    seen = []
    monkeypatch.setattr(sweep, "_run_planned_cell", lambda planned, results: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    sweep.run_planned_cell(None, "r", threads=10 ** 6)
    assert seen[0] <= (__import__("os").cpu_count() or 1) and torch.get_num_threads() == before


@pytest.mark.parametrize("value,needle", [(100000, "at most 1024"), (0, "positive integer"), (-3, "positive")])
def test_train_threads_are_bounded(value, needle):
    with pytest.raises(validate.UsageError, match=needle):
        validate.thread_count(value)


@pytest.mark.parametrize("setting", ["d_model=1000000", "n_layer=100000", "batch_size=100000000"])
def test_train_dimensions_are_checked_against_memory_before_allocating(tmp_path, small_corpus, capsys, setting):
    code = main(["train", "--attention", "vga", "--preset", "tiny", "--set", setting, "--set", "n_head=4",
                 "--corpus", str(small_corpus), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE and len(err.splitlines()) == 1 and "GiB of memory" in err, err


def test_the_training_memory_bound_is_a_lower_bound_of_a_real_run(micro_preset):
    """The micro recipe fits in 1 MiB by the bound (its weights are ~0.1 M parameters), and
    is refused when the machine is said to have 1 KiB."""
    from qbench.train.loop import check_training_memory

    check_training_memory(micro_preset, 320, "cpu", available=64 << 20)
    with pytest.raises(validate.UsageError, match="needs at least"):
        check_training_memory(micro_preset, 320, "cpu", available=1 << 10)


def test_retrofit_batch_is_checked_against_memory(base_folder, small_corpus, tmp_path, capsys):  # noqa: F811
    code = main(["retrofit", "--model", str(base_folder), "--arm", "vga", "--out", str(tmp_path / "o"), "--quiet",
                 "--set", f"corpus={small_corpus}", "--set", "batch_size=1e8", "--set", "context=32"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qbench")]
    assert code == EXIT_USAGE and len(err) == 1 and "batch_size 100000000" in err[0] and "GiB" in err[0], err
