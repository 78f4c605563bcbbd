import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

# Tests must not be slowed or skewed by a user's preallocation settings on GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


import pytest  # noqa: E402


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
