"""The package as users get it: a wheel built from the repository installs every module, data file and console
script, and works from outside the source tree; and no two modules of the package import each other (directly or
around a cycle)."""

import ast
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llama_jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _in_main_guard(node, parents) -> bool:
    """Inside `if __name__ == "__main__":` (a hand-over to llama_jax.cli)."""
    for p in parents.get(node, []):
        if isinstance(p, ast.If) and "__main__" in ast.unparse(p.test):
            return True
    return False


def imports_of(path: Path, hand_overs: bool = True) -> set[str]:
    """The llama_jax modules a file imports, anywhere in it (function-level imports included); without
    `hand_overs`, leaving out the ones inside an `if __name__ == "__main__":` block."""
    tree = ast.parse(path.read_text())
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = [node, *parents.get(node, [])]
    out = set()
    for node in ast.walk(tree):
        if not hand_overs and _in_main_guard(node, parents):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llama_jax"):
            for a in node.names:  # `from llama_jax.x import y` imports the module llama_jax.x.y when there is one
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("llama_jax")}
    return out


# The layers, lowest first: each imports only its own and the layers before it. The numeric core (the top level of
# the package) needs nothing of the jobs; text and data come next; serving never imports training, nor training
# serving; only the command lines (cli/) see everything.
CORE = {"errors", "files", "config", "matmul", "host_memory", "model", "sampling", "sharding", "decode", "score",
        "optim", "lora"}
ALLOWED = {"core": {"core"}, "text": {"core", "text"}, "data": {"core", "text", "data"},
           "checkpoints": {"core", "text", "data", "checkpoints"},
           "eval": {"core", "text", "data", "checkpoints", "eval"},
           "train": {"core", "text", "data", "checkpoints", "eval", "train"},
           "serve": {"core", "text", "serve"},
           "examples": {"core", "examples"}, "hand-over": set(),
           "cli": {"core", "text", "data", "checkpoints", "eval", "train", "serve", "examples", "cli"}}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) == 1:
        return None  # llama_jax itself: the public API, lazily importing from every layer by name
    if len(parts) == 2 and parts[1] in CORE:
        return "core"
    if len(parts) == 2 and parts[1] in ("hf", "tokenizer"):
        return "hand-over"  # the old `python -m` names: a __main__ guard and nothing else
    return parts[1]


def test_every_layer_imports_only_the_layers_below_it():
    for m, p in MODULES.items():
        layer = layer_of(m)
        if layer is None:
            continue
        assert layer in ALLOWED, f"{m}: not in a known layer; add it to this test's ALLOWED"
        for dep in imports_of(p, hand_overs=False):
            assert layer_of(dep) in ALLOWED[layer] or dep == "llama_jax.errors", \
                f"{m} ({layer}) imports {dep} ({layer_of(dep)})"
    # The model is the numeric heart: it depends on the config and the matmul helper only.
    assert imports_of(MODULES["llama_jax.model"]) <= {"llama_jax.config", "llama_jax.matmul"}


def test_only_the_command_lines_parse_flags_and_only_hand_overs_reach_them():
    for m, p in MODULES.items():
        if m.startswith("llama_jax.cli"):
            continue
        tree = ast.parse(p.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "argparse" not in names, f"{m} imports argparse; flags belong in llama_jax/cli/"
        reaching = {d for d in imports_of(p, hand_overs=False) if d.startswith("llama_jax.cli")}
        assert not reaching, f"{m} imports {reaching} outside an `if __name__ == \"__main__\":` hand-over"
    # The hand-overs are the old `python -m` names: each is a guard that runs the command, nothing else.
    for m in ("llama_jax.hf", "llama_jax.tokenizer"):
        body = [n for n in ast.parse(MODULES[m].read_text()).body if not isinstance(n, ast.Expr)]
        assert len(body) == 1 and isinstance(body[0], ast.If), m


def test_the_layer_test_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from llama_jax.train import loop\n")
    assert "llama_jax.train.loop" in imports_of(bad)
    assert layer_of("llama_jax.train.loop") not in ALLOWED["serve"]
    guarded = tmp_path / "guarded.py"
    guarded.write_text("if __name__ == '__main__':\n    from llama_jax.cli import run\n")
    assert imports_of(guarded, hand_overs=False) == set() and imports_of(guarded) == {"llama_jax.cli"}


def test_no_import_cycles_between_the_package_s_modules():
    graph = {m: {i for i in imports_of(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    # A package's __init__ is imported by each of its modules' imports; none of ours imports its own modules.
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(graph[m]):
            assert state.get(n) != "open", "import cycle: " + " -> ".join(path[path.index(n):] + [n])
            if n not in state:
                visit(n)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_a_wheel_installs_every_module_data_file_and_console_script(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("llama_jax-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    # The installed package first, the dependencies from this environment (its .pth files, which would put the
    # source tree back on the path, are not read from PYTHONPATH), run from a directory outside the repository.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])}
    modules = sorted(MODULES)
    code = ("import importlib, pathlib, llama_jax, llama_jax.examples.dialogues\n"
            f"assert pathlib.Path(llama_jax.__file__).parent == pathlib.Path({str(target / 'llama_jax')!r})\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "assert (pathlib.Path(llama_jax.__file__).parent / 'examples' / 'shakespeare_choice.jsonl').is_file()\n"
            "print(llama_jax.__version__)")
    out = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c", code], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    scripts = (target / "bin").iterdir() if (target / "bin").is_dir() else []
    names = {p.name for p in scripts}
    assert {"llama-jax-train", "llama-jax-generate", "llama-jax-serve", "llama-jax-eval"} <= names, names
    assert names >= {"llama-jax-hf", "llama-jax-tokenizer"}, names
    assert (target / "llama_jax" / "configs" / "tiny.yaml").is_file()

    def script(name, *args):
        return subprocess.run([str(tmp_path / "venv" / "bin" / "python"), str(target / "bin" / name), *args], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)

    for name, word in [("llama-jax-train", "--run-dir"), ("llama-jax-generate", "--checkpoint"),
                       ("llama-jax-serve", "--max-batch"), ("llama-jax-eval", "perplexity"), ("llama-jax-hf", "export"),
                       ("llama-jax-tokenizer", "train")]:
        out = script(name, "--help")
        assert out.returncode == 0 and word in out.stdout, (name, out.stderr[-2000:])
        assert out.stdout.startswith(f"usage: {name} "), out.stdout[:80]  # its own name, not train.py's
    # The license the metadata declares travels with the wheel.
    assert [p.name for p in target.glob("llama_jax-*.dist-info/**/LICENSE")] == ["LICENSE"]
    # The main job's shape from outside the repository: a preset by name, a corpus, a run, then text from it.
    from tests.test_bad_inputs import TINY, write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    out = script("llama-jax-train", "--config", "tiny", *TINY, f"--data.path={corpus}", "--train.steps=2")
    assert out.returncode == 0 and "checkpoint: runs/tiny/checkpoints/2" in out.stdout, out.stderr[-2000:]
    out = script("llama-jax-generate", "--checkpoint", "runs/tiny", "--prompt", "the king", "--max-new-tokens", "5",
                 "--temperature", "0")
    assert out.returncode == 0 and out.stdout.startswith("the king"), out.stderr[-2000:]
