"""Low-bit formats: the packed 4 / 2-bit KV cache (`kv`)."""

from effjax.quant.kv import QuantKV, init_cache

__all__ = ["QuantKV", "init_cache"]
