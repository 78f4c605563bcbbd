"""Pallas kernels, one module per op (reference + GPU/TPU implementations + config).

Convention (DESIGN.md): `pallas_kernels.<op>(..., implementation="auto" | "xla" | "pallas_triton" |
"pallas_mosaic_gpu" | "pallas_tpu", interpret=False, config=None)`, where `xla` is the plain-jnp
reference. This package must stay importable without grain / tensorflow-datasets.

Ops: `decode_attention` (split-K flash decoding over a ragged KV cache) and `sparse_decode`
(the same over selected KV blocks), sharing `_splitk.py` (online softmax, split combine, the
Triton pallas_call) and `_tpu_decode.py` (the Mosaic TPU kernel both use).
"""
