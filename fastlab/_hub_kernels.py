"""The name ``kernels`` belongs to the Hub's package, not to fastlab's kernel folder.

fastlab's Triton kernels live in the repository's top-level ``kernels/`` folder and are
installed as ``fastlab.kernels``. Run from a checkout (``python -m pytest``, ``python -m
fastlab.train`` in the repository root), the current directory on ``sys.path`` makes that
folder answer to the top-level name ``kernels`` as well. transformers (from 5.25) imports the
Hugging Face ``kernels`` package whenever one is installed, and then gets fastlab's folder
and fails (``cannot import name 'CUDAProperties' from 'kernels'``).
:func:`use_installed_kernels_package` imports the installed package under its own name
first, before transformers looks for it.
"""
import importlib.machinery
import importlib.util
import os
import sys


def use_installed_kernels_package() -> None:
    """Bind ``sys.modules['kernels']`` to the installed ``kernels`` package when the name
    would otherwise resolve to fastlab's kernel folder; without one installed, leave the
    name unbound (transformers then finds no distribution and skips it)."""
    if "kernels" in sys.modules:
        return
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None:
        return
    ours = os.path.dirname(importlib.util.find_spec("fastlab.kernels").origin)
    folder = os.path.realpath(os.path.dirname(spec.origin))
    if folder != os.path.realpath(ours):
        return
    # the path entries other than those through which fastlab's folder is found
    others = [p for p in sys.path
              if os.path.realpath(os.path.join(p or os.getcwd(), "kernels")) != folder]
    installed = importlib.machinery.PathFinder.find_spec("kernels", others)
    if installed is None or installed.loader is None:
        return
    module = importlib.util.module_from_spec(installed)
    sys.modules["kernels"] = module
    try:
        installed.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise
