"""The one dispatch helper every op uses: `implementation=None | name | sequence of names`.

    _op = Op("sparse_decode_attention", __package__,
             backends={"xla": "reference", "pallas_triton": "pallas_triton", ...},
             defaults={"gpu": ("pallas_triton", "pallas_mosaic_gpu"), "tpu": ("pallas_mosaic_tpu",)})
    out = _op(implementation, *args, config=config, interpret=interpret, **kwargs)

- `None` (or "auto") tries the platform's default order, then the XLA reference: the reference is
  always the last resort, so an op runs wherever JAX runs.
- A name runs that backend only; a sequence tries its names in order.
- A backend is a module of the op's package (imported only when tried, so a missing lowering --
  e.g. Pallas Triton once JAX removes it -- costs only that choice) holding a function named like
  the op. It raises `NotSupported` when it cannot take the inputs (wrong platform, a shape its
  tiles cannot hold); dispatch then moves to the next name. When none applies, the error lists
  why each refused.
- `config`: a backend module declares its launch-parameter dataclass as `CONFIG`; the config is
  handed to the backend whose `CONFIG` it is an instance of (others get None and use their tuned
  defaults). A config that fits no backend named alone is an error, not silently ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import threading
from typing import Any, Mapping, Sequence

import jax

AUTO = "auto"
_TARGET = threading.local()


def platform() -> str:
  """The platform dispatch decides for: JAX's default backend ("gpu" / "tpu" / "cpu"), or the one
  `lowering_for` names."""
  return getattr(_TARGET, "platform", None) or jax.default_backend()


@contextlib.contextmanager
def lowering_for(name: str):
  """Decide for platform `name` while tracing here, e.g. to export or lower a GPU program on a
  CPU host (`jax.export(..., platforms=["cuda"])`)."""
  old = getattr(_TARGET, "platform", None)
  _TARGET.platform = name
  try:
    yield
  finally:
    _TARGET.platform = old


class NotSupported(ValueError):
  """A backend cannot take these inputs here (or its lowering is missing)."""


@dataclasses.dataclass(frozen=True)
class Op:
  """An op's implementations. backends: implementation name -> module of `package` holding the
  function `name`; defaults: platform ("gpu" / "tpu" / "cpu") -> names tried before "xla"."""
  name: str
  package: str
  backends: Mapping[str, str]
  defaults: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

  @property
  def implementations(self) -> tuple[str, ...]:
    """Accepted `implementation` names ("auto" = None included)."""
    return (AUTO, *self.backends)

  def order(self, implementation: None | str | Sequence[str]) -> tuple[str, ...]:
    """The names to try, in order; unknown names raise ValueError."""
    if implementation is None or implementation == AUTO:
      names = tuple(self.defaults.get(platform(), ())) + ("xla",)
    elif isinstance(implementation, str):
      names = (implementation,)
    else:
      names = tuple(implementation)
      if not names:
        raise ValueError(f"{self.name}: implementation must name at least one backend")
    for n in names:
      if n not in self.backends:
        raise ValueError(f"{self.name}: implementation must be one of {self.implementations} "
                         f"(or a sequence of them), got {n!r}")
    return names

  def module(self, name: str):
    """The backend module of `name`; NotSupported if it cannot be imported here."""
    try:
      return importlib.import_module(f"{self.package}.{self.backends[name]}")
    except ImportError as e:
      raise NotSupported(f"cannot import its lowering here ({type(e).__name__}: {e})") from e

  def __call__(self, implementation, *args, config: Any = None, **kwargs):
    names = self.order(implementation)
    reasons = []
    for name in names:
      try:
        mod = self.module(name)
        own = getattr(mod, "CONFIG", None)
        fits = config is not None and own is not None and isinstance(config, own)
        if config is not None and not fits and len(names) == 1:
          raise ValueError(f"{self.name}: config {type(config).__name__} is not the "
                           f"{name} backend's config ({getattr(own, '__name__', 'none')})")
        kw = dict(kwargs, config=config if fits else None) if own is not None else kwargs
        return getattr(mod, self.name)(*args, **kw)
      except NotSupported as e:
        reasons.append(f"{name}: {e}")
    if len(names) == 1:
      raise NotSupported(f"{self.name}: implementation {reasons[0]}")
    raise NotSupported(f"{self.name}: no implementation can take these inputs -- "
                       + "; ".join(reasons))


def require_platform(name: str, interpret: bool, what: str) -> None:
  """NotSupported unless the target platform is `name` ("gpu" / "tpu") or the kernel is
  interpreted."""
  if not interpret and platform() != name:
    raise NotSupported(f"{what} needs a {name.upper()} (or interpret=True); this process runs "
                       f"on {platform()}")
