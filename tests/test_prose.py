"""Prose that cannot go stale: every number in the discussion and the README's results text
comes from the records through a named value."""
import re

import pytest

from qbench.paths import REPO_ROOT
from qbench.study.facts import Facts, MissingValue
from qbench.study.prose import BEGIN, GENERATED_DOC, TEMPLATES, bare_numbers, render_readme
from record_factory import make_record

TEMPLATE_FILES = [REPO_ROOT / "study" / "DISCUSSION.md", *sorted(TEMPLATES.glob("*.md"))]


def _record(model, scheme, ppl, draw=None, task="ppl", **metrics):
    return make_record(model, scheme, task, {"ppl": ppl, **metrics}, key=f"{model}-{scheme}-{draw}-{task}",
                       protocol="nonoverlap-w256-bos-sotu-test-first20000c", calibration_seed=draw, config={},
                       provenance={})


ZOO = {"tiny-softmax": {"preset": "tiny", "arm": "softmax"}, "tiny-softmax-s1": {"preset": "tiny", "arm": "softmax"},
       "tiny-vga": {"preset": "tiny", "arm": "vga"}}


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=lambda p: p.name)
def test_templates_hold_no_hand_typed_number(path):
    assert bare_numbers(path.read_text()) == []


def test_a_hand_typed_number_is_caught():
    assert bare_numbers("softmax loses +0.25% ({rel:tiny:softmax:w8a8-pt}) over 3 draws") == ["+0.25%", "3"]
    # names that contain digits, code spans, named values and stated constants are not numbers
    assert bare_numbers("W8A8 and 8-bit on fp32, `w4-rtn-g64`, section 1b, token 0, sink rate@0.3, "
                        "{count:arms:tiny} arms, {!1,000} steps") == []


def test_a_recomputed_record_changes_the_sentence():
    records = [_record("tiny-softmax", "fp32", 100.0), _record("tiny-softmax", "w8a8-pt", 101.0, 0),
               _record("tiny-softmax-s1", "fp32", 100.0), _record("tiny-softmax-s1", "w8a8-pt", 103.0, 0)]
    template = "softmax loses {rel:tiny:softmax:w8a8-pt} under w8a8-pt"
    assert Facts(records, zoo=ZOO).render(template) == "softmax loses +2 ± 1.4% (2 seeds) under w8a8-pt"
    records[-1]["metrics"]["ppl"] = 101.0
    assert Facts(records, zoo=ZOO).render(template) == "softmax loses +1 ± 0% (2 seeds) under w8a8-pt"


def test_a_value_the_records_cannot_give_fails_loudly():
    with pytest.raises(MissingValue, match="rel:tiny:vga:w8a8-pt"):
        Facts([_record("tiny-softmax", "fp32", 100.0)], zoo=ZOO).render("{rel:tiny:vga:w8a8-pt}")
    with pytest.raises(MissingValue, match="unknown value kind"):
        Facts([], zoo=ZOO).render("{typo:tiny}")


def test_committed_readme_text_is_what_the_committed_records_give():
    from qbench.paths import models_dir
    from qbench.results import ResultStore

    readme = GENERATED_DOC.read_text()
    blocks = re.findall(re.escape(BEGIN).replace(re.escape("{name}"), r"([\w-]+)"), readme)
    assert sorted(blocks) == sorted(p.stem for p in TEMPLATES.glob("*.md"))
    facts = Facts(ResultStore(REPO_ROOT / "results").records(), models_dir())
    assert render_readme(readme, facts) == readme, "README results text is stale: run `make study`"
    facts.render((REPO_ROOT / "study" / "DISCUSSION.md").read_text())  # every named value has a source
