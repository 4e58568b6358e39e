"""pyproject's requires-python admits only Pythons the pinned dependencies install on: it
said >=3.10 while the pinned transformers 5.24.0 needs >=3.11 (pip on 3.10.13: "No matching
distribution found for transformers==5.24.0"), so a 3.10 set-up failed half-way."""
import importlib.metadata as metadata
import tomllib

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from qbench.paths import REPO_ROOT


def _lowest_admitted(spec: SpecifierSet) -> str:
    """The lowest x.y.0 release the specifier admits (3.6 to 3.20 covers any pyproject here)."""
    return next(v for v in (f"3.{minor}.0" for minor in range(6, 21)) if spec.contains(v))


def test_every_dependency_installs_on_the_lowest_admitted_python():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    lowest = _lowest_admitted(SpecifierSet(project["requires-python"]))
    requirements = [Requirement(r) for r in project["dependencies"]
                    + [r for extra in project["optional-dependencies"].values() for r in extra]]
    # a pin is that release or nothing; a range may fall back to an older release on an older
    # Python, so the installed release's own floor says nothing about it
    pinned = sorted({r.name for r in requirements if [s.operator for s in r.specifier] == ["=="]})
    refused, checked = [], 0
    for name in pinned:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:  # an extra not installed here: nothing to read
            continue
        checked += 1
        needs = dist.metadata.get("Requires-Python")
        if needs and not SpecifierSet(needs).contains(lowest):
            refused.append(f"{name} {dist.version} needs Python {needs}")
    assert checked >= 10  # the set-up installs the pinned base dependencies
    assert not refused, f"requires-python {project['requires-python']} admits {lowest}, but " + "; ".join(refused)
