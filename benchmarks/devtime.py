"""Device-time measurement shared by the benchmarks (DESIGN.md's method, two ways).

1. **Wall time of many calls inside one jit** (`build_many` + `wall_seconds`): a `lax.scan`
   (partly unrolled) over a stack of distinct inputs times a Python-unrolled loop over distinct
   caches, every call's inputs behind an optimization barrier, so nothing can be hoisted or
   shared between calls and dispatch is amortised; the jit's wall time / calls.
   What it still contains: the loop's per-trip cost (XLA:GPU reads the while-loop predicate back
   on the host every trip) and any gap in which the GPU waits for the host to launch the next
   kernel -- a chain of short kernels can cost more than its parts this way.
2. **Kernel time from a profiler trace** (`trace_summary`): the same jitted function run once
   under `jax.profiler.trace`; the durations of the events on the GPU's stream lines are summed
   (`busy`: the time the device spent executing, gaps excluded) and the first-start to last-end
   extent is taken (`span`: gaps included), both per call. Kernel names give the breakdown.

`floor_bandwidth` measures the card's read bandwidth (the byte floor's denominator) in the same
process, so results on different cards (H100 ~3.0 TB/s, H200 ~4.5 TB/s) use their own.
"""

from __future__ import annotations

import collections
import functools
import glob
import gzip
import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from jax import lax

# Device-process lines that aggregate kernels (module / op spans) rather than being kernels.
_AGGREGATE_LINES = ("XLA Modules", "XLA Ops", "Steps", "TensorFlow Ops", "Framework Ops",
                    "Launch Stats", "Source code")


def build_many(call, xs, caches, unroll: int = 1, compiler_options: dict | None = None,
               shared=None, barrier: bool = True):
  """jit of: for every x in xs (a scan, unrolled `unroll` times), for every cache in caches
  (unrolled), acc += call(x, cache) -- or call(x, cache, shared, i) for the i-th cache when
  `shared` is given: arrays several calls read (e.g. K/V copies that many gate caches rotate
  over), passed once so that XLA's memory estimate counts them once. Returns the jitted
  function of (xs, caches, shared), compiled with `compiler_options` (XLA options, e.g.
  decoding.DECODE_COMPILER_OPTIONS) if given.

  Every call reads its inputs anew: each call's cache (and the shared arrays) pass through an
  optimization barrier together with that call's x, so XLA can neither hoist work on a cache out
  of the loop nor merge the calls of one loop trip that read the same cache (its dot merger
  otherwise fused the XLA reference's dots across calls, which then read the cache once for
  several calls: faster than the byte floor). barrier=False is that earlier harness, kept to
  compare results measured with it."""

  @functools.partial(jax.jit, compiler_options=compiler_options)
  def many(xs, caches, shared):
    def body(acc, x):
      for i, c in enumerate(caches):
        if shared is None:
          if barrier:
            c, _ = lax.optimization_barrier((c, x))
          y = call(x, c)
        else:
          sh = shared
          if barrier:
            (c, sh), _ = lax.optimization_barrier(((c, shared), x))
          y = call(x, c, sh, i)
        acc = acc + y.astype(jnp.float32)
      return acc, None
    # Summing the outputs keeps every call live at the cost of one small add per call.
    x0 = jax.tree.map(lambda a: a[0], xs)
    if shared is None:
      out = jax.eval_shape(call, x0, caches[0])
    else:
      out = jax.eval_shape(lambda x, c, s: call(x, c, s, 0), x0, caches[0], shared)
    return lax.scan(body, jnp.zeros(out.shape, jnp.float32), xs, unroll=unroll)[0]

  return lambda xs, caches, shared=shared: many(xs, caches, shared)


def n_calls(xs, caches) -> int:
  return jax.tree.leaves(xs)[0].shape[0] * len(caches)


def wall_seconds(many, xs, caches, windows: int) -> float:
  """Median over `windows` of the jit's wall time / calls (after a compile + warm-up call)."""
  jax.block_until_ready(many(xs, caches))
  ts = []
  for _ in range(windows):
    t0 = time.perf_counter()
    jax.block_until_ready(many(xs, caches))
    ts.append((time.perf_counter() - t0) / n_calls(xs, caches))
  return statistics.median(ts)


def _line_names(events) -> tuple[dict, dict]:
  procs = {e.get("pid"): str(e.get("args", {}).get("name", "")) for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e.get("pid"), e.get("tid")): str(e.get("args", {}).get("name", "")) for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  return procs, threads


def summarize_trace(trace: dict | list, calls: int, top: int = 40) -> dict:
  """Per-call device time from a Perfetto/Chrome trace.

  Device processes are those named like a device ("/device:GPU:0"); on them, the kernel lines
  are the threads named "Stream ..." (or, if none is, every line except the aggregate ones:
  "XLA Modules", "XLA Ops", ...). Returns {"device": bool, "busy_us_per_call",
  "span_us_per_call", "lines": [thread names used], "events": [{"name", "count", "total_us",
  "per_call_us"}...]} (largest first; `sum_per_call_us` = busy, kept for older readers). With no
  device process (CPU) every host event is counted and the numbers say little.
  """
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  procs, threads = _line_names(events)
  device_pids = {pid for pid, n in procs.items() if "/device:" in n or "GPU" in n}
  if device_pids:
    dev_lines = {k: n for k, n in threads.items() if k[0] in device_pids}
    stream = {k for k, n in dev_lines.items() if "stream" in n.lower()}
    use_lines = stream or {k for k, n in dev_lines.items()
                           if not any(a in n for a in _AGGREGATE_LINES)}
    # events on a device pid whose thread never got a name: counted only if no line is named
    keep = (lambda e: (e.get("pid"), e.get("tid")) in use_lines) if use_lines else \
        (lambda e: e.get("pid") in device_pids)
  else:
    use_lines = set()
    keep = lambda e: True
  count, total = collections.Counter(), collections.Counter()
  first, last = float("inf"), float("-inf")
  for e in events:
    if e.get("ph") == "X" and keep(e):
      dur = float(e.get("dur", 0.0))
      count[e["name"]] += 1
      total[e["name"]] += dur
      ts = float(e.get("ts", 0.0))
      first, last = min(first, ts), max(last, ts + dur)
  c = max(calls, 1)
  busy = sum(total.values()) / c
  rows = [{"name": n, "count": count[n], "total_us": total[n], "per_call_us": total[n] / c}
          for n, _ in total.most_common(top)]
  return {"device": bool(device_pids), "busy_us_per_call": busy, "sum_per_call_us": busy,
          "span_us_per_call": (last - first) / c if total else 0.0,
          "lines": sorted(threads[k] for k in use_lines), "events": rows}


def trace_summary(fn, args: tuple, calls: int, top: int = 40) -> dict:
  """Runs fn(*args) (already compiled: call it once before) under the profiler and returns
  `summarize_trace` of it (its `top` largest event names), `calls` being the number of kernel
  calls one run makes."""
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      jax.block_until_ready(fn(*args))
    paths = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
    if not paths:
      raise RuntimeError(f"the profiler wrote no perfetto_trace.json.gz under {d}")
    with gzip.open(paths[0]) as f:
      return summarize_trace(json.load(f), calls, top)


def read_bandwidth(nbytes: int = 4 << 30) -> float:
  """Bytes per second of one large read (a float32 sum over a bf16 buffer), from the profiler's
  kernel time of that reduction (wall time if no device line is traced): the ceiling of a
  read-bound kernel such as decode attention. (An x -> x * a + b copy in a fori_loop measured
  only 2.9 TB/s of read + write on an H200 where cuDNN decode read 4.5 TB/s: not a ceiling.)"""
  n = nbytes // 2
  x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
  f = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
  jax.block_until_ready(f(x))
  best = 0.0
  for _ in range(3):
    t = trace_summary(f, (x,), 1)
    secs = t["busy_us_per_call"] * 1e-6 if t["device"] else 0.0
    if secs <= 0:
      t0 = time.perf_counter()
      jax.block_until_ready(f(x))
      secs = time.perf_counter() - t0
    best = max(best, 2 * n / secs)
  return best


# H100 SXM measured copy bandwidth; the floor when no GPU is there.
H100_COPY_TBPS = 3.0


def floor_bandwidth(override: float | None = None) -> tuple[float, str]:
  """(TB/s, where it came from) for byte floors: `override` if given, else the read bandwidth
  measured now on a GPU (`read_bandwidth`), else the H100's measured 3.0 TB/s (CPU runs: smoke tests only)."""
  if override:
    return float(override), "given on the command line"
  if jax.default_backend() == "gpu":
    return read_bandwidth() / 1e12, "read bandwidth of a 4 GiB reduction measured in this run"
  return H100_COPY_TBPS, "H100 copy bandwidth (no GPU here: nothing measured)"


# A row may not beat its byte floor: reading its bytes at the measured read bandwidth is the
# fastest any implementation can be. Beyond this margin (the bandwidth is measured, with noise)
# the harness let calls share work, and the row is invalid.
FLOOR_TOLERANCE = 1.03


def floor_violations(rows: list[dict]) -> list[str]:
  """Rows whose wall or kernel time beats their byte floor (`frac_of_floor` /
  `trace_frac_of_floor` above FLOOR_TOLERANCE): each as one line naming the row."""
  bad = []
  for r in rows:
    for key in ("frac_of_floor", "trace_frac_of_floor"):
      f = r.get(key)
      if f is not None and f > FLOOR_TOLERANCE:
        what = ", ".join(f"{k}={r[k]}" for k in ("B", "S", "impl", "plan") if k in r)
        bad.append(f"{what}: {key} = {f:.3f} > {FLOOR_TOLERANCE} (faster than reading its bytes)")
  return bad


def timing_fields(m: dict, nbytes: float, floor_tbps: float, peer: dict | None = None,
                  peer_name: str = "") -> dict:
  """The timing columns of a result row from a `measure` result m: ms, bytes_read, floor_ms,
  frac_of_floor, the trace's (trace_busy_ms, kernels, trace_frac_of_floor, or trace_error) when
  it ran, and speedup_vs_<peer_name> (+ trace_speedup_vs_<peer_name>) against the peer's
  measurement `peer` when given."""
  floor = nbytes / (floor_tbps * 1e12)
  r = {"ms": m["s"] * 1e3, "bytes_read": nbytes, "floor_ms": floor * 1e3,
       "frac_of_floor": floor / m["s"]}
  if "trace_error" in m:
    r["trace_error"] = m["trace_error"]
  elif "busy_s" in m:
    r.update(trace_busy_ms=m["busy_s"] * 1e3, kernels=m["kernels"],
             trace_frac_of_floor=floor / m["busy_s"] if m["busy_s"] else None)
  if peer:
    r[f"speedup_vs_{peer_name}"] = peer["s"] / m["s"]
    if m.get("busy_s") and peer.get("busy_s"):
      r[f"trace_speedup_vs_{peer_name}"] = peer["busy_s"] / m["busy_s"]
  return r
