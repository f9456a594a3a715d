/* aiofused._abi._cqe: make a CQE (a NamedTuple) in one C call.
 *
 * The C twin of aiofused._core.sqe.new_cqe (the readable reference, used when this
 * module is not built or AIOFUSED_NO_EXTENSIONS is set).  new_cqe(cls, user_data, res,
 * flags) returns an instance of ``cls``, a tuple subclass that adds no fields (a
 * NamedTuple: ``__slots__ = ()``), holding the three items, without the Python-level
 * ``__new__`` and the argument tuples that ``tuple.__new__(cls, (a, b, c))`` builds.
 * A ``cls`` that is not such a subclass raises TypeError, as does a wrong arity.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *
new_cqe(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "new_cqe() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *cls = args[0];
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &PyTuple_Type)
        || ((PyTypeObject *)cls)->tp_basicsize != PyTuple_Type.tp_basicsize
        || ((PyTypeObject *)cls)->tp_itemsize != PyTuple_Type.tp_itemsize) {
        PyErr_SetString(PyExc_TypeError, "new_cqe() needs a tuple subclass with no fields");
        return NULL;
    }
    PyTypeObject *type = (PyTypeObject *)cls;
    /* What tuple_subtype_new does, minus the temporary tuple: tp_alloc zero-fills the
     * items (a GC traversal of the new object sees NULLs, which it skips). */
    PyObject *t = type->tp_alloc(type, 3);
    if (t == NULL)
        return NULL;
    for (int i = 0; i < 3; i++) {
        Py_INCREF(args[i + 1]);
        PyTuple_SET_ITEM(t, i, args[i + 1]);
    }
    return t;
}

static PyMethodDef methods[] = {
    {"new_cqe", (PyCFunction)(void (*)(void))new_cqe, METH_FASTCALL,
     "new_cqe(cls, user_data, res, flags) -> cls\n\n"
     "An instance of tuple subclass cls holding the three items (C twin of "
     "aiofused._core.sqe.new_cqe)."},
    {NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aiofused._abi._cqe",
    .m_doc = "Make a CQE in one C call (C twin of aiofused._core.sqe.new_cqe).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__cqe(void)
{
    return PyModule_Create(&moduledef);
}
