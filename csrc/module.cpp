// The Python module ditkernels._C. Loading it runs the TORCH_LIBRARY
// registrations; its one Python function reports how it was built.

#include <Python.h>

#ifdef DITKERNELS_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#define DK_STRINGIFY_(x) #x
#define DK_STRINGIFY(x) DK_STRINGIFY_(x)

namespace {

void set_item(PyObject* dict, const char* key, PyObject* value) {
  if (value != nullptr) {
    PyDict_SetItemString(dict, key, value);
    Py_DECREF(value);
  }
}

PyObject* build_info(PyObject*, PyObject*) {
  PyObject* info = PyDict_New();
  if (info == nullptr) return nullptr;
#ifdef DITKERNELS_WITH_CUDA
  set_item(info, "cuda", Py_NewRef(Py_True));
  // Underscore-separated compute capabilities, e.g. 80_90 (see setup.py).
  set_item(info, "cuda_archs", PyUnicode_FromString(DK_STRINGIFY(DITKERNELS_CUDA_ARCHS)));
  set_item(info, "cuda_runtime_version", PyLong_FromLong(CUDART_VERSION));
#else
  set_item(info, "cuda", Py_NewRef(Py_False));
  set_item(info, "cuda_archs", PyUnicode_FromString(""));
  set_item(info, "cuda_runtime_version", Py_NewRef(Py_None));
#endif
  set_item(info, "torch_version", PyUnicode_FromString(DK_STRINGIFY(DITKERNELS_TORCH_VERSION)));
  return info;
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How this extension was compiled."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
