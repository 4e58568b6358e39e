"""Import structure: the floors of LAYERS, each importing only its own floor and those
below (0 arrows back up), and no two qbench modules importing each other, directly or in a
circle (function-level imports included: a circle hidden inside a function is still a
circle)."""
import ast


from qbench.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "qbench"


def module_name(path):
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports():
    graph = {}
    modules = {module_name(path) for path in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from qbench.study import verdict` imports the submodule, not the package's __init__
                names = {f"{node.module}.{alias.name}" for alias in node.names}
                found.update(names & modules)
                if names - modules:
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m == "qbench" or m.startswith("qbench.")}
    return graph


# The floors, bottom first; a module imports only modules of its own floor or lower ones.
# A module is placed by its longest listed prefix.
LAYERS = [
    ("util", ["qbench.paths", "qbench.atomic", "qbench.safefile", "qbench.suggest", "qbench.validate",
              "qbench.device", "qbench.online", "qbench.archive", "qbench.facts", "qbench.results", "qbench.errors",
              "qbench.scheme_catalog", "qbench.record"]),
    ("data", ["qbench.data"]),
    ("modeling", ["qbench.modeling"]),
    ("probes", ["qbench.probes"]),
    ("quant", ["qbench.quant"]),
    ("eval", ["qbench.eval"]),
    # the retrofit folder format: the zoo loads it (so it imports no zoo), training writes it
    ("checkpoint formats", ["qbench.retrofit.deltas", "qbench.retrofit.clamp"]),
    ("zoo", ["qbench.zoo"]),
    ("training", ["qbench.resumable", "qbench.train", "qbench.retrofit"]),
    ("plan", ["qbench.plan"]),
    ("runner", ["qbench.runner", "qbench.recheck", "qbench.sensitivity", "qbench.sweep"]),
    ("report/study", ["qbench.report", "qbench.study", "qbench.listing", "qbench.migration", "qbench.zoo_refresh"]),
    ("cli", ["qbench.cli", "qbench.cli_parser"]),
    ("integrations", ["qbench.integrations"]),
]


def floor(module):
    """The index in LAYERS of the floor holding `module` (None for the package `qbench`)."""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


def arrows_back_up(graph):
    """(importer, imported) pairs where the imported module sits on a higher floor."""
    up = []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            if name != "qbench" and target != "qbench" and floor(target) > floor(name):
                up.append((name, target))
    return up


def test_every_module_has_a_floor():
    assert [name for name in imports() if name != "qbench" and floor(name) is None] == []


def test_no_arrow_runs_back_up():
    assert arrows_back_up(imports()) == []


def test_a_planted_arrow_back_up_is_found():
    """The check itself can fail: the planner importing the CLI, eval importing the planner."""
    graph = {name: set(targets) for name, targets in imports().items()}
    graph["qbench.plan"].add("qbench.cli")
    graph["qbench.eval.perplexity"].add("qbench.plan")
    assert arrows_back_up(graph) == [("qbench.eval.perplexity", "qbench.plan"), ("qbench.plan", "qbench.cli")]


def test_layering():
    graph = imports()
    for name, targets in graph.items():
        if name.startswith("qbench.modeling"):
            assert not {t for t in targets if t.startswith(("qbench.quant", "qbench.probes"))}, name
        if name.startswith("qbench.probes"):
            assert not {t for t in targets if t.startswith("qbench.quant")}, name
        if name.startswith("qbench.data"):  # the bottom floor: corpora and tokens know no model
            assert not {t for t in targets if t.startswith(("qbench.modeling", "qbench.quant", "qbench.probes",
                                                            "qbench.eval", "qbench.plan", "qbench.runner"))}, name


def import_circle(graph):
    """The first import circle found ("import circle: a -> b -> a"), or None."""
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

    try:
        for node in sorted(edges):
            if node not in state:
                visit(node)
    except AssertionError as circle:
        return str(circle)
    return None


def test_no_import_circles():
    assert import_circle(imports()) is None


def test_a_planted_import_circle_is_found():
    graph = {name: set(targets) for name, targets in imports().items()}
    graph["qbench.retrofit.deltas"].add("qbench.zoo")  # the zoo imports deltas
    assert "qbench.zoo" in (import_circle(graph) or "") and "qbench.retrofit.deltas" in import_circle(graph)


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
    users = {name for name, targets in graph.items() if "qbench.runner" in targets}
    assert users <= {"qbench.cli", "qbench.sweep", "qbench.recheck", "qbench.sensitivity", "qbench.study.plan"}, users
    assert "qbench.runner" not in graph["qbench.plan"]


def test_import_qbench_is_light():
    """qbench/__init__.py imports no qbench module and nothing heavy: the CLI's Ctrl-C
    handling must be in place before torch loads (tests/test_interrupt.py runs it)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert names <= {"os", "logging"}, names
