"""The README's code snippet runs as written."""

import re
from pathlib import Path


def test_readme_python_snippet_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Use the functions in your own JAX code", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["logits"].shape == (2, 4, 256) and scope["y"].shape == (2, 4, 4, 16)
    assert [len(t) for t in scope["new_tokens"]] == [8, 8]
