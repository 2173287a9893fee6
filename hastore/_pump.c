/* hastore._pump: the beat pump. A thread that sends an engine's planned beats at their due times and reads what
 * the quiet links and the ICMP sockets hold, without waking Python, while all of it is what the plan expects
 * (hastore.core.actions.Plan, hastore.io.pump). It never touches a Python object: Python hands it a plan
 * (start) and takes it back (stop) under a mutex; the thread wakes Python through an eventfd when the plan ends,
 * a watched silence passes, an input comes that was not expected, a send fails or a beat is found late.
 *
 * Times are CLOCK_MONOTONIC nanoseconds (Python's time.monotonic()). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define IN_DGRAM 0
#define IN_STREAM 1
#define IN_ICMP 2
#define MAX_OTHERS 64
#define STREAM_BUF 8192
#define READS_PER_WAKE 64

typedef struct { int64_t due; int beat; int fd; struct sockaddr_storage addr; socklen_t alen; char *data; Py_ssize_t len; } Output;
typedef struct { int fd; int kind; char *buf; size_t have; } Input;
typedef struct { int input; int watch; int tag; char *data; Py_ssize_t len; char src[16]; int srclen; } Expect;
typedef struct { int64_t deadline; int64_t extend; int newest; int64_t at; } Watch;
typedef struct { int input; char *data; size_t len; int64_t at; } Other;

typedef struct {
    PyObject_HEAD
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int started, closing, active, wake_fd;
    Output *out; int nout, next_out, sent;
    int failed, failed_errno;  /* the first output whose send failed, or -1 */
    Input *in; int nin;
    Expect *ex; int nex;
    Watch *w; int nw;
    int64_t *tag_at; int ntags;
    Other others[MAX_OTHERS]; int nothers;
    int64_t until, late, last_pet;
    double *pet;  /* the guard's pet page, or NULL */
    char why[160];
} Pump;

static int64_t mono(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000LL + t.tv_nsec; }
static int64_t real(void) { struct timespec t; clock_gettime(CLOCK_REALTIME, &t); return t.tv_sec * 1000000000LL + t.tv_nsec; }

static void clear_plan(Pump *p) {
    for (int i = 0; i < p->nout; i++) free(p->out[i].data);
    for (int i = 0; i < p->nin; i++) free(p->in[i].buf);
    for (int i = 0; i < p->nex; i++) free(p->ex[i].data);
    for (int i = 0; i < p->nothers; i++) free(p->others[i].data);
    free(p->out); free(p->in); free(p->ex); free(p->w); free(p->tag_at);
    if (p->pet) munmap(p->pet, sizeof(double));
    p->out = NULL; p->in = NULL; p->ex = NULL; p->w = NULL; p->tag_at = NULL; p->pet = NULL;
    p->nout = p->nin = p->nex = p->nw = p->ntags = p->nothers = 0;
    p->next_out = p->sent = 0; p->active = 0; p->why[0] = 0;
    p->failed = -1; p->failed_errno = 0;
}

static void finish(Pump *p, const char *why) {
    p->active = 0;
    snprintf(p->why, sizeof p->why, "%s", why);
    uint64_t one = 1;
    if (write(p->wake_fd, &one, sizeof one) < 0) { /* full or closed: Python reads it anyway or is going */ }
}

static void other(Pump *p, int input, const char *data, size_t len, int64_t at) {
    if (p->nothers < MAX_OTHERS) {
        Other *o = &p->others[p->nothers];
        o->data = malloc(len ? len : 1);
        if (!o->data) return;
        memcpy(o->data, data, len); o->len = len; o->input = input; o->at = at; p->nothers++;
    }
}

static void matched(Pump *p, int e, int64_t at) {
    Expect *x = &p->ex[e];
    Watch *w = &p->w[x->watch];
    if (w->newest < 0 || at >= w->at) { w->newest = e; w->at = at; }
    if (at + w->extend > w->deadline) w->deadline = at + w->extend;
    if (x->tag >= 0 && x->tag < p->ntags && p->in[x->input].kind == IN_DGRAM && !p->tag_at[x->tag]) p->tag_at[x->tag] = at;
}

static int icmp_match(const Expect *x, const char *d, size_t n, const struct sockaddr_storage *from) {
    if ((size_t)x->len > n) return 0;
    const char *t = d + n - x->len;  /* raw IPv4 sockets put the IP header first: compare the tail */
    if (memcmp(t, x->data, 2) || memcmp(t + 4, x->data + 4, x->len - 4)) return 0;  /* not the checksum */
    if (from->ss_family == AF_INET)
        return x->srclen == 4 && !memcmp(&((const struct sockaddr_in *)from)->sin_addr, x->src, 4);
    if (from->ss_family == AF_INET6)
        return x->srclen == 16 && !memcmp(&((const struct sockaddr_in6 *)from)->sin6_addr, x->src, 16);
    return 0;
}

static void read_datagrams(Pump *p, int i, int64_t now, int64_t offset) {
    Input *in = &p->in[i];
    char buf[2048], cbuf[CMSG_SPACE(sizeof(struct timespec))];
    for (int r = 0; r < READS_PER_WAKE; r++) {
        struct sockaddr_storage from;
        struct iovec iov = {buf, sizeof buf};
        struct msghdr mh = {&from, sizeof from, &iov, 1, cbuf, sizeof cbuf, 0};
        ssize_t n = recvmsg(in->fd, &mh, MSG_DONTWAIT);
        if (n < 0) return;
        int64_t at = now;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_TIMESTAMPNS) {
                struct timespec ts; memcpy(&ts, CMSG_DATA(c), sizeof ts);
                at = ts.tv_sec * 1000000000LL + ts.tv_nsec - offset;
                if (at > now) at = now;
            }
        int e;
        for (e = 0; e < p->nex; e++) {
            Expect *x = &p->ex[e];
            if (x->input != i) continue;
            if (in->kind == IN_ICMP ? icmp_match(x, buf, n, &from) : (x->len == n && !memcmp(x->data, buf, n))) break;
        }
        if (e < p->nex) matched(p, e, at);
        else if (in->kind == IN_DGRAM) other(p, i, buf, n, at);  /* ICMP: someone else's, or stale: not ours */
    }
    if (in->kind == IN_DGRAM) other(p, i, "", 0, now);  /* more than a wake's share: a flood, for Python */
}

static void read_stream(Pump *p, int i, int64_t now) {
    Input *in = &p->in[i];
    for (;;) {
        if (in->have == STREAM_BUF) break;
        ssize_t n = read(in->fd, in->buf + in->have, STREAM_BUF - in->have);
        if (n <= 0) break;
        in->have += n;
    }
    for (;;) {
        int e, prefix = 0;
        for (e = 0; e < p->nex; e++) {
            Expect *x = &p->ex[e];
            if (x->input != i) continue;
            if ((size_t)x->len <= in->have && !memcmp(x->data, in->buf, x->len)) break;
            if ((size_t)x->len > in->have && !memcmp(x->data, in->buf, in->have)) prefix = 1;
        }
        if (e < p->nex) {
            Expect *x = &p->ex[e];
            int64_t at = (x->tag >= 0 && x->tag < p->ntags && p->tag_at[x->tag]) ? p->tag_at[x->tag] : now;
            matched(p, e, at);
            memmove(in->buf, in->buf + x->len, in->have - x->len);
            in->have -= x->len;
            continue;
        }
        if (in->have && !prefix) {  /* not (the start of) a frame we expect: Python's framer takes it all */
            other(p, i, in->buf, in->have, now);
            in->have = 0;
        }
        return;
    }
}

static void step(Pump *p) {
    int64_t now = mono(), offset = real() - now;
    for (int i = 0; i < p->nin; i++) {
        if (p->in[i].kind == IN_STREAM) read_stream(p, i, now);
        else read_datagrams(p, i, now, offset);
    }
    if (p->nothers) { finish(p, "an input the plan did not expect"); return; }
    for (int i = 0; i < p->nw; i++)
        if (p->w[i].deadline <= now) { char why[64]; snprintf(why, sizeof why, "silence on watch %d", i); finish(p, why); return; }
    if (now >= p->until) { finish(p, "the plan ended"); return; }
    while (p->next_out < p->nout && p->out[p->next_out].due <= now) {
        Output *o = &p->out[p->next_out];
        if (now - o->due > p->late) { finish(p, "a beat found late: the process was stopped"); return; }
        int beat = o->beat;
        p->sent = beat + 1;  /* begun: a beat a link failed may have gone out over another */
        for (; p->next_out < p->nout && p->out[p->next_out].beat == beat; p->next_out++) {
            o = &p->out[p->next_out];
            ssize_t n = o->alen ? sendto(o->fd, o->data, o->len, MSG_DONTWAIT, (struct sockaddr *)&o->addr, o->alen)
                                : write(o->fd, o->data, o->len);
            if (n != o->len && p->failed < 0) {  /* the beat still goes out over the other links */
                p->failed = p->next_out;
                p->failed_errno = n < 0 ? errno : EAGAIN;
            }
        }
        if (p->failed >= 0) {
            char why[128];
            snprintf(why, sizeof why, "a send failed (%s)", strerror(p->failed_errno));
            finish(p, why);
            return;
        }
        if (p->pet) { *p->pet = now / 1e9; p->last_pet = now; }
    }
}

static int64_t next_time(Pump *p) {
    int64_t t = p->until;
    if (p->next_out < p->nout && p->out[p->next_out].due < t) t = p->out[p->next_out].due;
    for (int i = 0; i < p->nw; i++) if (p->w[i].deadline < t) t = p->w[i].deadline;
    return t;
}

static void *run(void *arg) {
    Pump *p = arg;
    pthread_mutex_lock(&p->mu);
    while (!p->closing) {
        if (!p->active) { pthread_cond_wait(&p->cv, &p->mu); continue; }
        step(p);
        if (!p->active) continue;
        int64_t t = next_time(p);
        struct timespec ts = {t / 1000000000LL, t % 1000000000LL};
        pthread_cond_timedwait(&p->cv, &p->mu, &ts);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static int fill_addr(PyObject *a, struct sockaddr_storage *ss, socklen_t *len) {
    if (a == Py_None) { *len = 0; return 0; }
    char *b; Py_ssize_t n;
    if (PyBytes_AsStringAndSize(a, &b, &n) < 0 || n > (Py_ssize_t)sizeof *ss) { PyErr_SetString(PyExc_ValueError, "bad sockaddr"); return -1; }
    memset(ss, 0, sizeof *ss); memcpy(ss, b, n); *len = n;
    return 0;
}

static char *copy_bytes(PyObject *b, Py_ssize_t *len) {
    char *s;
    if (PyBytes_AsStringAndSize(b, &s, len) < 0) return NULL;
    char *d = malloc(*len ? *len : 1);
    if (!d) { PyErr_NoMemory(); return NULL; }
    memcpy(d, s, *len);
    return d;
}

static PyObject *Pump_start(Pump *p, PyObject *args) {
    PyObject *outs, *ins, *exs, *ws;
    long long until, late; int pet_fd, ntags;
    if (!PyArg_ParseTuple(args, "O!O!O!O!LLii", &PyList_Type, &outs, &PyList_Type, &ins, &PyList_Type, &exs,
                          &PyList_Type, &ws, &until, &late, &pet_fd, &ntags)) return NULL;
    pthread_mutex_lock(&p->mu);
    clear_plan(p);
    int ok = 0;
    p->nout = PyList_GET_SIZE(outs); p->nin = PyList_GET_SIZE(ins); p->nex = PyList_GET_SIZE(exs); p->nw = PyList_GET_SIZE(ws);
    p->ntags = ntags > 0 ? ntags : 0;
    p->out = calloc(p->nout + 1, sizeof(Output)); p->in = calloc(p->nin + 1, sizeof(Input));
    p->ex = calloc(p->nex + 1, sizeof(Expect)); p->w = calloc(p->nw + 1, sizeof(Watch));
    p->tag_at = calloc(p->ntags + 1, sizeof(int64_t));
    if (!p->out || !p->in || !p->ex || !p->w || !p->tag_at) { PyErr_NoMemory(); goto done; }
    for (int i = 0; i < p->nout; i++) {
        PyObject *addr, *data; Output *o = &p->out[i]; long long due;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(outs, i), "LiiOO!", &due, &o->beat, &o->fd, &addr, &PyBytes_Type, &data)) goto done;
        o->due = due;
        if (fill_addr(addr, &o->addr, &o->alen) < 0 || !(o->data = copy_bytes(data, &o->len))) goto done;
    }
    for (int i = 0; i < p->nin; i++) {
        if (!PyArg_ParseTuple(PyList_GET_ITEM(ins, i), "ii", &p->in[i].fd, &p->in[i].kind)) goto done;
        if (p->in[i].kind == IN_STREAM && !(p->in[i].buf = malloc(STREAM_BUF))) { PyErr_NoMemory(); goto done; }
    }
    for (int i = 0; i < p->nex; i++) {
        PyObject *data, *src; Expect *x = &p->ex[i];
        if (!PyArg_ParseTuple(PyList_GET_ITEM(exs, i), "iiiO!O", &x->input, &x->watch, &x->tag, &PyBytes_Type, &data, &src)) goto done;
        if (x->input < 0 || x->input >= p->nin || x->watch < 0 || x->watch >= p->nw) { PyErr_SetString(PyExc_ValueError, "expect refers to no input or watch"); goto done; }
        if (!(x->data = copy_bytes(data, &x->len))) goto done;
        if (p->in[x->input].kind == IN_ICMP && x->len < 8) { PyErr_SetString(PyExc_ValueError, "an ICMP expectation needs its header"); goto done; }
        if (src != Py_None) {
            char *s; Py_ssize_t n;
            if (PyBytes_AsStringAndSize(src, &s, &n) < 0 || (n != 4 && n != 16)) { PyErr_SetString(PyExc_ValueError, "bad source address"); goto done; }
            memcpy(x->src, s, n); x->srclen = n;
        }
    }
    for (int i = 0; i < p->nw; i++) {
        long long d, e;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(ws, i), "LL", &d, &e)) goto done;
        p->w[i].deadline = d; p->w[i].extend = e; p->w[i].newest = -1;
    }
    if (pet_fd >= 0) {
        void *m = mmap(NULL, sizeof(double), PROT_READ | PROT_WRITE, MAP_SHARED, pet_fd, 0);
        if (m == MAP_FAILED) { PyErr_SetFromErrno(PyExc_OSError); goto done; }
        p->pet = m;
    }
    p->until = until; p->late = late; p->last_pet = 0;
    if (!p->started) {
        if (pthread_create(&p->thread, NULL, run, p)) { PyErr_SetString(PyExc_OSError, "cannot start the pump's thread"); goto done; }
        p->started = 1;
    }
    p->active = 1;
    ok = 1;
done:
    if (!ok) clear_plan(p);
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Pump_stop(Pump *p, PyObject *unused) {
    pthread_mutex_lock(&p->mu);
    int was = p->active;
    p->active = 0;
    PyObject *matches = PyList_New(0), *others = PyList_New(0), *res = NULL;
    if (!matches || !others) goto done;
    for (int i = 0; i < p->nw; i++) {
        if (p->w[i].newest < 0) continue;
        PyObject *t = Py_BuildValue("(iL)", p->w[i].newest, (long long)p->w[i].at);
        if (!t || PyList_Append(matches, t) < 0) { Py_XDECREF(t); goto done; }
        Py_DECREF(t);
    }
    for (int i = 0; i < p->nothers; i++) {
        Other *o = &p->others[i];
        PyObject *t = Py_BuildValue("(iy#L)", o->input, o->data, (Py_ssize_t)o->len, (long long)o->at);
        if (!t || PyList_Append(others, t) < 0) { Py_XDECREF(t); goto done; }
        Py_DECREF(t);
    }
    res = Py_BuildValue("(iLOOsii)", p->sent, (long long)p->last_pet, matches, others, was ? "stopped" : p->why,
                        p->failed, p->failed_errno);
done:
    Py_XDECREF(matches); Py_XDECREF(others);
    clear_plan(p);
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
    return res;
}

static void shut(Pump *p) {
    if (p->started) {
        pthread_mutex_lock(&p->mu);
        p->closing = 1;
        pthread_cond_signal(&p->cv);
        pthread_mutex_unlock(&p->mu);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(p->thread, NULL);
        Py_END_ALLOW_THREADS
        p->started = 0;
    }
    clear_plan(p);
}

static PyObject *Pump_close(Pump *p, PyObject *unused) { shut(p); Py_RETURN_NONE; }

static int Pump_init(Pump *p, PyObject *args, PyObject *kw) {
    if (!PyArg_ParseTuple(args, "i", &p->wake_fd)) return -1;
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&p->cv, &a);
    pthread_mutex_init(&p->mu, NULL);
    return 0;
}

static void Pump_dealloc(Pump *p) {
    shut(p);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyMethodDef Pump_methods[] = {
    {"start", (PyCFunction)Pump_start, METH_VARARGS,
     "start(outputs, inputs, expects, watches, until_ns, late_ns, pet_fd, ntags): run a plan (replaces any)"},
    {"stop", (PyCFunction)Pump_stop, METH_NOARGS,
     "stop() -> (beats sent, last pet ns, [(expect, at ns)] newest per watch, [(input, bytes, at ns)], why, "
     "failed output or -1, its errno)"},
    {"close", (PyCFunction)Pump_close, METH_NOARGS, "stop the thread"},
    {NULL}};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "hastore._pump.Pump",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Pump_init,
    .tp_dealloc = (destructor)Pump_dealloc,
    .tp_methods = Pump_methods,
    .tp_doc = "The beat pump: Pump(wake_eventfd)",
};

static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_pump", "hastore's beat pump (see hastore.io.pump)", -1, NULL};

PyMODINIT_FUNC PyInit__pump(void) {
    if (PyType_Ready(&PumpType) < 0) return NULL;
    PyObject *m = PyModule_Create(&mod);
    if (!m) return NULL;
    Py_INCREF(&PumpType);
    if (PyModule_AddObject(m, "Pump", (PyObject *)&PumpType) < 0) { Py_DECREF(&PumpType); Py_DECREF(m); return NULL; }
    PyModule_AddIntConstant(m, "DGRAM", IN_DGRAM);
    PyModule_AddIntConstant(m, "STREAM", IN_STREAM);
    PyModule_AddIntConstant(m, "ICMP", IN_ICMP);
    return m;
}
