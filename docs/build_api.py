"""Builds the API reference (HTML, with pdoc) from the package's docstrings: `python docs/build_api.py` writes
docs/api/ (open docs/api/index.html). Needs the docs extra: `pip install -e '.[docs]'`.

The build fails (exit 1, one line per problem) when a module cannot be imported or documented, and when a
docstring names something in backticks that does not exist: `lj.name` / `llama_jax.module.name`, `module.name` for
one of the package's modules, or a config key `section.field` (`train.eval_paths`); the same for such names in the
prose. tests/test_docs.py runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import pkgutil
import re
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A dotted name in backticks, optionally called: `lj.forward`, `eval.eval_sets()`, `train.eval_paths`.
REFERENCE = re.compile(r"`((?:lj|llama_jax|[a-z_][a-z0-9_]*)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?:\([^`]*\))?`")


FILE_SUFFIXES = {"py", "yaml", "yml", "json", "jsonl", "model", "txt", "md", "bin", "png", "lock", "jinja",
                 "safetensors", "html", "gz", "bad"}


def modules() -> list[str]:
    """Every module of the package, its subpackages' included."""
    import llama_jax

    names = ["llama_jax"]
    for info in pkgutil.walk_packages(llama_jax.__path__, "llama_jax."):
        names.append(info.name)
    return sorted(names)


def docstrings(module_names: list[str]):
    """(where, docstring) for every module and every public function, class and method they define."""
    for name in module_names:
        module = importlib.import_module(name)
        yield name, inspect.getdoc(module) or ""
        for attr, obj in vars(module).items():
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                yield f"{name}.{attr}", inspect.getdoc(obj) or ""
            if inspect.isclass(obj):
                for meth, fn in vars(obj).items():
                    if not meth.startswith("_") and inspect.isfunction(fn):
                        yield f"{name}.{attr}.{meth}", inspect.getdoc(fn) or ""


def resolves(ref: str, package_modules: set[str]) -> bool:
    """Whether a dotted reference names something real: an attribute path under llama_jax (`lj.` is its alias) or
    under one of its modules (`engine.start`: a class of that module has it), or a config key."""
    from llama_jax.config import SECTIONS

    head, _, rest = ref.partition(".")
    if ref.rsplit(".", 1)[1] in FILE_SUFFIXES:
        return True  # a file name (tokenizer.model, config.yaml), not a reference
    if head in SECTIONS and rest in {f.name for f in dataclasses.fields(SECTIONS[head])}:
        return True
    by_leaf = _by_leaf(package_modules)
    if head in ("lj", "llama_jax"):
        path = ["llama_jax", *rest.split(".")]
    elif f"llama_jax.{head}" in package_modules:
        path = ["llama_jax", *ref.split(".")]
    elif head in by_leaf:  # a subpackage's module by its own name: `engine.start`, `run_dir.restore`
        path = [*by_leaf[head].split("."), *rest.split(".")]
    else:
        return True  # not ours to check (jax.lax.scan, np.memmap)
    for i in range(len(path), 0, -1):  # the longest importable module prefix, then attributes
        try:
            obj = importlib.import_module(".".join(path[:i]))
        except ImportError:
            continue
        return _has_path(obj, path[i:])
    return False


def _by_leaf(package_modules: set[str]) -> dict[str, str]:
    """The subpackages' modules by their last name, where that name is unique (`engine` -> llama_jax.serve.engine)."""
    leaves: dict[str, list[str]] = {}
    for m in package_modules:
        if m.count(".") == 2:
            leaves.setdefault(m.rsplit(".", 1)[1], []).append(m)
    return {leaf: ms[0] for leaf, ms in leaves.items() if len(ms) == 1 and f"llama_jax.{leaf}" not in package_modules}


def _has_path(obj, attrs: list[str]) -> bool:
    if not attrs:
        return True
    if hasattr(obj, attrs[0]):
        return _has_path(getattr(obj, attrs[0]), attrs[1:])
    if attrs[0] in getattr(obj, "__dataclass_fields__", {}):  # a field without a default is no class attribute
        return len(attrs) == 1
    if inspect.ismodule(obj):  # `engine.start`, `config.max_seq_len`: an attribute of one of its classes
        return any(_has_path(cls, attrs) for cls in vars(obj).values()
                   if inspect.isclass(cls) and cls.__module__ == obj.__name__)
    return False


def broken_references(module_names: list[str]) -> list[str]:
    """Dotted names in the docstrings, in backticks or in the prose (those that start with lj., llama_jax., a
    module's or a config section's name), that do not resolve."""
    from llama_jax.config import SECTIONS

    known = set(module_names)
    heads = {n.split(".")[1] for n in module_names if n.count(".") == 1} | set(SECTIONS) | {"lj", "llama_jax"}
    heads |= set(_by_leaf(known))
    alternatives = "|".join(sorted(heads))
    prose = re.compile(rf"(?<![\w.`/])((?:{alternatives})(?:\.[A-Za-z_]\w*)+)")
    problems = []
    for where, doc in docstrings(module_names):
        for ref in sorted(set(REFERENCE.findall(doc)) | set(prose.findall(doc))):
            if not resolves(ref, known):
                problems.append(f"{where}: the docstring names {ref}, which does not exist")
    return problems


def build(out: Path) -> list[str]:
    """Writes the HTML reference to `out`; returns the problems found (empty: a clean build)."""
    import pdoc
    import pdoc.render

    import llama_jax

    for name in llama_jax.__all__:  # the lazily imported exports, so that pdoc sees them as members
        getattr(llama_jax, name)
    names = modules()
    problems = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.render.configure(docformat="markdown", footer_text=f"llama_jax {llama_jax.__version__}",
                              search=True, show_source=True)
        # llama_jax.X (a subpackage's modules come with it: naming them again would document them twice)
        pdoc.pdoc(*[n for n in names if n.count(".") <= 1], output_directory=out)
    for w in caught:
        if issubclass(w.category, UserWarning) and "pdoc" in w.filename:
            problems.append(f"pdoc: {str(w.message).splitlines()[0]}")
    missing = [n for n in names if not (out / (n.replace(".", "/") + ".html")).is_file()]
    problems += [f"{n}: no page was written" for n in missing]
    return problems + broken_references(names)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python docs/build_api.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "api"), help="output directory (default: docs/api)")
    args = p.parse_args(argv)
    problems = build(Path(args.out))
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if problems:
        return 1
    print(f"API reference: {Path(args.out) / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
