import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

# Tests must not be slowed or skewed by a user's preallocation settings on GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# One persistent XLA compilation cache for the whole run (both xdist workers and every train.py /
# eval.py subprocess the tests start): the CLI tests compile the same tiny programs many times
# (~30% of their time). Keyed by the run, so it starts cold: no result depends on an earlier run.
# An explicitly set JAX_COMPILATION_CACHE_DIR is left alone.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
CACHE_DIR = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"effjax-test-xla-cache-{_RUN}"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(CACHE_DIR)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import pytest  # noqa: E402


def pytest_addoption(parser):
  parser.addoption("--full-grid", action="store_true", default=False,
                   help="interpreted kernel tests: every case in every dtype (the default suite "
                        "pairs each case with one dtype)")


def pytest_configure(config):
  # On a CPU backend (CI, interpret mode) XLA's optimisation passes cost more than they save on
  # the suite's small programs: compiled without them, the default suite runs ~35% faster. The
  # programs compute the same values (every comparison is to a reference, compiled alike); a
  # GPU backend keeps the optimisations (its tests check compiled kernels and HLO). An
  # explicitly set JAX_DISABLE_MOST_OPTIMIZATIONS is left alone; subprocesses inherit it.
  if "JAX_DISABLE_MOST_OPTIMIZATIONS" not in os.environ:
    import jax
    if jax.default_backend() == "cpu":
      os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
      jax.config.update("jax_disable_most_optimizations", True)
  if "jax" in sys.modules:            # imported before this file ran: apply the settings directly
    import jax
    for name, cast in (("jax_compilation_cache_dir", str),
                       ("jax_persistent_cache_min_compile_time_secs", float),
                       ("jax_persistent_cache_min_entry_size_bytes", int)):
      if name.upper() in os.environ:
        jax.config.update(name, cast(os.environ[name.upper()]))


def pytest_unconfigure(config):
  """The controller (or a run without xdist) removes the run's cache."""
  if not hasattr(config, "workerinput") and os.environ.get("JAX_COMPILATION_CACHE_DIR") == str(
      CACHE_DIR):
    import shutil
    shutil.rmtree(CACHE_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _ieee_f32_references_on_gpu(request):
  """The kernels' GPU tests (tests/kernels) run under float32 ("highest") matmul precision:
  XLA's float32 dots default to TF32 on a GPU (~1e-3 relative error), and the XLA computations
  the kernels are compared with must be IEEE float32 (the kernels themselves ask for it through
  `launch.dot_precision`). Model-level GPU tests (compiled-HLO checks) keep the defaults."""
  if (request.node.get_closest_marker("gpu") is None
      or pathlib.Path(str(request.node.fspath)).parent.name != "kernels"):
    yield
    return
  import jax
  with jax.default_matmul_precision("highest"):
    yield
