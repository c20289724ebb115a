"""Every Python block of README.md runs as written, so a README change that breaks one fails CI.

A ```python block is run as a script in a fresh interpreter (in a temporary folder: files it writes stay there); a
block of `>>>` lines is a doctest, its printed results checked. A block may be preceded by an HTML comment that the
rendered README hides:
    <!-- readme-test: needs MODULE -->     skipped, saying so, when MODULE cannot be imported (e.g. trl)
    <!-- readme-test: skip REASON -->      never run here (e.g. it needs a GPU)
"""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"(?:<!-- readme-test: (?P<marker>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def blocks():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start("code"))  # 1-based line of the fence
        out.append(pytest.param(m.group("code"), m.group("marker") or "", id=f"line{line}"))
    return out


def test_readme_has_python_blocks():
    assert len(blocks()) >= 8


@pytest.mark.parametrize("code,marker", blocks())
def test_readme_block_runs(code, marker, tmp_path):
    kind, _, arg = marker.partition(" ")
    if kind == "skip":
        pytest.skip(f"README block marked: {arg}")
    if kind == "needs" and importlib.util.find_spec(arg) is None:
        pytest.skip(f"README block needs {arg}, not installed")
    assert kind in ("", "needs"), f"unknown readme-test marker {marker!r}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    if code.lstrip().startswith(">>>"):
        script = ("import doctest, sys\n"
                  f"test = doctest.DocTestParser().get_doctest({code!r}, {{}}, 'README', 'README.md', 0)\n"
                  "runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)\n"
                  "runner.run(test)\n"
                  "sys.exit(1 if runner.failures or not runner.tries else 0)\n")
    else:
        script = code
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"README block failed:\n{code}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n" \
                              f"{r.stderr[-4000:]}"


def test_a_broken_block_fails(tmp_path):
    # The harness itself: a block that raises, and a doctest whose printed result differs, are failures.
    for code in ("raise SystemExit('broken')\n", ">>> 1 + 1\n3\n"):
        with pytest.raises(AssertionError, match="README block failed"):
            test_readme_block_runs(code, "", tmp_path)
