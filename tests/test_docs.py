"""The documentation site builds without warnings, and the code on its pages runs.

`mkdocs build --strict` fails on any warning: a broken link, a page missing from the
nav, an API reference entry (`::: pyfunctorch.x`) that does not resolve. The python
code blocks of the user guide pages are executed top to bottom, one namespace per page,
so every example there stays true (docs/limitations.md is run by test_limitations_doc.py).
"""

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GUIDE_PAGES = [
    "index.md",
    "getting-started.md",
    "coming-from-torch-func.md",
    "differences.md",
    "transforms/vmap.md",
    "transforms/grad.md",
    "transforms/vjp.md",
    "transforms/jvp.md",
    "transforms/jacobians.md",
    "transforms/functional_call.md",
    "transforms/control-flow.md",
    "transforms/compile.md",
    "integrations/torch-compile.md",
    "integrations/opacus.md",
    "integrations/distributed.md",
]

#: pages whose code needs an optional package (installed by requirements-dev.txt)
NEEDS = {"integrations/opacus.md": "opacus"}

_MISSING = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
            if importlib.util.find_spec(m.split(".")[0]) is None
            or (m == "mkdocstrings_handlers.python" and importlib.util.find_spec(m) is None)]


@pytest.mark.skipif(bool(_MISSING), reason=f"docs tools not installed ({', '.join(_MISSING)}); "
                    "python -m pip install -r requirements-dev.txt")
def test_mkdocs_build_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", os.path.join(ROOT, "mkdocs.yml"),
         "-d", str(tmp_path / "site")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("vmap", "grad", "jacrev", "functional_call", "cond"):
        assert f"pyfunctorch.{name}" in api, name


def _python_blocks(text):
    """The ```python fenced blocks of a markdown page (also indented ones), dedented."""
    pattern = re.compile(r"^([ \t]*)```python[^\n]*\n(.*?)^\1```", re.S | re.M)
    return [textwrap.dedent(m.group(2)) for m in pattern.finditer(text)]


def test_every_guide_page_is_in_the_nav():
    nav = open(os.path.join(ROOT, "mkdocs.yml")).read()
    for page in GUIDE_PAGES + ["api.md"]:
        assert page in nav, page


@pytest.mark.parametrize("page", GUIDE_PAGES)
def test_page_code_runs(page):
    if page in NEEDS:
        pytest.importorskip(NEEDS[page])
    path = os.path.join(ROOT, "docs", page)
    blocks = _python_blocks(open(path).read())
    assert blocks, f"{page} has no python code blocks"
    namespace = {"__name__": "__docs__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for i, block in enumerate(blocks):
            code = compile(block, f"docs/{page} (python block {i + 1})", "exec")
            exec(code, namespace)
