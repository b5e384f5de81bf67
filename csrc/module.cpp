// The Python module `fastlab._C`. It exposes no Python functions: importing it runs the
// TORCH_LIBRARY registrations, after which the ops are reachable as torch.ops.fastlab.*.
#include <Python.h>

static struct PyModuleDef fastlab_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "fastlab's C++/CUDA operators, registered as torch.ops.fastlab.*", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastlab_c_module); }
