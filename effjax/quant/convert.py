"""A trained BitNet b1.58 (`model.linear_impl=bitlinear`) checkpoint as a packed ternary inference
model, saved and loaded with a verified manifest.

    python -m effjax.quant.convert --run runs/bitnet_small [--step N] [--format i2_s] [--out DIR]
        [--fuse-projections]     # i2_t: q / k / v and gate / up as one weight each

Every projection's fp32 master kernel becomes its ternary codes and absmean scale (the quantiser
training used, `effjax.quant.ternary.absmean_ternary`) packed in one of the formats of
`pallas_kernels.lowbit_matmul.layout` (i2_s, i2_t -- the GPU's fastest decoding path --, tl1, tl2,
bitplanes); norms and embeddings stay as they are. The packed model's config has `model.linear_impl=ternary_packed`: the layer computes
BitLinear's forward on the integer path, so `effjax.model.forward`, `decoding.generate` and the
evaluations run on it unchanged. The output directory holds `config.yaml`, `weights.npz` and
`effjax_manifest.json` (size and SHA-256 of each file, checked on load).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from effjax.checkpoint import CheckpointError, atomic_write_text, verify, write_manifest
from effjax.config import Config, from_dict, load_config, to_dict
from effjax.quant.ternary import absmean_ternary
from pallas_kernels.lowbit_matmul import layout

LINEAR_KEYS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# projections of one input packed as one weight (`pack_model(fuse=True)`, i2_t): the layer runs
# one matmul and splits its columns (effjax/model/transformer.py)
FUSED_KEYS = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}


def pack_model(cfg: Config, params: dict, fmt: str = "i2_s",
               fuse: bool = False) -> tuple[Config, dict]:
  """(config with model.linear_impl=ternary_packed, params whose projections are PackedWeight).
  fuse (i2_t only): q / k / v as one weight "wqkv" and gate / up as "w_gate_up", with per-column
  scales (`layout.concat_i2t`): two matmuls a layer fewer, the same outputs bit for bit."""
  if cfg.model.linear_impl != "bitlinear":
    raise ValueError(f"only a bitlinear model packs into ternary weights, this one has "
                     f"model.linear_impl={cfg.model.linear_impl!r}")
  if fmt not in layout.FORMATS:
    raise ValueError(f"format must be one of {', '.join(layout.FORMATS)}, got {fmt!r}")
  if fuse and fmt != "i2_t":
    raise ValueError(f"fused projections take the i2_t format (per-column scales), got {fmt!r}")

  def pack(kernel):
    codes, scale = absmean_ternary(kernel)
    codes = codes.astype(jnp.int8)
    if fmt == "bitplanes":
      return layout.pack_ternary_bitplanes(codes, scale)
    return layout.pack_ternary(codes, scale, fmt)

  out = {}
  for name, sub in params.items():
    if name.startswith("layers"):
      if name == "layers":
        raise ValueError("scan-stacked layers (model.scan_layers) are not packed; train unrolled")
      layer = {k: (pack(v["kernel"]) if k in LINEAR_KEYS else v) for k, v in sub.items()}
      if fuse:
        for key, parts in FUSED_KEYS.items():
          layer[key] = layout.concat_i2t([layer.pop(k) for k in parts])
      out[name] = layer
    else:
      out[name] = sub
  new = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, linear_impl="ternary_packed"))
  return new, out


def save_packed(out_dir: str | pathlib.Path, cfg: Config, params: dict) -> pathlib.Path:
  """Writes config.yaml, weights.npz and the manifest (last: a directory without one is an
  incomplete save). Refuses a directory that already holds a packed model."""
  out = pathlib.Path(out_dir)
  if (out / "weights.npz").exists():
    raise FileExistsError(f"{out} already holds a packed model; choose another --out")
  out.mkdir(parents=True, exist_ok=True)
  flat = {}
  for name, sub in params.items():
    if isinstance(sub, dict) and name.startswith("layers"):
      for k, v in sub.items():
        if isinstance(v, layout.PackedWeight):
          d = v.as_dict()
          flat[f"{name}/{k}/meta"] = np.frombuffer(json.dumps(
              {m: d[m] for m in ("format", "shape", "block", "bits")}).encode(), np.uint8)
          for arr in ("packed", "scale", "signs", "zero"):
            if arr in d:
              flat[f"{name}/{k}/{arr}"] = d[arr]
        else:
          flat[f"{name}/{k}/scale"] = np.asarray(v["scale"])
    else:
      for k, v in (sub.items() if isinstance(sub, dict) else [("", sub)]):
        flat[f"{name}/{k}"] = np.asarray(v)
  with open(out / "weights.npz", "wb") as f:
    np.savez(f, **flat)
  atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
  write_manifest(out)
  return out


def load_packed(path: str | pathlib.Path) -> tuple[Config, dict]:
  """(config, params) of a packed model, after verifying every file against the manifest."""
  path = pathlib.Path(path)
  verify(path)
  cfg = from_dict(yaml.safe_load((path / "config.yaml").read_text()))
  params: dict = {}
  with np.load(path / "weights.npz") as z:
    items = {k: z[k] for k in z.files}
  packed: dict = {}
  for key, arr in items.items():
    parts = key.split("/")
    if parts[0].startswith("layers") and (parts[1] in LINEAR_KEYS or parts[1] in FUSED_KEYS):
      packed.setdefault((parts[0], parts[1]), {})[parts[2]] = arr
    elif parts[0].startswith("layers"):
      params.setdefault(parts[0], {})[parts[1]] = {"scale": jnp.asarray(arr)}
    elif parts[1]:
      params.setdefault(parts[0], {})[parts[1]] = jnp.asarray(arr)
    else:
      params[parts[0]] = jnp.asarray(arr)
  for (layer, k), d in packed.items():
    meta = json.loads(bytes(d.pop("meta")).decode())
    params.setdefault(layer, {})[k] = layout.PackedWeight.from_dict({**meta, **d})
  return cfg, params


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", required=True, help="a training run directory of a bitlinear model")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--format", default="i2_s", choices=list(layout.FORMATS))
  ap.add_argument("--fuse-projections", action="store_true",
                  help="i2_t: q / k / v and gate / up as one weight each (per-column scales)")
  ap.add_argument("--out", default=None, help="output directory (default: <run>/packed_<format>)")
  ap.add_argument("--eval", action="store_true",
                  help="also report the loss of the trained and the packed model on eval.splits")
  args = ap.parse_args(argv)
  from effjax import evaluation
  run = pathlib.Path(args.run)
  out = pathlib.Path(args.out) if args.out else run / f"packed_{args.format}"
  try:
    if (out / "weights.npz").exists():
      raise FileExistsError(f"{out} already holds a packed model; choose another --out")
    if args.fuse_projections and args.format != "i2_t":
      raise ValueError(f"--fuse-projections takes --format i2_t, got {args.format}")
    cfg = load_config(run / "config.yaml")
    params, step = evaluation.load_params(cfg, run, args.step)
    pcfg, pparams = pack_model(cfg, params, args.format, fuse=args.fuse_projections)
    save_packed(out, pcfg, pparams)
  except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pparams))
  print(f"packed step {step} of {run} as {args.format}: {n / 2**20:.2f} MiB of weights -> {out}")
  if args.eval:
    pcfg, pparams = load_packed(out)   # what was written, verified
    for name, (c, p) in (("trained (bitlinear)", (cfg, params)), ("packed", (pcfg, pparams))):
      for split, r in evaluation.evaluate_splits(c, p).items():
        print(f"{name:>20} {split}: loss {r['loss']:.4f} nats/token | {r['bits_per_byte']:.4f} "
              f"bits/byte | first {r['examples']} of {r['of_examples']} examples")
  return 0


if __name__ == "__main__":
  sys.exit(main())
