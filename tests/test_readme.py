"""The README names only schemes, subcommands, protocols and `qbench list` topics that exist."""
import re

import pytest

from qbench.cli import build_parser
from qbench.eval.protocols import PROTOCOLS
from qbench.paths import REPO_ROOT
from qbench.quant import SCHEMES

SCHEME_LIKE = re.compile(r"(fp32|bf16|nf4|fp4|llm-int8[\w-]*|quanto-[\w-]+|w\d+a\d+[\w-]*|w\d+-[\w-]+|kv\d[\w-]*)")


def code_spans(text: str) -> list[str]:
    """Inline code spans and the lines of fenced blocks."""
    fenced = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
    rest = re.sub(r"```[^\n]*\n.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`\n]+)`", rest) + [line for block in fenced for line in block.splitlines()]


def scheme_names(span: str) -> list[str]:
    """`w4-rtn-g32/g64/g128` -> w4-rtn-g32, w4-rtn-g64, w4-rtn-g128 (alternatives of the last
    part); `kv4/kv2-kivi-g32-r128` -> kv4-kivi-g32-r128, kv2-kivi-g32-r128 (alternatives of the
    first part); `kv8/kv4/kv2`: three names; other spans: the scheme-like name itself."""
    parts = span.split("/")
    if not all(SCHEME_LIKE.fullmatch(p) or re.fullmatch(r"[\w]+", p) for p in parts) or not SCHEME_LIKE.fullmatch(parts[0]):
        return []
    first, last = parts[0], parts[-1]
    if "-" in first:
        return [first] + [first.rsplit("-", 1)[0] + "-" + p for p in parts[1:]]
    if "-" in last:
        rest = last.split("-", 1)[1]
        return [f"{p}-{rest}" for p in parts[:-1]] + [last]
    return parts


def documented_schemes(text: str) -> set[str]:
    """Every scheme name the text's code spans give, with `(+ `-suffix`, ...)` after a span
    adding the span's names with each suffix."""
    names = {name for span in code_spans(text) for name in scheme_names(span.strip())}
    for span, suffixes in re.findall(r"`([^`\n]+)` \(\+ ((?:`-[\w-]+`(?:, )?)+)\)", text):
        names |= {name + suffix for name in scheme_names(span) for suffix in re.findall(r"`(-[\w-]+)`", suffixes)}
    return names


def test_scheme_names_expand_and_a_missing_one_is_caught():
    assert scheme_names("w4-rtn-g32/g64/g128") == ["w4-rtn-g32", "w4-rtn-g64", "w4-rtn-g128"]
    assert scheme_names("kv8/kv4/kv2") == ["kv8", "kv4", "kv2"]
    assert scheme_names("kv4/kv2-kivi-g32-r128") == ["kv4-kivi-g32-r128", "kv2-kivi-g32-r128"]
    old = "| `kv2-kivi-g32-r32` and `kv4/kv2-kivi-g32-r128` (+ `-sink1`) | reference |"
    assert documented_schemes(old) - set(SCHEMES) == {"kv4-kivi-g32-r128-sink1"}  # the older README's slip
    assert scheme_names("tiny-vga") == [] and scheme_names("nonoverlap-w256-bos") == []


@pytest.mark.parametrize("path", ["README.md", "docs/RESEARCH.md"])
def test_every_scheme_the_docs_name_exists(path):
    named = documented_schemes((REPO_ROOT / path).read_text())
    assert len(named) > 10
    assert sorted(named - set(SCHEMES)) == [], "named in the docs but not in `qbench list schemes`"


def test_every_qbench_subcommand_list_topic_and_protocol_the_readme_names_exists():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    list_topics = next(a for a in commands["list"]._actions if a.dest == "what").choices
    text = (REPO_ROOT / "README.md").read_text()
    spans = code_spans(text)
    # a command: a span or code line that starts with it (or with .venv/bin/qbench)
    used = {m.group(1) for s in spans for m in re.finditer(r"(?:^\s*|bin/)qbench ([a-z][\w-]*)", s)}
    assert {"bench", "report", "compare", "sweep", "list"} <= used
    assert sorted(used - set(commands)) == []
    topics = {t for s in spans for m in re.finditer(r"qbench list ([\w|\\]+)", s) for t in re.split(r"\\?\|", m.group(1))}
    assert topics and sorted(topics - set(list_topics)) == []
    protocols = {m.group(1) for s in spans for m in re.finditer(r"--protocol ([\w-]+)", s)}
    assert protocols and all(re.sub(r"-\d+$", "", p) in {re.sub(r"-\d+$", "", q) for q in PROTOCOLS} for p in protocols)


def test_the_family_table_marker_is_in_bring_your_own_model():
    text = (REPO_ROOT / "README.md").read_text()
    byom = text.index("## Bring your own model")
    assert byom < text.index("## Bench your model") and byom < text.index("<!-- family-table -->")
