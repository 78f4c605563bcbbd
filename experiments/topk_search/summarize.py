import json, sys, numpy as np
R = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "results.json"))
names = list(dict.fromkeys(r["strategy"] for r in R))
def get(s, pooled=True, **kw):
    # pooled columns leave out k=205 with 1900 invalid (148 valid <= k: the adaptive strategies
    # skip the search by the nvalid <= k shortcut, which the ternary could use as well)
    return [r for r in R if r["strategy"] == s and all(r[a] == b for a, b in kw.items())
            and not (pooled and r["k"] == 205 and r["invalid"] == 1900)]
cols = [("gauss", dict(dist="gauss", N=2048)), ("exp", dict(dist="exp")), ("cauchy", dict(dist="cauchy")),
        ("unif", dict(dist="uniform")), ("bimod", dict(dist="bimodal")), ("bf16", dict(dist="bf16")),
        ("ties90", dict(dist="ties90")), ("allEq", dict(dist="allequal")),
        ("offset", dict(dist="offset")), ("huge", dict(dist="huge")), ("nasty", dict(dist="nasty")),
        ("N512", dict(dist="gauss", N=512)), ("N8192", dict(dist="gauss", N=8192))]
print("per cell: mean / p99 / max weighted passes, pooled over k in {64,205} x invalid {0,1000,1900} (not k205+1900)")
print("strategy".ljust(20) + "".join(c[0].rjust(16) for c in cols))
for s in names:
    line = s.ljust(20)
    for c, kw in cols:
        rs = get(s, **kw)
        line += f"{np.mean([r['mean'] for r in rs]):5.1f}/{max(r['p99'] for r in rs):4.1f}/{max(r['max'] for r in rs):4.1f}".rjust(16)
    print(line)
print()
print("Gaussian N=2048 by (k, invalid): mean / p99 / max")
hdr = [(k, inv) for k in (64, 205) for inv in (0, 1000, 1900)]
print("strategy".ljust(20) + "".join(f"k{k}/inv{inv}".rjust(16) for k, inv in hdr))
for s in names:
    line = s.ljust(20)
    for k, inv in hdr:
        r = get(s, pooled=False, dist="gauss", N=2048, k=k, invalid=inv)[0]
        line += f"{r['mean']:5.2f}/{r['p99']:4.1f}/{r['max']:4.1f}".rjust(16)
    print(line)
print()
print("overall (all configs): mean of means, max of max; raw passes mean")
for s in names:
    rs = get(s)
    print(s.ljust(20), f"{np.mean([r['mean'] for r in rs]):.2f}", f"{max(r['max'] for r in rs):.1f}", f"raw={np.mean([r['raw'] for r in rs]):.2f}")
