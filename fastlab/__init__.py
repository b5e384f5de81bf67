"""fastlab: fast, numerically exact kernels and a lean trainer for transformer experiments.

Layers, each depending only on those above it: ``fastlab.kernels`` (Triton) and
``fastlab._C`` (C++/CUDA) -> ``fastlab.ops`` (functional API, references, dispatch) ->
``fastlab.nn`` / ``fastlab.optim`` -> ``fastlab.models`` -> ``fastlab.tasks`` ->
``fastlab.train``.
"""
__version__ = "0.1.0"
