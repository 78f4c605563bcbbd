"""The package structure: no import cycles (function-local imports included), no import of
another package's underscore module, and no lowering imported by importing an op package."""

import ast
import gc
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("effjax", "pallas_kernels")


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for pkg in PACKAGES:
    for path in (ROOT / pkg).rglob("*.py"):
      parts = path.relative_to(ROOT).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      out[name] = path
  return out


def _parse(path: pathlib.Path) -> ast.Module:
  """ast.parse with the garbage collector paused: on CPython 3.11 a finaliser run by a
  collection in the middle of parsing (an earlier test's orbax coroutine, raising on close) broke
  the parser's recursion bookkeeping ("AST constructor recursion depth mismatch")."""
  enabled = gc.isenabled()
  gc.disable()
  try:
    return ast.parse(path.read_text())
  finally:
    if enabled:
      gc.enable()


def _imports(path: pathlib.Path, name: str, modules) -> set[str]:
  """Internal modules `name` imports anywhere in its file (top level or inside functions)."""
  is_pkg = path.name == "__init__.py"
  found = set()
  for node in ast.walk(_parse(path)):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = name.split(".")
        anchor = anchor[:len(anchor) - node.level + (1 if is_pkg else 0)]
        base = ".".join(anchor + ([base] if base else []))
      targets = [base] + [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    for t in targets:
      if t in modules:
        found.add(t)
  return found


def _graph():
  modules = _modules()
  return modules, {m: _imports(p, m, modules) - {m} for m, p in modules.items()}


def test_no_import_cycles():
  _, graph = _graph()
  # a module importing its own ancestor package (`from effjax import model`) is no cycle edge
  edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for t in sorted(edges[m]):
      if state.get(t) == 1:
        cycles.append(stack[stack.index(t):] + [t])
      elif t not in state:
        visit(t)
    stack.pop()
    state[m] = 2

  for m in sorted(edges):
    if m not in state:
      visit(m)
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_module_of_another_package():
  _, graph = _graph()
  bad = []
  for m, targets in graph.items():
    pkg = m if (ROOT / m.replace(".", "/") / "__init__.py").exists() else m.rsplit(".", 1)[0]
    for t in targets:
      leaf = t.rsplit(".", 1)[-1]
      if leaf.startswith("_") and leaf != "__init__" and t.rsplit(".", 1)[0] != pkg:
        bad.append(f"{m} imports {t}")
  assert not bad, "\n".join(bad)


def test_op_packages_import_no_lowering():
  """Importing every op package and the model must not import a Pallas lowering: a backend that
  JAX removes then costs only that backend (dispatch falls back)."""
  code = ("import sys\n"
          "import effjax.decoding, effjax.sparse.resa\n"
          "import pallas_kernels.decode_attention, pallas_kernels.extend_attention\n"
          "import pallas_kernels.sparse_decode, pallas_kernels.block_topk\n"
          "import pallas_kernels.combine_splits, pallas_kernels.causal_attention\n"
          "bad = [m for m in sys.modules if m.startswith(('jax.experimental.pallas.triton',\n"
          "       'jax.experimental.pallas.mosaic_gpu', 'jax.experimental.pallas.tpu',\n"
          "       'jax._src.pallas.triton', 'jax._src.pallas.mosaic_gpu.lowering',\n"
          "       'jax._src.pallas.mosaic.lowering'))]\n"
          "print(bad)\n"
          "assert not bad, bad\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr
