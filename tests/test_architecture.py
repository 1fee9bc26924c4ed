"""The layering the README and ARCHITECTURE.md promise, checked on the source.

Imports go deploy -> serving -> engine, never back; core/ and output/ are torch-free; the model
side never reaches into the executor or the scheduler; kernels/ knows nothing of the engine.
Every package folder is listed in pyproject.toml (a wheel would leave an unlisted one out) and
says in its docstring what it holds.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def _imports(path: Path, relative: bool = True) -> set[str]:
    """Absolute module names imported by a file (relative imports resolved, or left out)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level and not relative:
                continue
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
    return names


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


# folder -> module prefixes (of the project) that files in it may not import
FORBIDDEN = {
    "paged_engine/core": ["torch", "paged_engine.output", "paged_engine.executor",
                          "paged_engine.model_executor", "paged_engine.serving", "paged_engine.deploy",
                          "paged_engine.llm", "paged_engine.llm_engine", "paged_triton"],
    "paged_engine/output": ["torch", "paged_engine.executor", "paged_engine.model_executor",
                            "paged_engine.serving", "paged_engine.deploy", "paged_engine.llm_engine"],
    "paged_engine/executor": ["paged_engine.core.scheduler", "paged_engine.core.block_manager",
                              "paged_engine.core.sequence", "paged_engine.output",
                              "paged_engine.serving", "paged_engine.deploy", "paged_engine.llm_engine"],
    "paged_engine/model_executor": ["paged_engine.core", "paged_engine.executor", "paged_engine.output",
                                    "paged_engine.serving", "paged_engine.deploy", "paged_engine.llm_engine"],
    "paged_engine/distributed": ["paged_engine.core", "paged_engine.executor", "paged_engine.output",
                                 "paged_engine.model_executor", "paged_engine.serving", "paged_engine.deploy"],
    "paged_engine/structured_output": ["paged_engine.core.scheduler", "paged_engine.executor",
                                       "paged_engine.model_executor", "paged_engine.output",
                                       "paged_engine.serving", "paged_engine.deploy",
                                       "paged_engine.llm_engine"],
    "paged_engine/serving": ["paged_engine.deploy"],
    "kernels": ["paged_engine"],
    "client": ["paged_engine"],
}


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_import_layering(folder):
    bad = []
    for path in _files(folder):
        for name in _imports(path):
            for prefix in FORBIDDEN[folder]:
                if name == prefix or name.startswith(prefix + "."):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_nothing_in_the_engine_imports_deploy():
    bad = [f"{p.relative_to(ROOT)} imports {n}" for p in _files("paged_engine")
           if "deploy" not in p.relative_to(ROOT).parts
           for n in _imports(p) if n.startswith("paged_engine.deploy")]
    assert not bad, "\n".join(bad)


def test_kernels_are_imported_only_through_the_namespace():
    """`kernels` is another distribution's top-level name: the project imports paged_triton.kernels."""
    bad = [f"{p.relative_to(ROOT)} imports {n}"
           for folder in ("paged_engine", "kernels", "client", "tests", "benchmarks")
           for p in _files(folder) for n in _imports(p, relative=False)
           if n == "kernels" or n.startswith("kernels.") or n == "client" or n.startswith("client.")]
    assert not bad, "\n".join(bad)


def test_pyproject_lists_every_package_and_each_has_a_docstring():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    found = set()
    for init in (ROOT / "paged_engine").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert mapping == {"paged_triton.kernels": "kernels", "paged_triton.client": "client"}
    init = ROOT / "client" / "__init__.py"
    assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"
    # A regular package named `kernels` at the repository root shadows Hugging Face's `kernels`
    # (which transformers imports) whenever the root is on sys.path: it stays a namespace folder.
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ must stay a namespace package"
    stale = {p for p in listed if p.startswith("paged_engine") and p not in found}
    assert not stale, f"pyproject.toml lists packages that do not exist: {sorted(stale)}"


def test_installed_namespace_resolves_to_the_tree():
    import paged_triton.client
    import paged_triton.kernels.ops

    assert [Path(p).resolve() for p in paged_triton.kernels.__path__][:1] == [ROOT / "kernels"]
    assert Path(paged_triton.kernels.ops.__file__).resolve().parent == ROOT / "kernels"
    assert Path(paged_triton.client.__file__).resolve().parent == ROOT / "client"


def test_transformers_imports_from_the_repository_root():
    """From the root (as `python -m pytest` runs), `import kernels` must not load our folder:
    transformers >= 5.25 imports Hugging Face's `kernels` from its activations module."""
    code = "import kernels, transformers.activations; print(getattr(kernels, '__file__', None) or '-')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    loaded = proc.stdout.strip().splitlines()[-1]
    assert not loaded.startswith(str(ROOT / "kernels")), f"`import kernels` loaded {loaded}"
