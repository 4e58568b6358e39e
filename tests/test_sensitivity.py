"""`qbench sensitivity`: the perturbation a cell is recomputed under, and the move it stores."""
import math

import pytest

from qbench.recheck import relative_sensitivity
from qbench.sensitivity import perturbed_environment


def test_relative_sensitivity_is_the_largest_relative_move():
    record = {"metrics": {"ppl": 100.0, "word_ppl": 400.0, "byte_ppl": 3.0},
              "sensitivity": {"metrics": {"ppl": 100.5, "word_ppl": 404.0, "byte_ppl": 3.0}}}
    assert math.isclose(relative_sensitivity(record), 0.01)  # word_ppl moved 1%, ppl 0.5%
    assert relative_sensitivity({"metrics": {"ppl": 1.0}}) is None


def test_perturbations_name_what_they_change():
    env, what = perturbed_environment("threads", {"provenance": {"machine": {"torch_threads": 2}}})
    assert env == {"OMP_NUM_THREADS": "4"} and what == "threads 2 -> 4"
    with pytest.raises(ValueError, match="unknown perturbation 'fast'"):
        perturbed_environment("fast")


def test_the_facts_read_a_cells_sensitivity_in_percentage_points():
    from qbench.study.facts import _sum_or_nan, sensitivity_of

    record = {"metrics": {"ppl": 110.0}, "sensitivity": {"metrics": {"ppl": 110.22}}}
    assert math.isclose(sensitivity_of(record, "ppl"), 0.22)
    assert math.isclose(_sum_or_nan(0.22, 0.0, 110.0), 0.2)  # 100 x 0.22 / 110 points of rel
    assert math.isnan(_sum_or_nan(None, 0.1, 110.0))

