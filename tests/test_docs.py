"""The docs as a user copies them: the API reference builds with every docstring reference resolved; every link
between the pages resolves; every command in README.md and docs/*.md names a script, module, flag, config key,
preset, extra and repository file that exist; and the Python snippets on the pages run against a small trained
run (README.md's and docs/train.md's own snippets run in test_readme.py and test_train.py)."""

import argparse
import contextlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from llama_jax.cli import hf as hf_cli
from tests.test_bad_inputs import TINY, write_corpus

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
JOBS = ["train", "generate", "serve", "evaluate", "finetune", "interop", "multi-device"]


def blocks(page: Path, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", page.read_text(), re.S | re.M)


def test_a_page_per_job_linked_from_the_index_and_the_readme():
    index, readme = (ROOT / "docs" / "README.md").read_text(), (ROOT / "README.md").read_text()
    for job in JOBS:
        assert (ROOT / "docs" / f"{job}.md").is_file()
        assert f"]({job}.md)" in index and f"](docs/{job}.md)" in readme


def test_the_api_reference_builds_and_every_docstring_reference_resolves(tmp_path):
    r = subprocess.run([sys.executable, "docs/build_api.py", "--out", str(tmp_path / "api")], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    for module in ("llama_jax", "llama_jax/model", "llama_jax/train/loop", "llama_jax/serve/engine",
                   "llama_jax/examples/dialogues", "llama_jax/cli/train"):
        assert (tmp_path / "api" / f"{module}.html").is_file()
    assert 'id="forward"' in (tmp_path / "api" / "llama_jax" / "model.html").read_text()
    assert 'id="generate"' in (tmp_path / "api" / "llama_jax.html").read_text()  # the public API's page
    # The check can fail: names that do not exist are found, in backticks and in the prose.
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import build_api
    finally:
        sys.path.remove(str(ROOT / "docs"))
    modules = set(build_api.modules())
    assert not build_api.resolves("lj.forwards", modules) and not build_api.resolves("eval.eval_set", modules)
    assert not build_api.resolves("train.eval_path", modules) and not build_api.resolves("engine.begin", modules)
    assert build_api.resolves("lj.forward", modules) and build_api.resolves("train.eval_paths", modules)
    assert build_api.resolves("engine.start", modules) and build_api.resolves("loop.Start.meta", modules)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_pages_resolves():
    checked = 0
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: the link {target} points to nothing"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", file.read_text(), re.M)
                assert anchor in {slug(h) for h in headings}, f"{page.name}: no heading {anchor} in {file.name}"
            checked += 1
    assert checked >= 30


# ---------------------------------------------------------------------------------------------------------------
# Commands


class Parsed(BaseException):
    """Raised by the patched ArgumentParser.parse_args once a command's flags parsed: nothing else runs."""


def commands() -> list[tuple[str, list[str]]]:
    """(page, argv) for each simple command on the pages: in their bash blocks (continuation lines joined, comments
    dropped, a quoted string may span lines; split at ;, &&, ||, | and &; the loop variable of `for i in 0 1` set
    to 0; leading VAR=value assignments and shell keywords dropped), and in inline code that starts with `python `
    or `llama-jax-` and gives flags (usage lines with [optional] parts aside)."""
    out = []
    for page in PAGES:
        name = str(page.relative_to(ROOT))
        lines = []
        for block in blocks(page, "bash"):
            pending = ""
            for line in block.replace("\\\n", " ").replace("$i", "0").splitlines():
                pending += line
                try:
                    shlex.split(pending, comments=True)
                except ValueError:  # a quote left open: the string goes on on the next line
                    pending += "\n"
                    continue
                lines.append(pending)
                pending = ""
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        lines += [c for c in re.findall(r"`((?:python |llama-jax-)[^`]*)`", text)  # a command, not a mention
                  if " --" in c and "[" not in c and "..." not in c]
        for line in lines:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split, lexer.commenters = True, "#"
            segment: list[str] = []
            for token in [*lexer, ";"]:
                if token in (";", "&&", "||", "|", "&"):
                    while segment and (re.match(r"^[A-Z_]+=", segment[0]) or segment[0] in
                                       ("do", "then", "until", "while", "for", "done", "wait", "time")):
                        segment = segment[1:] if segment[0] != "for" else []
                    if segment:
                        out.append((name, segment))
                    segment = []
                else:
                    segment.append(token)
    return out


def _run_parser(main, argv):
    """Calls a tool's main(argv) with parse_args patched to stop right after parsing; returns None if the flags
    parsed (or --help), else the error."""
    real = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_only
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")), contextlib.redirect_stderr(open(os.devnull, "w")):
            code = main(argv)
        if code == 0 and ("--help" in argv or "-h" in argv):
            return None  # main() caught argparse's SystemExit(0) itself
    except Parsed:
        return None
    except SystemExit as e:
        return None if e.code == 0 else f"exit {e.code}"
    finally:
        argparse.ArgumentParser.parse_args = real
    return "main() returned without parsing its flags"


def _check_train(argv):
    from llama_jax.cli import train as train_cli
    from llama_jax.config import ConfigError, load_run_config

    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            args, overrides = train_cli.parse_args(argv)
    except SystemExit as e:
        return None if e.code == 0 else f"exit {e.code}"
    try:
        load_run_config(args.config, overrides)
    except ConfigError as e:
        return str(e)
    return None


def _check_generate(argv):
    from llama_jax.cli import generate as generate_cli

    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            generate_cli.check_args(generate_cli.parse_args(argv))
    except SystemExit as e:
        return None if e.code == 0 else f"exit {e.code}"
    except generate_cli.UsageError as e:
        return str(e)
    return None


def _module_main(module: str):
    import importlib

    return lambda argv: _run_parser(importlib.import_module(module).main, argv)


def _benchmark(path: str):
    import importlib

    def check(argv):
        saved = sys.argv
        sys.argv = [path, *argv]
        try:
            return _run_parser(lambda _: importlib.import_module(f"benchmarks.{Path(path).stem}").main(), argv)
        finally:
            sys.argv = saved

    return check


def _build_api(argv):
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import build_api
    finally:
        sys.path.remove(str(ROOT / "docs"))
    return _run_parser(build_api.main, argv)


TOOLS = {"train.py": _check_train, "llama-jax-train": _check_train,
         "generate.py": _check_generate, "llama-jax-generate": _check_generate,
         "serve.py": _module_main("llama_jax.cli.serve"), "llama-jax-serve": _module_main("llama_jax.cli.serve"),
         "-m llama_jax.eval": _module_main("llama_jax.cli.eval"), "llama-jax-eval": _module_main("llama_jax.cli.eval"),
         "-m llama_jax.hf": _module_main("llama_jax.cli.hf"), "llama-jax-hf": _module_main("llama_jax.cli.hf"),
         "-m llama_jax.tokenizer": _module_main("llama_jax.cli.tokenizer"),
         "llama-jax-tokenizer": _module_main("llama_jax.cli.tokenizer"),
         "-m llama_jax.examples.dialogues": _module_main("llama_jax.cli.dialogues"),
         "-m llama_jax.examples.smollm2": _module_main("llama_jax.cli.smollm2"),
         "docs/build_api.py": _build_api}
ELSEWHERE = {"pip", "venv", "pytest", "build"}  # python -m X of other tools


def test_every_documented_command_names_flags_keys_and_files_that_exist(tmp_path, monkeypatch):
    # Run from a directory holding the presets and the files the pages' commands write (`echo ... > FILE`).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    for _, argv in commands():
        for i, token in enumerate(argv[:-1]):
            if token == ">":
                (tmp_path / argv[i + 1]).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / argv[i + 1]).write_text("written by an earlier command on the page\n")
    # the keys of pyproject.toml's [project.optional-dependencies] (tomllib is Python 3.11+; we support 3.10)
    table = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]\n", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^([\w-]+) = ", table, re.M))
    assert {"test", "docs", "tensorboard", "cuda"} <= extras, extras
    problems, checked = [], 0
    for page, argv in commands():
        program = Path(argv[0]).name
        for token in argv:  # a repository file the command names exists
            for path in re.findall(r"(?:^|=)((?:configs|llama_jax|docs|benchmarks|tests)/[\w./-]+)", token):
                if not (ROOT / path).exists():
                    problems.append(f"{page}: {' '.join(argv)}: no file {path}")
        if program in ("pip", "pip3") or argv[:3] in (["python", "-m", "pip"], [".venv/bin/python", "-m", "pip"]):
            for extra_list in re.findall(r"\.\[([\w,-]+)\]", " ".join(argv)):
                problems += [f"{page}: no extra [{e}] in pyproject.toml" for e in extra_list.split(",")
                             if e not in extras]
            continue
        if program.startswith("python"):
            if argv[1] == "-c":
                compile(argv[2], f"{page}: python -c", "exec")  # at least valid Python
                continue
            if argv[1] == "-m" and argv[2] in ELSEWHERE:
                continue
            key, rest = (f"-m {argv[2]}", argv[3:]) if argv[1] == "-m" else (argv[1], argv[2:])
            if key.startswith("benchmarks/"):
                check = _benchmark(key)
            elif key in TOOLS:
                check = TOOLS[key]
            else:
                problems.append(f"{page}: {' '.join(argv)}: this test does not know {key}; teach it")
                continue
        elif program in TOOLS:
            check, rest = TOOLS[program], argv[1:]
        else:
            continue  # curl, lm_eval, mkdir, tensorboard, ...: not ours
        error = check(rest)
        checked += 1
        if error:
            problems.append(f"{page}: {' '.join(argv)}: {error}")
    assert not problems, "\n".join(problems)
    assert checked >= 50, checked


# ---------------------------------------------------------------------------------------------------------------
# Python snippets


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory holding runs/tiny (a small trained run) and hf/tiny (its export), where the snippets run."""
    from llama_jax.cli import train as train_cli

    root = tmp_path_factory.mktemp("docs")
    corpus = write_corpus(root / "corpus")
    assert train_cli.main(TINY + [f"--data.path={corpus}", "--run-dir", str(root / "runs" / "tiny"),
                                  "--train.steps=2"]) == 0
    assert hf_cli.main(["export", "--checkpoint", str(root / "runs" / "tiny"), "--out", str(root / "hf" / "tiny")]) == 0
    return root


SNIPPETS = [(page.name, i, code) for page in PAGES if page.name not in ("README.md", "train.md")
            for i, code in enumerate(blocks(page, "python"))]


@pytest.mark.parametrize("page,index,code", SNIPPETS, ids=[f"{p}-{i}" for p, i, _ in SNIPPETS])
def test_the_python_snippets_on_the_pages_run(page, index, code, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    exec(compile(code, f"{page} (python block {index})", "exec"), {})
    assert capsys.readouterr().out.strip(), "the snippet printed nothing"
