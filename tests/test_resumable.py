"""The resumable-run skeleton train and retrofit share (qbench.resumable): one schedule, one
`--set` reader, one hardened recipe YAML reader, the recipe diff a refused resume names,
and CSV logs cut back to a resumed step."""
import csv
import math

import pytest

from qbench.resumable import (append_row, changed_keys, parse_set_pairs, read_recipe_yaml, schedule_factor,
                              truncate_log)


def test_the_schedule_warms_up_linearly_then_decays_to_a_tenth_or_holds():
    assert [schedule_factor(s, 4, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule_factor(4, 4, 100) == 1.0  # the peak where the warm-up ends
    assert schedule_factor(52, 4, 100) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert schedule_factor(100, 4, 100) == pytest.approx(0.1) and schedule_factor(500, 4, 100) == pytest.approx(0.1)
    assert schedule_factor(50, 4, 100, "constant") == 1.0


def test_train_and_retrofit_take_their_learning_rate_from_the_one_schedule():
    """The same numbers, to the bit, as each run's own formula before they shared it (train's
    warm-up keeps its (lr * (step + 1)) / warmup rounding, with which its checkpoints trained)."""
    from qbench.retrofit import RECIPES
    from qbench.retrofit.state import group_peak_lr, lr_factor
    from qbench.train import PRESETS
    from qbench.train.recipes import learning_rate

    for preset in PRESETS.values():
        for step in range(0, preset.steps + 1, max(1, preset.steps // 97)):
            if step < preset.warmup:
                old = preset.lr * (step + 1) / preset.warmup
            elif preset.schedule == "constant":
                old = preset.lr
            else:
                progress = (step - preset.warmup) / max(1, preset.steps - preset.warmup)
                old = preset.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
            assert learning_rate(step, preset) == old, (preset.name, step)
    for recipe in RECIPES.values():
        for step in range(recipe.steps):
            if step < recipe.warmup:
                old = (step + 1) / recipe.warmup
            else:
                progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
                old = 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
            assert lr_factor(step, recipe) == old, (recipe.name, step)
            assert group_peak_lr("gates", recipe) * lr_factor(step, recipe) == recipe.lr * old


def test_set_pairs_are_read_one_way():
    assert parse_set_pairs([" lr =3e-4", "corpus=a=b"]) == {"lr": "3e-4", "corpus": "a=b"}
    for bad in ("lr", "=3", " =3"):
        with pytest.raises(ValueError, match="use key=value"):
            parse_set_pairs([bad])


def test_recipe_yaml_is_read_as_suites_are(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("base: tiny\nsteps: 5\n")
    assert read_recipe_yaml(path) == {"base": "tiny", "steps": 5}
    path.write_text("a: &x [1, 2]\nb: *x\n")
    with pytest.raises(ValueError, match="alias"):
        read_recipe_yaml(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        read_recipe_yaml(path)
    with pytest.raises(ValueError, match="recipe file"):
        read_recipe_yaml(tmp_path / "missing.yaml")


def test_the_train_and_retrofit_recipe_readers_refuse_aliases(tmp_path):
    from qbench.retrofit import get_recipe
    from qbench.train import get_preset

    path = tmp_path / "r.yaml"
    path.write_text("steps: &n 5\nsave_every: *n\n")
    for read in (get_preset, get_recipe):
        with pytest.raises(ValueError, match="alias"):
            read(str(path))


def test_changed_keys_name_what_a_resume_would_change():
    assert changed_keys({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b", "c"]
    assert changed_keys({"a": 1, "b": 2}, {"a": 5, "b": 3}, ("b",)) == ["b"]


def test_a_log_is_cut_back_to_the_resumed_step_and_removed_when_the_run_starts_over(tmp_path):
    path = tmp_path / "log.csv"
    for step in range(5):
        append_row(path, {"step": step, "loss": 1.0 / (step + 1)})
    whole = path.read_bytes()
    truncate_log(path, 2)
    assert [r[0] for r in csv.reader(open(path, newline=""))] == ["step", "0", "1", "2"]
    for step in (3, 4):  # written again after the resume: the same bytes as the uninterrupted log
        append_row(path, {"step": step, "loss": 1.0 / (step + 1)})
    assert path.read_bytes() == whole
    truncate_log(path, -1)
    assert not path.exists()
    truncate_log(path, 3)  # no log yet: nothing to do
    assert not path.exists()
