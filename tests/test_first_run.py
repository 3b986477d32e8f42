"""A new user's first run: a quiet import, a demo that installs only what it needs."""

import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_emits_no_warning_even_with_W_error():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-W", "error", "-c", "import pyfunctorch, sys; "
                        "assert 'opacus' not in sys.modules and 'torch._dynamo' not in sys.modules"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr == "", r.stderr


def _requirements(name):
    pins = {}
    for line in open(os.path.join(ROOT, name)):
        line = line.split("#")[0].strip()
        if line:
            pkg = re.split(r"[=<>\[ ]", line, maxsplit=1)[0].lower()
            pins[pkg] = line
    return pins


def test_readme_demo_installs_demo_requirements_and_tests_install_dev():
    readme = open(os.path.join(ROOT, "README.md")).read()
    commands = re.findall(r"```bash\n(python -m pip install .*?)\n```", readme)
    demo = [c for c in commands if "examples/per_sample_grads.py" in c]
    tests = [c for c in commands if "pytest" in c]
    assert len(demo) == 1 and len(tests) == 1, commands
    assert "requirements-demo.txt" in demo[0] and "requirements-dev.txt" not in demo[0]
    assert "requirements-dev.txt" in tests[0]
    # the demo's pins are the development pins (one tested environment)
    dev = _requirements("requirements-dev.txt")
    for pkg, line in _requirements("requirements-demo.txt").items():
        assert dev.get(pkg) == line, (pkg, line, dev.get(pkg))


def test_examples_import_only_what_the_demo_requirements_install():
    allowed = set(_requirements("requirements-demo.txt")) | {"pyfunctorch"}
    stdlib = set(sys.stdlib_module_names)
    for script in sorted(os.listdir(os.path.join(ROOT, "examples"))):
        if not script.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(ROOT, "examples", script)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in stdlib or top in allowed, f"examples/{script} imports {name}"
