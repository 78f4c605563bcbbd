import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

# Tests must not be slowed or skewed by a user's preallocation settings on GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
