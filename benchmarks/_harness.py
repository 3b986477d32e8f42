"""Shared timing / checking machinery for the benchmark scripts.

Timing protocol (noisy 2-core machines): one thread, every implementation measured in
the SAME process with paired, rotated rounds. Each round times every implementation
once (a sample = ``inner`` back-to-back calls, ``inner`` calibrated per implementation
so that a sample lasts about ``target_s``); the order of implementations is rotated
by one position each round so that no implementation always runs first/last. We
report the median per-call time of each implementation and, for ratios, the median
over rounds of the *paired* per-round ratio (t_impl / t_ref measured in the same
round), which cancels slow drifts of machine load.

Import this module BEFORE torch (it pins OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
# torch's CPU allocator backs allocations of 2 MB and more with transparent huge pages (where the
# kernel allows them on request: /sys/kernel/mm/transparent_hugepage/enabled = madvise or always).
# With 4 KB pages W1's 25 MB results land on different physical pages in every process, and W1's
# ratio at B=64 moved between 1.31x and 1.58x torch.func from one process to the next (the
# hand-batched floor between 0.56x and 0.89x); with huge pages 1.34-1.38x (0.56x), four processes.
# Read by torch once, at its first allocation: set here, before torch is imported.
_THP_PRESET = "torch" in sys.modules
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

torch.set_num_threads(1)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:  # already set (interop pool started)
    pass


def _fix_malloc_thresholds() -> str:
    """glibc adapts its mmap and trim thresholds to the program's history: a large result (W1's
    per-sample gradients are 25 MB per call) then comes from fresh, page-faulting memory in
    some rotations and from the heap in others, ~3 ms either way on a 3 ms workload, whichever
    implementation happens to run. Fixed thresholds (1 GiB: heap memory, kept) take that out
    of the comparison. Returns what was done (the report's machine section says it)."""
    if not sys.platform.startswith("linux"):
        return "not Linux: malloc left as it is"
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        return "no glibc mallopt: malloc left as it is"
    return "glibc mmap/trim thresholds fixed at 1 GiB" if ok else "mallopt refused: malloc left as it is"


MALLOC = _fix_malloc_thresholds()


def _huge_pages() -> str:
    """What the report says about torch's use of transparent huge pages (see the top)."""
    if _THP_PRESET:
        return "torch imported before the harness: its allocator left as it is"
    if os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":
        return f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')!r}: no huge pages requested"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "huge pages requested (THP_MEM_ALLOC_ENABLE=1); the kernel's THP mode unknown"
    if mode == "never":
        return "huge pages requested, but the kernel's THP mode is 'never': 4 KB pages"
    return f"torch's allocations of 2 MB and more on transparent huge pages (THP mode '{mode}')"


HUGE_PAGES = _huge_pages()


class CheckFailed(AssertionError):
    """An implementation's result disagrees with the reference."""


@dataclass
class Impl:
    """One implementation of a workload: ``fn()`` runs it (no arguments; close over
    the inputs). ``status`` is None when it is runnable, else why it is not
    ("skipped: ...", "CHECK FAILED: ...", "ERROR: ...")."""

    name: str
    fn: Callable | None
    status: str | None = None
    note: str = ""
    convert: Callable | None = None  # applied to the result before checking (e.g. JAX -> torch)
    around: Callable | None = None  # a context manager factory entered around each timed batch of calls


@dataclass
class Timing:
    median_s: float
    samples: list = field(default_factory=list)
    inner: int = 1


def leaves(x):
    """A result as a flat list of tensors (dicts in insertion order)."""
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]


def check_close(got, ref, name: str, ref_name: str, rtol=1e-4, atol_scale=1e-5):
    """assert_close over the leaves, with an absolute tolerance scaled by the size of
    the reference values (float32 results from different summation orders)."""
    g, r = leaves(got), leaves(ref)
    if len(g) != len(r):
        raise CheckFailed(f"{name}: {len(g)} result tensors, reference {ref_name} has {len(r)}")
    for i, (a, b) in enumerate(zip(g, r)):
        a = a.detach()
        b = b.detach()
        scale = float(b.abs().max()) if b.numel() else 0.0
        try:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol_scale * (1.0 + scale))
        except AssertionError as e:
            msg = str(e).strip().splitlines()
            raise CheckFailed(f"{name} vs {ref_name}, result #{i}: " + " | ".join(m for m in msg if m)) from None


def fallback_counts() -> dict:
    """A copy of pyfunctorch's loop-fallback counters (empty if unavailable)."""
    try:
        from pyfunctorch import batched

        return dict(getattr(batched, "FALLBACK_COUNTS", {}))
    except Exception:  # pragma: no cover - library internals changed
        return {}


def fallback_note(before: dict, after: dict) -> str:
    used = {str(op): n - before.get(op, 0) for op, n in after.items() if n - before.get(op, 0) > 0}
    if not used:
        return ""
    return "loop fallback: " + ", ".join(f"{k.replace('aten.', '')}" for k in sorted(used))


def run_checked(impls: list[Impl], ref_name: str, *, loud=print) -> None:
    """Run every runnable implementation once and compare with the reference
    implementation's result. Disagreeing or crashing implementations get a status
    and are excluded from timing. Records pyfunctorch loop-fallback use in ``note``.
    If the reference itself fails, every implementation is marked."""
    ref = next((i for i in impls if i.name == ref_name), None)
    if ref is None or ref.fn is None:
        raise ValueError(f"reference {ref_name} missing")
    try:
        ref_out = ref.fn()
    except Exception as e:  # the reference must work
        ref.status = f"ERROR: {type(e).__name__}: {_first_line(e)}"
        for i in impls:
            if i is not ref and i.status is None:
                i.status = "not checked (reference failed)"
        loud(f"!!! reference {ref_name} FAILED: {ref.status}")
        return
    for impl in impls:
        if impl is ref or impl.status is not None:
            continue
        before = fallback_counts()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = impl.fn()
            if impl.convert is not None:
                out = impl.convert(out)
            check_close(out, ref_out, impl.name, ref_name)
        except CheckFailed as e:
            impl.status = f"CHECK FAILED: {e}"
            loud(f"!!! CHECK FAILED, row aborted: {e}")
        except Exception as e:
            impl.status = f"ERROR: {type(e).__name__}: {_first_line(e)}"
            loud(f"!!! {impl.name} raised, row aborted: {impl.status}")
        note = fallback_note(before, fallback_counts())
        if note:
            impl.note = (impl.note + "; " if impl.note else "") + note


def _first_line(e: BaseException, n=160) -> str:
    s = str(e).strip().splitlines()
    s = s[0] if s else ""
    return s[:n]


def _time_once(fn, inner: int, around=None) -> float:
    if around is not None:  # (e.g. pyfunctorch.hold_entry_points: a loop of calls inside one block)
        with around():
            return _time_once(fn, inner)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def measure(
    impls: list[Impl],
    *,
    target_s: float = 0.02,
    min_rounds: int = 5,
    max_rounds: int = 31,
    budget_s: float = 10.0,
) -> dict[str, Timing]:
    """Paired, rotated rounds over the runnable implementations. Returns per-impl
    Timing (median per-call seconds, per-round samples in round order, inner)."""
    runnable = [i for i in impls if i.status is None and i.fn is not None]
    if not runnable:
        return {}
    inner = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for impl in runnable:  # warm up twice, then calibrate
            impl.fn()
            t = _time_once(impl.fn, 1, impl.around)
            t = min(t, _time_once(impl.fn, 1, impl.around))
            inner[impl.name] = max(1, int(round(target_s / max(t, 1e-7))))
        per_round = sum(inner[i.name] * _time_once(i.fn, 1, i.around) for i in runnable)
        # at least one full rotation, so every implementation runs in every position
        rounds = int(max(min_rounds, len(runnable), min(max_rounds, budget_s / max(per_round, 1e-9))))
        samples = {i.name: [] for i in runnable}
        n = len(runnable)
        for r in range(rounds):
            gc.collect()
            order = runnable[r % n :] + runnable[: r % n]
            for impl in order:
                samples[impl.name].append(_time_once(impl.fn, inner[impl.name], impl.around))
    return {k: Timing(statistics.median(v), v, inner[k]) for k, v in samples.items()}


def paired_ratio(timings: dict[str, Timing], a: str, b: str) -> float | None:
    """Median over rounds of t_a / t_b (same round)."""
    if a not in timings or b not in timings:
        return None
    ra = timings[a].samples
    rb = timings[b].samples
    return statistics.median(x / y for x, y in zip(ra, rb))


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def machine_info() -> dict:
    import platform

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        ncpu = os.cpu_count()
    except OSError:
        ncpu = os.cpu_count()
    try:
        import pyfunctorch

        pfv = getattr(pyfunctorch, "__version__", "?")
    except Exception:
        pfv = "not importable"
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": f"{cpu} ({ncpu} logical CPUs visible)",
        "threads": f"torch.get_num_threads()={torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        "malloc": MALLOC,
        "huge pages": HUGE_PAGES,
        "torch": torch.__version__,
        "pyfunctorch": pfv,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> tuple[int, list]:
    with OpCounter() as c:
        fn()
    return len(c.ops), c.ops


# -- cases and tables -----------------------------------------------------------------


@dataclass
class Case:
    """One workload configuration: implementations, which one is the correctness
    reference, and which ones the ratios are taken against."""

    workload: str
    config: str
    impls: list
    ref: str  # correctness reference (hand-batched where there is one, else torch.func)
    tf: str | None = "torch.func"  # "x torch.func" column
    hand: str | None = "hand-batched"  # "x hand-batched" column
    ops: int | None = None  # if set, also print µs per op (median / ops)
    timings: dict = field(default_factory=dict)

    def check(self, loud=print):
        run_checked(self.impls, self.ref, loud=loud)

    def time(self, **kw):
        self.timings = measure(self.impls, **kw)

    def failed(self) -> list[str]:
        """``workload [config] impl`` of every implementation that failed or errored."""
        return [f"{self.workload} [{self.config}] {i.name}" for i in self.impls
                if i.status and ("FAILED" in i.status or "ERROR" in i.status)]

    def summary(self) -> list[dict]:
        """One machine-readable row per implementation (run.py --json, cuda_suite)."""
        return [{"workload": self.workload.split()[0], "case": f"{self.workload} [{self.config}]",
                 "impl": i.name, "status": i.status or "ok", "note": i.note,
                 "median_s": self.timings[i.name].median_s if i.name in self.timings else None}
                for i in self.impls]

    def rows(self) -> list[list[str]]:
        out = []
        for impl in self.impls:
            t = self.timings.get(impl.name)
            status = impl.status
            if status is None and t is None:
                status = "checked only (not timed)"
            cells = [self.workload, self.config, impl.name]
            if t is None:
                cells += ["-"] * (4 if self.ops else 3)
            else:
                cells.append(fmt_time(t.median_s))
                if self.ops:
                    cells.append(f"{t.median_s / self.ops * 1e6:.2f}")
                cells.append(fmt_ratio(paired_ratio(self.timings, impl.name, self.tf)) if self.tf else "-")
                cells.append(fmt_ratio(paired_ratio(self.timings, impl.name, self.hand)) if self.hand else "-")
            notes = [n for n in (status, impl.note) if n]
            cells.append("; ".join(notes).replace("|", "/"))
            out.append(cells)
        return out


HEADER = ["workload", "config", "implementation", "median", "x torch.func", "x hand-batched", "notes"]
HEADER_OPS = ["workload", "config", "implementation", "median / call", "µs / op", "x torch.func", "x hand-batched", "notes"]


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header, rows, max_note=70) -> str:
    rows = [r[:-1] + [r[-1][:max_note] + ("…" if len(r[-1]) > max_note else "")] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def cases_table(cases: list, markdown=False, **kw) -> str:
    with_ops = any(c.ops for c in cases)
    header = HEADER_OPS if with_ops else HEADER
    rows = []
    for c in cases:
        for r in c.rows():
            if with_ops and not c.ops:
                r = r[:4] + ["-"] + r[4:]
            rows.append(r)
    return markdown_table(header, rows) if markdown else text_table(header, rows, **kw)
