"""int32-only dynamic packing (count only keys inside the bracket, so fields shrink
with the bracket and more thresholds fit one int32 pass) -- mean / max weighted passes against
the built ternary search, 300 rows per case, exactness asserted on every row.

  cd experiments/topk_search && python3 dyn_pack32.py
"""
import sys; sys.path.insert(0, __import__('os').path.dirname(__file__) or '.')
import numpy as np
from sim import *
def ks32(S):
    while not S.done():
        S.count(keysplit(S, S.capacity(False)), wide=False)
def ks32_rmax(S):
    if S.nvalid <= S.k: S.forced_done=True; return
    while not S.done():
        if S.r == 1:
            S.lo = S.kmax(); break
        S.count(keysplit(S, S.capacity(False)), wide=False)
strats = {
 'ternary': (lambda S: strat_ternary(S), False),
 'ks32 dyn': (ks32, True),
 'ks32 dyn rmax': (ks32_rmax, True),
 'AD-mad 32 dyn': (lambda S: strat_adaptive(S, Params(stats="mad", wide=False)), True),
 'AD-mad 32 fixed': (lambda S: strat_adaptive(S, Params(stats="mad", wide=False)), False),
}
rng = np.random.default_rng(1)
for d in ['gauss','exp','cauchy','bf16','uniform','bimodal']:
  for k in (64, 205):
    rows = [gen(d, 2048, rng) for _ in range(300)]
    out = []
    for name,(fn,dyn) in strats.items():
        cs = []
        for r in rows:
            S = Search(r, 2048, k, dyn_pack=dyn); fn(S)
            assert np.array_equal(S.select(), S.reference())
            cs.append(S.cost)
        out.append(f"{name}={np.mean(cs):.1f}/{np.max(cs):.0f}")
    print(d, k, ' '.join(out))
