"""Block selection for sparse decoding: Quest-style key bounds, the SeerAttention-R gate (later),
and the budget / threshold rules that turn block scores into block indices for the kernels."""
