/* aiofused._abi._pin: pin a buffer and write the SQE that names it, in one call.
 *
 * The C twin of aiofused/_abi/pin.py (the readable reference, used when this module
 * is not built or AIOFUSED_NO_EXTENSIONS is set).  pin_rw() exports ``buf`` writable
 * (a Py_buffer held by the returned Pin until the Pin is freed), checks that it holds
 * ``nbytes``, and writes a whole 64-byte struct io_uring_sqe into the writable buffer
 * ``sqes`` at byte ``offset``: the SQE names the exported memory, so the kernel may
 * touch exactly the bytes the Pin keeps alive.  Errors are the reference's: a buffer
 * that is not writable or not contiguous raises BufferError or TypeError, an empty
 * one or ``nbytes`` out of range ValueError, a field out of range OverflowError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

struct sqe {            /* include/uapi/linux/io_uring.h, the fields this writes */
    uint8_t opcode;
    uint8_t flags;
    uint16_t ioprio;
    int32_t fd;
    uint64_t off;
    uint64_t addr;
    uint32_t len;
    uint32_t rw_flags;
    uint64_t user_data;
    uint16_t buf_index;
    uint16_t personality;
    int32_t splice_fd_in;
    uint64_t addr3;
    uint64_t pad;
};
_Static_assert(sizeof(struct sqe) == 64, "struct io_uring_sqe is 64 bytes");

typedef struct {
    PyObject_HEAD
    Py_buffer view;
} Pin;

static void
Pin_dealloc(Pin *self)
{
    PyBuffer_Release(&self->view); /* the kernel is done: the buffer may move again */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Pin_address(Pin *self, void *closure)
{
    return PyLong_FromVoidPtr(self->view.buf);
}

static PyObject *
Pin_nbytes(Pin *self, void *closure)
{
    return PyLong_FromSsize_t(self->view.len);
}

static PyGetSetDef Pin_getset[] = {
    {"address", (getter)Pin_address, NULL, "Address of the pinned memory.", NULL},
    {"nbytes", (getter)Pin_nbytes, NULL, "Bytes pinned.", NULL},
    {NULL},
};

static PyTypeObject PinType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "aiofused._abi._pin.Pin",
    .tp_doc = "A writable export of a buffer, released when the Pin is freed.",
    .tp_basicsize = sizeof(Pin),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Pin_dealloc,
    .tp_getset = Pin_getset,
};

static int
as_u64_mask(PyObject *o, uint64_t *out)
{
    unsigned long long v = PyLong_AsUnsignedLongLongMask(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

static int
as_range(PyObject *o, long long lo, long long hi, const char *what, long long *out)
{
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < lo || v > hi) {
        PyErr_Format(PyExc_OverflowError, "%s %lld out of range", what, v);
        return -1;
    }
    *out = v;
    return 0;
}

/* pin_rw(sqes, offset, opcode, fd, off, buf, nbytes, rw_flags, user_data, buf_index) */
static PyObject *
pin_rw(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10) {
        PyErr_Format(PyExc_TypeError, "pin_rw() takes 10 arguments (%zd given)", nargs);
        return NULL;
    }
    long long offset, opcode, fd, nbytes;
    uint64_t off, rw_flags, buf_index;
    unsigned long long user_data;
    if (as_range(args[1], 0, PY_SSIZE_T_MAX, "offset", &offset) < 0
        || as_range(args[2], 0, 255, "opcode", &opcode) < 0
        || as_range(args[3], INT32_MIN, INT32_MAX, "fd", &fd) < 0
        || as_u64_mask(args[4], &off) < 0
        || as_range(args[6], LLONG_MIN, LLONG_MAX, "nbytes", &nbytes) < 0
        || as_u64_mask(args[7], &rw_flags) < 0
        || as_u64_mask(args[9], &buf_index) < 0)
        return NULL;
    user_data = PyLong_AsUnsignedLongLong(args[8]); /* OverflowError if negative */
    if (user_data == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    Pin *pin = PyObject_New(Pin, &PinType);
    if (pin == NULL)
        return NULL;
    /* Writable and C-contiguous (PyBUF_SIMPLE), as ctypes' from_buffer asks. */
    if (PyObject_GetBuffer(args[5], &pin->view, PyBUF_WRITABLE) < 0) {
        pin->view.obj = NULL;
        Py_TYPE(pin)->tp_free((PyObject *)pin);
        return NULL;
    }
    if (pin->view.len == 0 || nbytes < 0 || nbytes > pin->view.len || nbytes > UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "buffer of %zd bytes cannot hold %lld",
                     pin->view.len, nbytes);
        Py_DECREF(pin);
        return NULL;
    }
    Py_buffer ring;
    if (PyObject_GetBuffer(args[0], &ring, PyBUF_WRITABLE) < 0) {
        Py_DECREF(pin);
        return NULL;
    }
    const Py_ssize_t slot = (Py_ssize_t)sizeof(struct sqe);
    if (ring.len < slot || offset > ring.len - slot) { /* no overflow for any offset */
        PyErr_Format(PyExc_ValueError, "SQE offset %lld outside the %zd-byte SQ array",
                     offset, ring.len);
        PyBuffer_Release(&ring);
        Py_DECREF(pin);
        return NULL;
    }
    struct sqe s;
    memset(&s, 0, sizeof s);
    s.opcode = (uint8_t)opcode;
    s.fd = (int32_t)fd;
    s.off = off;
    s.addr = (uint64_t)(uintptr_t)pin->view.buf;
    s.len = (uint32_t)nbytes;
    s.rw_flags = (uint32_t)rw_flags;
    s.user_data = (uint64_t)user_data;
    s.buf_index = (uint16_t)buf_index;
    memcpy((char *)ring.buf + offset, &s, sizeof s);
    PyBuffer_Release(&ring);
    return (PyObject *)pin;
}

static PyMethodDef methods[] = {
    {"pin_rw", (PyCFunction)(void (*)(void))pin_rw, METH_FASTCALL,
     "pin_rw(sqes, offset, opcode, fd, off, buf, nbytes, rw_flags, user_data, buf_index)"
     " -> Pin\n\nExport buf writable and write the SQE naming it at sqes[offset:offset+64]."},
    {NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aiofused._abi._pin",
    .m_doc = "Pin a buffer and write the SQE naming it (C twin of aiofused._abi.pin).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__pin(void)
{
    if (PyType_Ready(&PinType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PinType);
    if (PyModule_AddObject(m, "Pin", (PyObject *)&PinType) < 0) {
        Py_DECREF(&PinType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
