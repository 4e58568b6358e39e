"""Import structure: modeling imports neither quant nor probes, probes do not import quant,
and no two qbench modules import each other, directly or in a circle (function-level
imports included: a circle hidden inside a function is still a circle)."""
import ast

from qbench.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "qbench"


def module_name(path):
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m == "qbench" or m.startswith("qbench.")}
    return graph


def test_layering():
    graph = imports()
    for name, targets in graph.items():
        if name.startswith("qbench.modeling"):
            assert not {t for t in targets if t.startswith(("qbench.quant", "qbench.probes"))}, name
        if name.startswith("qbench.probes"):
            assert not {t for t in targets if t.startswith("qbench.quant")}, name
        if name.startswith("qbench.data"):  # the bottom floor: corpora and tokens know no model
            assert not {t for t in targets if t.startswith(("qbench.modeling", "qbench.quant", "qbench.probes",
                                                            "qbench.eval", "qbench.plan", "qbench.bench"))}, name


def test_no_import_circles():
    graph = imports()

    def owner(target):  # `from qbench.quant import x` targets the package module
        while target not in graph and "." in target:
            target = target.rsplit(".", 1)[0]
        return target

    edges = {n: {owner(t) for t in ts if owner(t) != n and owner(t) != "qbench"} for n, ts in graph.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in edges.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_low_precision_kernel_names_no_arm():
    """It reads an arm's normaliser and gate position; a new arm needs no change there."""
    from qbench.modeling.attention import ATTENTION_ARMS, NORMALISERS

    text = (PACKAGE / "quant" / "lowbit_attention.py").read_text().lower()
    for name in set(ATTENTION_ARMS) | set(NORMALISERS):
        assert name.replace("_", " ") not in text and name not in text, name


def test_the_report_reads_records_not_the_registries():
    """The report places a record by what the record says (qbench.report.facts): no
    qbench.report module imports qbench.quant or qbench.modeling, function-level included."""
    banned = ("qbench.quant", "qbench.modeling")
    paths = sorted((PACKAGE / "report").rglob("*.py"))
    assert paths
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not [n for n in names if n.startswith(banned)], (module_name(path), names)


def test_the_runner_is_not_a_library():
    """Protocols and the task catalogue belong to eval, planning to qbench.plan: nothing
    but the CLI, the study runner, the sweep and the two recomputing commands (recheck,
    sensitivity) import the bench (eval, the zoo refresh and the planner least of all)."""
    graph = imports()
    users = {name for name, targets in graph.items() if "qbench.bench" in targets}
    assert users <= {"qbench.cli", "qbench.sweep", "qbench.recheck", "qbench.sensitivity", "qbench.study.plan"}, users
    assert "qbench.bench" not in graph["qbench.plan"]


def test_import_qbench_is_light():
    """qbench/__init__.py imports no qbench module and nothing heavy: the CLI's Ctrl-C
    handling must be in place before torch loads (tests/test_interrupt.py runs it)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert names <= {"os", "logging"}, names
