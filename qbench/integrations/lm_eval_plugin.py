"""Make lm-eval's own CLI see qbench: `lm_eval --model qbench ... --tasks qbench_cloze`.

lm-eval 0.4.13 has no plugin entry points: models are found in its registry, tasks in
the folders its TaskManager indexes (`--include_path`).  `install()` (run by `make setup`,
or `python -m qbench.integrations.lm_eval_plugin`) writes a startup hook into site-packages: a
`.pth` line importing a small stdlib-only module that waits for lm-eval's own model table
(`lm_eval.models`) to be imported, then adds the model name `qbench` to the registry
lazily (nothing of qbench or torch is imported until that model is asked for), and
appends qbench's task folder to every TaskManager's include_path.

The name is added *after* lm-eval's built-in models, never before: lm-eval fills its
registry with its own models only when the registry is empty at the first lookup
(`get_model`), so a name registered earlier hides `hf`, `vllm` and the rest
("Unknown model 'hf'. Available: qbench"), which the first version of this hook did.
The hook locates qbench by import at run time (`find_spec`), so it survives a re-pointed
editable install.  Python processes that never import lm-eval are untouched.
`uninstall()` removes both files.
"""
from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

HOOK_MODULE = "_qbench_lm_eval_hook"
PTH_FILE = "qbench-lm-eval.pth"

HOOK_SOURCE = '''"""Installed by qbench (qbench/integrations/lm_eval_plugin.py); remove with
`python -m qbench.integrations.lm_eval_plugin --uninstall`."""
import importlib.abc
import importlib.util
import sys

# lm_eval.models registers lm-eval's own models on import; qbench's name goes in after them
_TARGETS = ("lm_eval.models", "lm_eval.tasks.manager")
_VERSION = 3  # 3: the model moved to qbench.integrations.lm_eval


def _tasks_dir():
    spec = importlib.util.find_spec("qbench")
    if spec is None or not spec.submodule_search_locations:
        return None
    from pathlib import Path
    folder = Path(list(spec.submodule_search_locations)[0]) / "eval" / "tasks"
    return str(folder) if folder.is_dir() else None


def _after(name, module):
    if importlib.util.find_spec("qbench") is None:
        return
    if name == "lm_eval.models":
        from lm_eval.api.registry import model_registry

        if "qbench" not in model_registry:
            model_registry.register("qbench", target="qbench.integrations.lm_eval:QBenchLM")
    elif name == "lm_eval.tasks.manager":
        cls = module.TaskManager
        original = cls.__init__

        def __init__(self, *args, include_path=None, **kwargs):
            extra = _tasks_dir()
            if extra is not None:
                paths = [] if include_path is None else (
                    list(include_path) if isinstance(include_path, (list, tuple)) else [include_path])
                from pathlib import Path
                if Path(extra).resolve() not in [Path(p).resolve() for p in paths]:
                    paths.append(extra)
                include_path = paths
            original(self, *args, include_path=include_path, **kwargs)

        cls.__init__ = __init__


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, name):
        self.inner, self.name = inner, name

    def __getattr__(self, attribute):  # anything else a loader offers (resources, is_package)
        return getattr(self.inner, attribute)

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        try:
            _after(self.name, module)
        except Exception as err:  # never break lm-eval itself
            print(f"qbench lm-eval hook: {type(err).__name__}: {err}", file=sys.stderr)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


# one qbench finder per process: a newer hook replaces an older one (an old hook registered
# `qbench` ahead of lm-eval's own models)
_old = [f for f in sys.meta_path if getattr(f, "_qbench", False)]
if not any(getattr(f, "_qbench_version", 1) >= _VERSION for f in _old):
    for _f in _old:
        sys.meta_path.remove(_f)
    _finder = _Finder()
    _finder._qbench, _finder._qbench_version = True, _VERSION
    sys.meta_path.insert(0, _finder)
    for _name in _TARGETS:  # lm-eval imported before this hook: apply to the loaded modules
        if _name in sys.modules:
            _after(_name, sys.modules[_name])
'''


def site_dir() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def install(directory: Path | None = None) -> list[Path]:
    directory = Path(directory or site_dir())
    module = directory / f"{HOOK_MODULE}.py"
    pth = directory / PTH_FILE
    directory.mkdir(parents=True, exist_ok=True)
    module.write_text(HOOK_SOURCE)
    pth.write_text(f"import {HOOK_MODULE}\n")
    return [module, pth]


def uninstall(directory: Path | None = None) -> None:
    directory = Path(directory or site_dir())
    for path in (directory / f"{HOOK_MODULE}.py", directory / PTH_FILE):
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    if "--uninstall" in sys.argv:
        uninstall()
        print("removed qbench's lm-eval hook")
    else:
        for path in install():
            print(f"wrote {path}")
