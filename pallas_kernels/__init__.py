"""Pallas kernels, one package per op: a plain-jnp reference and one module per backend.

    from pallas_kernels.sparse_decode import sparse_decode_attention
    o = sparse_decode_attention(q, k, v, lengths, idx, block_size=64, implementation=None)

Every op takes `implementation=None | name | sequence` (`dispatch.py`): None tries the platform's
default backends, then the XLA reference, which always runs. Backend modules (`reference.py`,
`pallas_triton.py`, `pallas_mosaic_gpu.py`, `pallas_mosaic_tpu.py`, `cudnn.py`) are imported only
when tried, so this package imports no lowering and needs neither grain nor tensorflow-datasets.
Tuned launch parameters live as data in `tuned/`.

Ops: `causal_attention` (training / prefill), `decode_attention`, `extend_attention` (F new
tokens over a cache), `sparse_decode` (`sparse_decode_attention` over selected KV blocks),
`block_topk` (top-k block selection), `combine_splits` (the split-K merge), `lowbit_decode`
(decode over a packed 4 / 2-bit KV cache), `lowbit_matmul` / `lut_matmul` (packed ternary /
n-bit weights: dequant and table-lookup matmuls), `flash_attention` (causal prefill that also
emits SeerAttention's block-level target), `block_sparse_attention` (prefill attention over
selected key blocks, forward and backward). Shared pieces:
`online_softmax.py` (the block update every jnp-in-kernel backend runs), `triton_splitk.py` (the
split-K Triton program and call), `launch.py` (launch-shape helpers), `checks.py`.
"""
