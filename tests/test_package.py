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


def imports_of(path: Path) -> set[str]:
    """The llama_jax modules a file imports, anywhere in it (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llama_jax"):
            if node.module == "llama_jax":
                out |= {f"llama_jax.{a.name}" for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("llama_jax.")}
    return out


def test_no_import_cycles_between_the_package_s_modules():
    modules = {f"llama_jax.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph = {m: {i for i in imports_of(p) if i in modules and i != m} for m, p in modules.items()}
    # llama_jax.scripts only dispatches to the entry points by name (importlib), never imported by them.
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
    modules = sorted(p.stem for p in PACKAGE.glob("*.py"))
    code = ("import importlib, pathlib, llama_jax, llama_jax.examples.dialogues\n"
            f"assert pathlib.Path(llama_jax.__file__).parent == pathlib.Path({str(target / 'llama_jax')!r})\n"
            f"for m in {modules!r}: importlib.import_module('llama_jax.' + m if m != '__init__' else 'llama_jax')\n"
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
    # The main job's shape from outside the repository: a preset by name, a corpus, a run, then text from it.
    from tests.test_bad_inputs import TINY, write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    out = script("llama-jax-train", "--config", "tiny", *TINY, f"--data.path={corpus}", "--train.steps=2")
    assert out.returncode == 0 and "checkpoint: runs/tiny/checkpoints/2" in out.stdout, out.stderr[-2000:]
    out = script("llama-jax-generate", "--checkpoint", "runs/tiny", "--prompt", "the king", "--max-new-tokens", "5",
                 "--temperature", "0")
    assert out.returncode == 0 and out.stdout.startswith("the king"), out.stderr[-2000:]
