"""Run from the repository root, fastlab's `kernels/` folder must not stand in for the Hub's
`kernels` package that transformers imports (see fastlab._hub_kernels)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = """
import os, sys
from fastlab._hub_kernels import use_installed_kernels_package
# only the given folders may hold an installed `kernels` package
sys.path[:] = [{root!r}] + {extra!r} + [
    p for p in sys.path if not os.path.isdir(os.path.join(p or os.getcwd(), "kernels"))]
import importlib.util
print("before", importlib.util.find_spec("kernels").origin)
use_installed_kernels_package()
mod = sys.modules.get("kernels")
print("bound", getattr(mod, "__file__", None), getattr(mod, "MARK", None))
import fastlab.kernels
print("ours", fastlab.kernels.__file__)
"""


def _run(extra):
    run = subprocess.run([sys.executable, "-c", _PROBE.format(root=ROOT, extra=extra)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TRITON_INTERPRET="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    return dict(line.split(" ", 1) for line in run.stdout.splitlines())


def test_the_installed_package_wins_over_the_kernel_folder(tmp_path):
    hub = tmp_path / "site" / "kernels"
    hub.mkdir(parents=True)
    (hub / "__init__.py").write_text("MARK = 'hub'\n")
    out = _run([str(tmp_path / "site")])
    assert out["before"] == os.path.join(ROOT, "kernels", "__init__.py")
    assert out["bound"] == f"{hub / '__init__.py'} hub"
    assert out["ours"] == os.path.join(ROOT, "kernels", "__init__.py")


def test_without_an_installed_package_the_name_stays_unbound():
    out = _run([])
    assert out["before"] == os.path.join(ROOT, "kernels", "__init__.py")
    assert out["bound"] == "None None"
