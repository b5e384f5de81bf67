"""Loading of ``fastlab._C``, the C++/CUDA extension built from csrc/.

Importing the extension registers its operators as ``torch.ops.fastlab.*``; the Python API
in :mod:`fastlab.ops.segment_pool` wraps them.
"""
import functools

import torch


@functools.lru_cache(maxsize=None)
def load_extension():
    """``torch.ops.fastlab`` once the extension is loaded; a clear ImportError when it is not
    built (the failure is not cached, so building it later in the same process works)."""
    try:
        from fastlab import _C  # noqa: F401  (importing it runs the op registrations)
    except ImportError as exc:
        raise ImportError(
            "fastlab._C, the C++/CUDA extension behind fastlab's segment pooling, is not "
            "built or does not load for this torch; build it from the source tree with "
            "`pip install --no-build-isolation -e .` (or `python setup.py build_ext "
            f"--inplace`). Cause: {exc}"
        ) from exc
    return torch.ops.fastlab


def extension_available() -> bool:
    """Whether ``fastlab._C`` loads (without raising)."""
    try:
        load_extension()
    except ImportError:
        return False
    return True
