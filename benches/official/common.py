"""Shared helpers: load the official generator functions WITHOUT running the
scripts' module-level demo code, plus timing/statistics utilities."""
import os
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"
import ast, json, time, statistics, platform
import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.environ.get("OFFICIAL_BENCH_ROOT", os.path.dirname(BENCH))  # holds repo/ (the official checkout) and results/
DP = os.path.join(ROOT, "repo", "data_process")     # fixed copy of the official scripts
SRC = os.path.join(DP, "source_imgs")
PHOTOS = os.environ.get("PHOTOS", os.path.join(os.path.dirname(os.path.dirname(BENCH)), "fixtures/photos"))


def load_funcs(script_name, extra_globals=None):
    """Parse data_process/<script_name>.py and exec only its imports, function
    definitions and constant assignments (e.g. x_diff, z_diff, small, large).
    The function bodies are executed exactly as written in the official file."""
    path = os.path.join(DP, script_name + ".py")
    src = open(path).read()
    tree = ast.parse(src, filename=path)
    keep = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)):
            keep.append(node)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            keep.append(node)
    mod = ast.Module(body=keep, type_ignores=[])
    ns = {"__name__": "official_" + script_name, "__file__": path}
    exec(compile(mod, path, "exec"), ns)
    if extra_globals:
        ns.update(extra_globals)
    return ns


def seed_all(seed):
    import random
    random.seed(seed)
    np.random.seed(seed)


def stats(ts):
    a = np.asarray(ts, dtype=float)
    return {
        "n": int(a.size),
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
        "total": float(a.sum()),
        "samples_per_s_median": float(1.0 / np.median(a)),
        "samples_per_s_throughput": float(a.size / a.sum()),
    }


def set_cv2_single_thread():
    import cv2
    cv2.setNumThreads(1)
    return cv2.getNumThreads()


# ---------------------------------------------------------------------------
# Non-invasive instrumentation: replace module objects in the loaded namespace
# with thin proxies that log (name, t0, t1) of selected calls. The official
# function bodies are untouched; they just resolve e.g. `cv2.imwrite` through
# the proxy. Overhead: ~1 us per watched call.
EVENTS = []


class Proxy:
    def __init__(self, target, prefix, watch):
        object.__setattr__(self, "_t", target)
        object.__setattr__(self, "_p", prefix)
        object.__setattr__(self, "_w", set(watch))

    def __getattr__(self, name):
        attr = getattr(self._t, name)
        if name in self._w and callable(attr):
            label = self._p + "." + name
            pc = time.perf_counter

            def wrapped(*a, **k):
                t0 = pc()
                try:
                    return attr(*a, **k)
                finally:
                    EVENTS.append((label, t0, pc()))
            object.__setattr__(self, name, wrapped)
            return wrapped
        object.__setattr__(self, name, attr)   # cache plain forwards
        return attr


def wrap_fn(fn, label):
    pc = time.perf_counter

    def wrapped(*a, **k):
        t0 = pc()
        try:
            return fn(*a, **k)
        finally:
            EVENTS.append((label, t0, pc()))
    return wrapped


class TimeShim:
    """Stand-in for the `time` module inside Position.py: records every
    time.time() call (used there only for the 15 s pair-search limit)."""
    def __init__(self):
        self.calls = []

    def time(self):
        t = time.time()
        self.calls.append(time.perf_counter())
        return t


def ev_sum(events, label):
    return sum(t1 - t0 for (l, t0, t1) in events if l == label)


def ev_first(events, label, key=1):
    for e in events:
        if e[0] == label:
            return e[key]
    return None


def ev_last(events, label, key=2):
    r = None
    for e in events:
        if e[0] == label:
            r = e[key]
    return r


def env_info():
    import cv2, PIL, matplotlib, h5py, subprocess
    try:
        import IPython
        ipy = IPython.__version__
    except Exception:
        ipy = None
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = [l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")]
    return {
        "python": platform.python_version(),
        "numpy": np.__version__, "opencv": cv2.__version__, "pillow": PIL.__version__,
        "matplotlib": matplotlib.__version__, "mpl_backend": matplotlib.get_backend(),
        "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version, "ipython": ipy,
        "cpu_model": model[0] if model else None,
        "cv2_threads": cv2.getNumThreads(),
    }
