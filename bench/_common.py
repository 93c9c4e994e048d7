"""Helpers shared by the benches (``bench/*.py``): /proc process accounting, load monitoring, a
retrying ``ray.init``, the random-init HuBERT encoders and the synthetic corpus.

Import from a bench script with the repository root on ``sys.path``::

    REPO = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(REPO))
    from bench._common import StageSampler, start_ray

Nothing here imports Ray, torch or serray at module level (a bench's child process imports only what
it measures).
"""

from __future__ import annotations

import os
import resource
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Environment every bench gives Ray workers: no Ray Data progress bars, Train's print patch off.
RAY_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


# ---------------------------------------------------------------------------- /proc basics


def proc_children_map() -> dict:
    """``ppid -> [pid, ...]`` for every process on the machine."""
    kids: dict = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid: int) -> list:
    """Every process started (directly or not) by ``pid``: for a local Ray, the raylet, GCS,
    dashboard and all worker processes."""
    kids, out, todo = proc_children_map(), [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def proc_status_kb(pid: int, keys=("VmRSS", "VmHWM")) -> dict:
    """Some ``/proc/<pid>/status`` fields in KiB (empty when the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k = line.split(":", 1)[0]
                if k in keys:
                    out[k] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def vm_hwm_kb(pid: int) -> int:
    """Peak RSS (VmHWM, KiB) of a process over its life (or since :func:`reset_hwm`)."""
    return proc_status_kb(pid, ("VmHWM",)).get("VmHWM", 0)


def reset_hwm(pid: int) -> bool:
    """Reset a process's VmHWM to its current RSS (``echo 5 > /proc/<pid>/clear_refs``, Linux >= 4.0,
    own processes only). Returns whether it worked; the process is not otherwise affected."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cmdline(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def proc_name(argv: list, is_self: bool = False) -> str:
    """A short name: ``bench driver``, ``ray::<actor or task>``, the program, or for Python the
    script/module it runs."""
    if is_self:
        return "bench driver"
    if not argv:
        return ""
    if len(argv) == 1 and " " in argv[0]:  # a process that rewrote its title (setproctitle)
        argv = argv[0].split()
        if not argv[0].startswith(("ray::", "/")):
            return argv[0]
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    prog = argv[0].rsplit("/", 1)[-1]
    if prog.startswith("python") and len(argv) > 1:
        rest = argv[1:]
        if rest[0] == "-m" and len(rest) > 1:
            return rest[1]
        if rest[0] in ("-B", "-u") and len(rest) > 1:
            rest = rest[1:]
        if rest[0] == "-c":
            return "python -c " + (rest[1][:30] if len(rest) > 1 else "")
        return rest[0].rsplit("/", 1)[-1]
    return prog


def maxrss_mb() -> float:
    """``ru_maxrss`` of this process in MB (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_line() -> str:
    la = os.getloadavg()
    return f"{os.cpu_count()} cores, load avg {la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f}"


# ---------------------------------------------------------------------------- peak RSS samplers


class _Sampler:
    """A daemon thread that calls ``_sample()`` every ``period`` s inside a ``with`` block, and once
    more at each end. Subclasses hook in before the first sample (``_begin``), after it (``_started``)
    and after the last one (``_ended``)."""

    def __init__(self, period: float):
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        raise NotImplementedError

    def _begin(self) -> None:
        pass

    def _started(self) -> None:
        pass

    def _ended(self) -> None:
        pass

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self):
        self._begin()
        self._sample()
        self._started()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self._ended()


class ProcSampler(_Sampler):
    """Peak RSS (VmHWM over the whole life) of every descendant of this process, sampled in a thread
    (``bench/featurize.py``: one measurement per child process, so lifetime peaks are clean)."""

    def __init__(self, period: float = 0.1):
        super().__init__(period)
        self.peak, self.kind = {}, {}

    def _sample(self) -> None:
        for pid in descendants(os.getpid()):
            hwm = vm_hwm_kb(pid)
            if hwm:
                self.peak[pid] = max(self.peak.get(pid, 0), hwm)
                cmd = " ".join(cmdline(pid))
                if cmd:  # a worker renames itself ray::<task> once it runs something
                    self.kind[pid] = cmd

    def summary(self) -> dict:
        workers = {p: kb for p, kb in self.peak.items() if self.kind.get(p, "").startswith("ray::")}
        encoder = {p: kb for p, kb in workers.items() if "EncodeBatch" in self.kind.get(p, "")}
        system = {p: kb for p, kb in self.peak.items() if p not in workers}
        mb = lambda d: round(sum(d.values()) / 1024, 1)  # noqa: E731
        return {"workers_mb": mb(workers), "n_workers": len(workers), "encoder_actor_mb": mb(encoder),
                "system_mb": mb(system), "n_system": len(system)}


#: ``ray::<name>`` prefixes -> what the process is, for the tables.
WORKER_KINDS = (
    ("ImplicitFunc", "Tune trial"),
    ("RayTrainWorker", "Train worker"),
    ("TrainController", "Train controller"),
    ("MapWorker", "encoder actor"),
    ("EncodeBatch", "encoder actor"),
    ("IDLE", "idle worker"),
)


def worker_kind(name: str) -> str:
    """``ray::ImplicitFunc.train`` -> ``Tune trial``; other ``ray::X`` -> ``X``."""
    short = name[len("ray::"):] if name.startswith("ray::") else name
    for prefix, kind in WORKER_KINDS:
        if prefix in short:
            return kind
    return short.split("(")[0].split(".")[0] or "worker"


class StageSampler(_Sampler):
    """Per-stage peak RSS of this process (the *driver*) and of every process it started.

    On entry the VmHWM of the driver and of every existing descendant is reset to its current RSS
    (``/proc/<pid>/clear_refs``), so a process's VmHWM afterwards is its peak *within the stage*;
    processes born during the stage count from birth. Where the reset is refused, the peak is the
    largest VmRSS sampled (every ``period`` s). Processes are grouped as

    * ``driver``: this process;
    * ``workers``: Ray worker processes (``ray::...``: Tune trials, Train workers and controller,
      Ray Data encoder actors and tasks, Ray's own helper actors, idle workers);
    * ``system``: everything else it started (raylet, GCS, dashboard and agents, log monitor).

    Beside each peak RSS, the largest sampled ``RssAnon`` (private memory: heap, tensors, Arrow
    buffers; not shared libraries or files) is kept, which is what grows with data.

    ``summary()`` gives the driver's peak, the largest single peak among driver + workers and its
    process kind, the per-kind largest peaks, and two sums over driver + workers: ``sum_mb``, the
    largest *concurrent* sum of sampled RSS (one instant), and ``sum_of_peaks_mb`` (each process's
    own peak added up: an upper bound). RSS counts shared pages (shared libraries, the Ray object
    store in /dev/shm that a process has touched) in every process that maps them, so sums overstate.
    """

    def __init__(self, period: float = 0.25):
        super().__init__(period)
        self.me = os.getpid()
        self.peak, self.anon, self.name, self.first_seen = {}, {}, {}, {}
        self.sum_kb = self.system_sum_kb = 0
        self.clean: set = set()
        self.pre: set = set()

    def _group(self, pid: int) -> str:
        if pid == self.me:
            return "driver"
        return "worker" if self.name.get(pid, "").startswith("ray::") else "system"

    def _sample(self) -> None:
        pids = [self.me] + descendants(self.me)
        now_sum = now_sys = 0
        for pid in pids:
            st = proc_status_kb(pid, ("VmRSS", "VmHWM", "RssAnon"))
            if not st:
                continue
            rss, hwm = st.get("VmRSS", 0), st.get("VmHWM", 0)
            self.anon[pid] = max(self.anon.get(pid, 0), st.get("RssAnon", 0))
            self.first_seen.setdefault(pid, time.perf_counter())
            peak = max(rss, hwm) if (pid in self.clean or pid not in self.pre) else rss
            self.peak[pid] = max(self.peak.get(pid, 0), peak)
            name = proc_name(cmdline(pid), pid == self.me)
            if name and (name != "ray::IDLE" or pid not in self.name):  # keep the last real name
                self.name[pid] = name
            if self._group(pid) == "system":
                now_sys += rss
            else:
                now_sum += rss
        self.sum_kb = max(self.sum_kb, now_sum)
        self.system_sum_kb = max(self.system_sum_kb, now_sys)

    def _begin(self) -> None:
        self.pre = {self.me, *descendants(self.me)}
        self.clean = {p for p in self.pre if reset_hwm(p)}
        self.t0 = time.perf_counter()

    def _ended(self) -> None:
        self.wall = time.perf_counter() - self.t0

    def summary(self) -> dict:
        mb = lambda kb: round(kb / 1024, 1)  # noqa: E731
        driver = self.peak.get(self.me, 0)
        kinds: dict = {}
        for pid, kb in self.peak.items():
            if self._group(pid) != "worker":
                continue
            k = worker_kind(self.name.get(pid, ""))
            n, m, a = kinds.get(k, (0, 0, 0))
            kinds[k] = (n + 1, max(m, kb), max(a, self.anon.get(pid, 0)))
        largest_kind, largest, largest_anon = "driver", driver, self.anon.get(self.me, 0)
        for k, (_, m, a) in kinds.items():
            if m > largest:
                largest_kind, largest, largest_anon = k, m, a
        counted = [kb for pid, kb in self.peak.items() if self._group(pid) != "system"]
        return {"driver_mb": mb(driver), "driver_anon_mb": mb(self.anon.get(self.me, 0)),
                "largest_mb": mb(largest), "largest_kind": largest_kind, "largest_anon_mb": mb(largest_anon),
                "sum_mb": mb(self.sum_kb), "sum_of_peaks_mb": mb(sum(counted)),
                "n_workers": sum(v[0] for v in kinds.values()),
                "workers": {k: {"n": n, "max_mb": mb(m), "anon_mb": mb(a)}
                            for k, (n, m, a) in sorted(kinds.items(), key=lambda kv: -kv[1][1])},
                "system_mb": mb(self.system_sum_kb), "hwm_reset": len(self.clean) == len(self.pre)}


# ---------------------------------------------------------------------------- load monitor


def box_busy_s() -> float:
    """CPU-seconds the whole machine has been busy (all cores; /proc/stat, steal counted as busy)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s(pids) -> dict:
    """utime + stime (s) of each process."""
    tck, out = os.sysconf("SC_CLK_TCK"), {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            out[pid] = (int(parts[11]) + int(parts[12])) / tck
        except (OSError, IndexError, ValueError):
            pass
    return out


class LoadMonitor(_Sampler):
    """How much of the machine a phase got: CPU used by this process and everything it started
    (Ray processes included; sampled every second, so short-lived processes are partly missed) vs
    CPU used by everyone else on the box. Other people's load shows up as ``others`` cores."""

    def __init__(self, period: float = 1.0):
        super().__init__(period)
        self.cpu, self.cmd = {}, {}

    def _sample(self) -> None:
        me = os.getpid()
        for pid, c in own_cpu_s([me] + descendants(me)).items():
            self.cpu[pid] = max(self.cpu.get(pid, 0.0), c)
            argv = cmdline(pid)
            if not argv:
                continue
            name = proc_name(argv, pid == me)
            if name and (name != "ray::IDLE" or pid not in self.cmd):  # keep the last real name
                self.cmd[pid] = name

    def _started(self) -> None:
        self.cpu0, self.busy0, self.t0 = dict(self.cpu), box_busy_s(), time.perf_counter()

    def _ended(self) -> None:
        self.wall = time.perf_counter() - self.t0
        self.own = sum(c - self.cpu0.get(pid, 0.0) for pid, c in self.cpu.items())
        self.busy = box_busy_s() - self.busy0

    def cpu_of(self, prefix: str) -> float:
        """CPU-seconds used during the phase by our processes whose name starts with ``prefix``."""
        return sum(c - self.cpu0.get(pid, 0.0) for pid, c in self.cpu.items() if self.cmd.get(pid, "").startswith(prefix))

    def breakdown(self, top: int = 8) -> str:
        """CPU-seconds of our processes during the phase, summed by process name, largest first."""
        by: dict = {}
        for pid, c in self.cpu.items():
            name = self.cmd.get(pid, "?")
            by[name] = by.get(name, 0.0) + c - self.cpu0.get(pid, 0.0)
        items = sorted(by.items(), key=lambda kv: -kv[1])[:top]
        return ", ".join(f"{k} {v:.1f}" for k, v in items if v >= 0.05)

    def others_cores(self) -> float:
        return max(0.0, self.busy - self.own) / max(1e-9, self.wall)

    def line(self) -> str:
        return (f"{self.wall:.0f} s wall, ours {self.own / self.wall:.2f} cores, "
                f"others {self.others_cores():.2f} cores (of {os.cpu_count()})")


# ---------------------------------------------------------------------------- Ray


def start_ray(cfg, attempts: int = 3) -> float:
    """``serray.ray_utils.init_ray`` with retries: on a loaded machine the raylet can miss Ray's fixed
    30 s registration wait ("The current node timed out during startup"). Returns the seconds taken."""
    import ray

    from serray.ray_utils import init_ray

    t = time.perf_counter()
    for i in range(attempts):
        try:
            init_ray(cfg)
            return time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception here
            if i == attempts - 1:
                raise
            print(f"# ray.init failed ({e}); retrying", flush=True)
            ray.shutdown()
            time.sleep(5)
    return time.perf_counter() - t


# ---------------------------------------------------------------------------- encoders and corpora

#: HuBERT sizes (hidden, layers, heads, ffn) by name; "large" is hubert-large-ll60k's.
HUBERT_SIZES = {"tiny": (64, 2, 2, 128), "base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096)}


def hubert_config(size: str = "base"):
    """A ``transformers.HubertConfig`` with the layer sizes of ``size`` and the large checkpoints'
    layer-norm feature extractor (batchable with an attention mask; what serray batches)."""
    from transformers import HubertConfig

    hidden, layers, heads, ffn = HUBERT_SIZES[size]
    extra = {"conv_dim": (32,) * 7} if size == "tiny" else {}  # tiny: a cheap feature extractor too (smoke tests)
    return HubertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn, feat_extract_norm="layer", do_stable_layer_norm=True, **extra)


def make_random_hubert(path: Path, size: str = "base") -> str:
    """A random-init HuBERT saved with ``save_pretrained``: the real model's compute, no download."""
    import torch
    from transformers import HubertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    HubertModel(hubert_config(size)).eval().save_pretrained(path)
    return str(path)


def make_corpus_and_manifest(base: Path, *, keep_unlabelled: bool, **corpus_kw) -> tuple:
    """A demo-preset synthetic corpus under ``base/IEMOCAP_full_release`` and its manifest
    ``base/manifest.parquet``. Returns ``(root, manifest_path, manifest_frame)``."""
    from serray.data.corpora.base import write_manifest
    from serray.data.corpora.iemocap import build_manifest
    from serray.data.synthetic import make_corpus

    root = make_corpus(base / "IEMOCAP_full_release", **corpus_kw)
    report = build_manifest(root, keep_unlabelled=keep_unlabelled)
    manifest = write_manifest(report.kept, base / "manifest.parquet")
    return root, manifest, report.kept
