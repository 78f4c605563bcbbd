"""Pallas kernels, one module per op (reference + GPU/TPU implementations + config).

Convention (DESIGN.md): `pallas_kernels.<op>(..., implementation="auto" | "xla" | "pallas_triton" |
"pallas_mosaic_gpu" | "pallas_tpu", interpret=False, config=None)`, where `xla` is the plain-jnp
reference. This package must stay importable without grain / tensorflow-datasets.
"""
