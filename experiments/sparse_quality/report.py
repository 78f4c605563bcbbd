"""REPORT.md and the plots (retrieval.png, drift.png, rectify_phase.png) of the sparse-quality
experiment, from its results.json document (with the low-bit KV cache tables of the kv phase)."""

from __future__ import annotations

import pathlib


def _color(name: str) -> str:
  """Plot color of a drift / retrieval row by selector."""
  return ("C4" if name.startswith("quest-l") else "C5" if name.startswith("gate-l") else
          "C0" if name.startswith("quest") else "C2" if name.startswith("gate-f32") else
          "C3" if name.startswith("gate-f8") else "C1")


def _fmt(x, nd=3):
  return "-" if x is None else f"{x:.{nd}f}"


def _retrieval_table(acc: dict, digits: dict, budgets: list[int], selectors: list[str]) -> list[str]:
  lines = ["| selector | " + " | ".join(f"{b} tokens" for b in budgets) + " |",
           "|---|" + "---|" * len(budgets)]
  lines.append("| dense | " + " | ".join(
      f"{acc['dense']:.2f} ({digits['dense']:.2f})" for _ in budgets) + " |")
  for s in selectors:
    cells = [f"{acc[f'{s}@{b}']:.2f} ({digits[f'{s}@{b}']:.2f})" if f"{s}@{b}" in acc else "-"
             for b in budgets]
    lines.append(f"| {s} | " + " | ".join(cells) + " |")
  return lines


def write_markdown(doc: dict, out: pathlib.Path) -> None:
  a, tr, ev = doc["args"], doc.get("train") or {}, doc.get("eval") or {}
  m = doc["model"]
  lines = [
      "# Sparse decoding quality on a trained long-context model",
      "",
      f"Card: {doc['device']} ({doc['backend']}), JAX {doc['jax']}, {doc['date']}."
      + (" **Smoke run (tiny sizes): the numbers mean nothing.**" if a.get("smoke") else ""),
      "",
      "## Set-up",
      "",
      f"- **Model:** `{a['config']}`, {m['params'] / 1e6:.1f}M params (d {m['d_model']}, "
      f"{m['n_layers']} layers, {m['n_heads']} query / {m['n_kv_heads']} kv heads, head dim "
      f"{m['head_dim']}), byte tokenizer, {m['compute_dtype']}.",
      f"- **Training:** {tr.get('steps_done', '?')} of {tr.get('steps_planned', '?')} planned steps x "
      f"batch {a['batch']} x seq {a['seq']} = {tr.get('tokens', 0) / 1e6:.0f}M tokens in "
      f"{_fmt(tr.get('seconds'), 0)} s ({_fmt(tr.get('tokens_per_s'), 0)} tokens/s at the end); "
      f"final train loss {_fmt(tr.get('final_loss'))} nats/byte"
      + (" (**stopped early by --train-seconds**: the cosine schedule did not finish)"
         if tr.get("truncated") else "") + ".",
      f"- **Data:** {doc['data']['docs']} documents of {doc['data']['doc_chars']} bytes: windows of "
      f"{', '.join(pathlib.Path(p).name for p in a['corpus'])} (ASCII-folded, "
      f"{a['heldout_frac']:.0%} of documents held out) and {doc['data']['passkey_docs']} passkey "
      f"documents ({a['passkey_frac']:.0%}; needle at a uniform depth, question and answer at the "
      f"end; {doc['data']['synthetic_filler_docs']} with passkey_prompts' repetitive filler, the "
      f"rest with real-text haystacks)"
      + (f" and {doc['data']['copy_docs']} copy documents ({a['copy_frac']:.0%}; real text with "
         f"copies of its own earlier stretches at random distances)" if doc['data'].get('copy_docs') else "")
      + ".",
      (f"- **Gate:** SeerAttention-R decode gate (block {a['block_size']}, d_gate {a['d_gate']}) "
       f"distilled {a['gate_steps']} steps from the frozen model; KL "
       f"{_fmt(doc['gate'].get('first_kl'))} -> {_fmt(doc['gate'].get('last_kl'))}."
       if doc.get("gate") else "- **Gate:** not distilled in this run directory."),
      "",
  ]
  d = ev.get("drift")
  if d:
    lines += [
        f"## Drift at {d['sparsity_at_end']:.1%} sparsity",
        "",
        f"{d['prompts']} held-out prompts of {d['prompt_len']} tokens, {d['new_tokens']} greedy tokens; "
        f"sparse runs keep {d['budget_tokens']} tokens ({d['budget_tokens'] // a['block_size']} blocks "
        f"of {a['block_size']}, the first and the current block included) of up to "
        f"{d['prompt_len'] + d['new_tokens']}. NLL: mean per-token NLL of the continuation under the "
        f"dense model (nats/byte); agreement: share of positions equal to the dense continuation; "
        f"first divergence: tokens before the first difference. The dense model's NLL of the "
        f"*true* held-out continuation is {d['true_continuation_nll']:.3f}.",
        "",
        "| decoding | dense-model NLL | agreement with dense | first divergence (tokens) |",
        "|---|---|---|---|",
    ]
    for name, r in d["rows"].items():
      lines.append(f"| {name} | {r['nll']:.3f} | {r['agreement_with_dense']:.3f} | "
                   f"{r['first_divergence']:.1f} |")
    tf = d.get("teacher_forced")
    if tf:
      lines += [
          "",
          "**Teacher-forced:** the same decodings fed the *true* held-out continuation token by token, "
          "so every run's K/V entries for it come from its own decode steps (sparse attention in the "
          "layers below, rectified or not) while the positions compared stay aligned. NLL of the "
          "true continuation (nats/byte), its excess over dense decoding (overall and per quarter "
          "of the continuation: error that accumulates in the cache grows from quarter to quarter), "
          "and the share of positions whose greedy choice equals dense decoding's.",
          "",
          "| decoding | NLL | excess NLL | excess by quarter | greedy choice as dense |",
          "|---|---|---|---|---|",
      ]
      for name, r in tf.items():
        q = " / ".join(f"{x:+.4f}" for x in r["excess_nll_by_quarter"])
        se = r.get("excess_nll_se")
        ex = f"{r['excess_nll']:+.4f}" + (f" ± {se:.4f}" if se else "")
        lines.append(f"| {name} | {r['nll']:.4f} | {ex} | {q} | {r['agreement_with_dense']:.3f} |")
      paired = _rectify_gains(tf, split=True)
      if paired:
        lines += ["", "Rectification's gain, paired over the same sequences (excess NLL without "
                  "minus with; ± standard error of the per-sequence differences): "
                  + "; ".join(f"{n} {g:+.4f} ± {e:.4f}" for n, (g, e) in paired.items()) + "."]
        if any(n.endswith(" off") for n in paired):
          lines += ["", "`f=F off`: the same gain over the positions s % F != 0 only. At s = k F "
                    "a rectified run's next-token logits come from the rectifying dense forward "
                    "(so it scores like dense there); elsewhere both runs score from sparse "
                    "steps, and the difference is what the rectified cache changes. "
                    "`cache-only f=F`: runs rectified every F steps whose tokens all come from "
                    "sparse steps (`rectify_logits='sparse'`)."]
    lines += ["", "![drift](drift.png)", ""]
    if tf and rectify_phase(tf):
      lines += ["Excess NLL by the phase of the rectification cycle (position s mod f; the "
                "unrectified run grouped by the longest f): a rectified run scores like dense at "
                "phase 0, where its logits come from the rectifying dense forward.", "",
                "![phase](rectify_phase.png)", ""]
  for key, title in (("retrieval_real", "real-text haystacks (held-out text)"),
                     ("retrieval_synthetic", "passkey_prompts' repetitive filler "
                                             "(`evaluation.retrieval_eval`)")):
    r = ev.get(key)
    if not r:
      continue
    lines += [
        f"## Passkey retrieval, {title}",
        "",
        f"{r['n']} prompts of {r['context_tokens']} tokens, needle at a uniform depth; accuracy = all "
        f"5 digits right (in brackets: share of digits right). The first digit comes from the dense "
        f"prefill; digits 2-5 are decoded sparsely.",
        "",
        *_retrieval_table(r["accuracy"], r.get("digit_accuracy", r["accuracy"]), r["budgets"],
                          r["selectors"]),
        "",
    ]
  if ev.get("retrieval_real") or ev.get("retrieval_synthetic"):
    lines += ["![retrieval](retrieval.png)", ""]
  rc = ev.get("recall")
  if rc:
    budgets = rc["budgets"]
    lines += [
        "## Attention recall of the block choice",
        "",
        "Share of the dense attention probability that falls inside the chosen blocks (mean over "
        "layers, kv heads and their query heads, sequences and query positions; teacher-forced).",
        "",
        "| queries | selector | " + " | ".join(f"{b} tokens" for b in budgets) + " |",
        "|---|---|" + "---|" * len(budgets),
    ]
    for where, label in (("text", "held-out text"), ("passkey", "passkey answer")):
      if where not in rc:
        continue
      for s in [s for s in ("quest", "gate", "gate-f32", "gate-f8") if s in rc[where]]:
        lines.append(f"| {label} | {s} | " + " | ".join(f"{rc[where][s][str(b)]:.3f}" for b in budgets) + " |")
    lines.append("")
    mag = rc.get("text", {}).get("kc_abs")
    if mag:
      q = mag["quantiles"]
      lines += [
          "|K-compression cache| on the held-out text against float8_e4m3fn's range: quantiles "
          + ", ".join(f"{float(k):g}: {v:.3g}" for k, v in q.items())
          + f"; {mag['share_below_f8_normal']:.1%} below its smallest normal (2^-6), "
          f"{mag['share_flushed_to_zero']:.1%} stored as 0, {mag['share_clipped']:.2%} clipped at 448.",
          ""]
  lines += kv_lines(doc.get("kv") or {}, a)
  t = doc.get("timings_s") or {}
  if t:
    lines += ["## Timings", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in t.items()]
    lines.append("")
  lines += ["Raw numbers: `results.json`.", ""]
  (out / "REPORT.md").write_text("\n".join(lines))


def _pct(x, se=None) -> str:
  return "-" if x is None else f"{100 * x:+.2f}%" + ("" if se is None else f" ± {100 * se:.2f}%")


def _spec_text(spec: dict) -> str:
  k = (f"K per channel over groups of {spec['group']} tokens" if spec["k_mode"] == "channel" else
       f"K per token (packed {spec['group']} tokens at a time)")
  return f"{spec['kind']}, {k}, V per token, a residual window of {spec['window']} tokens"


def kv_lines(kv: dict, a: dict) -> list[str]:
  """The kv phase's tables: perplexity through each cache (K per channel vs per token, int4 vs
  int2), then drift and passkey retrieval over bf16 and each low-bit cache (K per channel)."""
  if not kv or not any(k in kv for k in ("quality", "drift", "retrieval_real", "retrieval_synthetic")):
    return []
  specs = kv.get("specs") or {}
  lines = ["## Low-bit KV caches", "",
           "The same model with its KV cache stored in 4 or 2 bits (`effjax.quant.kv.KVCacheSpec`, "
           "KIVI-style asymmetric min/max codes; scales, zeros and the full-precision residual "
           "window in bfloat16): "
           + "; ".join(f"**{n}**: {_spec_text(s)}" for n, s in specs.items() if s.get("kind") != "bf16")
           + ". bf16 is the reference.", ""]
  q = kv.get("quality")
  if q:
    lines += [
        "### Perplexity through the cache",
        "",
        f"{q['prompts']} held-out prompts of {q['prompt_len']} tokens, then their true "
        f"{q['new_tokens']}-token continuation fed token by token (teacher-forced, dense attention, "
        "`evaluation.kv_cache_quality`): every K/V entry of prompt and continuation goes through "
        "the cache. NLL in nats/byte over the continuation; the perplexity increase over bf16 "
        "± its standard error over the prompts (delta method on the paired per-prompt excess "
        "NLL); the share of positions whose greedy choice equals bf16's.",
        "",
        "| cache | K quantised | NLL | perplexity | increase over bf16 | excess NLL ± SE | greedy choice as bf16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in q["rows"].items():
      spec = specs.get(name) or {}
      mode = f"per {spec['k_mode']}" if spec.get("k_mode") else "-"
      ex = r["nll"] - q["rows"][next(iter(q["rows"]))]["nll"]
      se = r.get("excess_nll_se")
      lines.append(f"| {spec.get('kind', name)} | {mode} | {r['nll']:.4f} | {r['ppl']:.4f} | "
                   f"{_pct(r['ppl_increase'], r.get('ppl_increase_se'))} | "
                   f"{ex:+.4f}" + (f" ± {se:.4f}" if se is not None else "") + " | "
                   f"{r['agreement_with_reference']:.3f} |")
    lines.append("")
  d = kv.get("drift")
  if d and d.get("by_cache"):
    lines += [
        f"### Drift over the low-bit caches ({d['sparsity_at_end']:.1%} sparsity)",
        "",
        f"The drift evaluation, repeated with every decoding's cache (its own dense "
        f"reference included) stored as named: {d['prompts']} held-out prompts of "
        f"{d['prompt_len']} tokens + {d['new_tokens']} greedy tokens; sparse rows keep "
        f"{d['budget_tokens']} tokens (blocks of {a['block_size']})"
        + (f", rectified every {', '.join(map(str, d['rectify']))} steps where named"
           if d.get("rectify") else "") + ". K per channel. Free-running: "
        "the dense model's NLL of each continuation (one forward, no cache; nats/byte); agreement "
        "and first divergence against the **bf16 dense** continuation and against the same "
        "cache's dense continuation.",
        "",
        "| cache | decoding | dense-model NLL | agreement with bf16 dense | first divergence from bf16 dense | agreement with this cache's dense |",
        "|---|---|---|---|---|---|",
    ]
    for cache, r in d["by_cache"].items():
      for name, row in r["rows"].items():
        lines.append(f"| {cache} | {name} | {row['nll']:.3f} | "
                     f"{_fmt(row.get('agreement_with_reference'))} | "
                     f"{_fmt(row.get('first_divergence_from_reference'), 1)} | "
                     f"{row['agreement_with_dense']:.3f} |")
    ref = (d["by_cache"].get("bf16") or {}).get("teacher_forced", {}).get("dense")
    lines += [
        "",
        "Teacher-forced on the true continuation: NLL; its difference from **bf16 dense** "
        "decoding (a difference of means over the same positions; for the dense rows the "
        "paired standard error is in the perplexity table); the excess over **the same cache's** "
        "dense decoding ± its paired standard error (what the selector adds on top of the "
        "cache); the share of greedy choices equal to that cache's dense decoding.",
        "",
        "| cache | decoding | NLL | minus bf16 dense | excess over this cache's dense | greedy choice as this cache's dense |",
        "|---|---|---|---|---|---|",
    ]
    for cache, r in d["by_cache"].items():
      for name, row in (r.get("teacher_forced") or {}).items():
        se = row.get("excess_nll_se")
        vs = "-" if ref is None else f"{row['nll'] - ref['nll']:+.4f}"
        lines.append(f"| {cache} | {name} | {row['nll']:.4f} | {vs} | {row['excess_nll']:+.4f}"
                     + (f" ± {se:.4f}" if se else "") + f" | {row['agreement_with_dense']:.3f} |")
    lines.append("")
  for key, title in (("retrieval_real", "real-text haystacks"),
                     ("retrieval_synthetic", "repetitive filler")):
    r = kv.get(key)
    if not r or not r.get("by_cache"):
      continue
    budgets, sels = r["budgets"], r["selectors"]
    cols = ["dense"] + [f"{s}@{b}" for s in sels for b in budgets]
    lines += [
        f"### Passkey retrieval over the low-bit caches, {title}",
        "",
        f"{r['n']} prompts of {r['context_tokens']} tokens (the eval phase's prompts); accuracy = all 5 digits right (in brackets: share of digits right). K per channel.",
        "",
        "| cache | " + " | ".join(c.replace("@", " @ ") + (" tokens" if "@" in c else "") for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for cache, x in r["by_cache"].items():
      lines.append(f"| {cache} | " + " | ".join(
          f"{x['accuracy'][c]:.2f} ({x['digit_accuracy'][c]:.2f})" if c in x["accuracy"] else "-"
          for c in cols) + " |")
    if (r["by_cache"].get("bf16") or {}).get("accuracy", {}).get("dense") == 0.0:
      lines += ["", "bf16 dense decoding retrieves no key on these prompts: the model has not "
                "learnt retrieval, so these rows say nothing about the caches (train longer)."]
    lines.append("")
  return lines


def _rectify_gains(tf: dict, split: bool = False) -> dict:
  """{"<sel> f=<f>": (mean gain, its standard error)} for each rectified teacher-forced run whose
  unrectified run is there: per-sequence excess NLL without minus with rectification.
  "<sel> cache-only f=<f>" for the diagnostic runs whose tokens come from the sparse steps
  (rectify-cache). split: also "<sel> f=<f> off": the gain over the positions s % f != 0 only,
  where both runs' logits come from sparse steps (the positions s = k f of a rectified run are
  scored from the rectifying dense forward), i.e. what the rectified cache alone changes."""
  import numpy as np

  def paired(a, b):
    d = np.asarray(a) - np.asarray(b)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))

  out = {}
  for name, r in tf.items():
    kind = ("+rectify(f=" in name and "f=") or ("+rectify-cache(f=" in name and "cache-only f=")
    if not kind or "excess_nll_per_sequence" not in r:
      continue
    sel = name.split(" sparse+rectify")[0]
    base = tf.get(sel + " sparse")
    if not base or len(r["excess_nll_per_sequence"]) < 2:
      continue
    f = name.split("(f=")[1].rstrip(")")
    out[f"{sel} {kind}{f}"] = paired(base["excess_nll_per_sequence"], r["excess_nll_per_sequence"])
    offs = (base.get("excess_nll_per_sequence_off") or {}, r.get("excess_nll_per_sequence_off") or {})
    if split and kind == "f=" and f in offs[0] and f in offs[1]:
      out[f"{sel} f={f} off"] = paired(offs[0][f], offs[1][f])
  return out


def write_plots(doc: dict, out: pathlib.Path) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ev = doc.get("eval") or {}
  written = []
  panels = [(k, t) for k, t in (("retrieval_real", "real-text haystack"),
                                 ("retrieval_synthetic", "repetitive filler")) if ev.get(k)]
  if panels:
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), dpi=110, squeeze=False)
    for ax, (k, title) in zip(axes[0], panels):
      r = ev[k]
      for i, s in enumerate(r["selectors"]):
        bs = [b for b in r["budgets"] if f"{s}@{b}" in r["accuracy"]]
        ax.plot(bs, [r["accuracy"][f"{s}@{b}"] for b in bs], "o-", color=f"C{i}", label=s)
      ax.axhline(r["accuracy"]["dense"], ls="--", c="gray", label="dense")
      ax.set_xscale("log", base=2)
      ax.set_xticks(r["budgets"], [str(b) for b in r["budgets"]])
      ax.set_ylim(-0.03, 1.03)
      ax.set_xlabel("token budget")
      ax.set_ylabel("passkey accuracy")
      ax.set_title(f"{title}, {r['context_tokens']} tokens, n={r['n']}")
      ax.grid(alpha=0.3)
      ax.legend()
    fig.tight_layout()
    fig.savefig(out / "retrieval.png")
    plt.close(fig)
    written.append("retrieval.png")
  d = ev.get("drift")
  if d:
    names = list(d["rows"])
    colors = ["gray" if n == "dense" else _color(n) for n in names]
    tf = d.get("teacher_forced")
    fig, axes = plt.subplots(1, 3 if tf else 2, figsize=(18 if tf else 12, 4.2), dpi=110)
    for ax, key, label in ((axes[0], "nll", "dense-model NLL (nats/byte)"),
                           (axes[1], "agreement_with_dense", "agreement with dense")):
      ax.bar(range(len(names)), [d["rows"][n][key] for n in names], color=colors)
      ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
      ax.set_ylabel(label)
      ax.grid(axis="y", alpha=0.3)
    axes[0].axhline(d["true_continuation_nll"], ls="--", c="k", lw=1, label="true continuation")
    axes[0].legend(fontsize=8)
    if tf:
      ax = axes[2]
      for n, r in tf.items():
        if n == "dense":
          continue
        c = _color(n)
        ls = "-" if "rectify" not in n else "--" if "f=32" in n else ":"
        ax.plot(range(1, len(r["excess_nll_by_quarter"]) + 1), r["excess_nll_by_quarter"], c=c,
                ls=ls, marker="o", label=n)
      ax.axhline(0, c="gray", lw=1)
      ax.set_xticks(range(1, 5), [f"Q{i}" for i in range(1, 5)])
      ax.set_xlabel("quarter of the continuation")
      ax.set_ylabel("excess NLL over dense (nats/byte)")
      ax.set_title("teacher-forced on the true continuation", fontsize=9)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    fig.suptitle(f"drift: {d['new_tokens']} greedy tokens after {d['prompt_len']}, budget "
                 f"{d['budget_tokens']} tokens ({d['sparsity_at_end']:.0%} sparsity at the end)")
    fig.tight_layout()
    fig.savefig(out / "drift.png")
    plt.close(fig)
    written.append("drift.png")
    if tf and any("excess_nll_per_position" in r for r in tf.values()):
      written += _phase_plot(plt, tf, out)
  return written


def _phase_of(name: str) -> int:
  return int(name.split("(f=")[1].rstrip(")")) if "(f=" in name else 0


def rectify_phase(tf: dict) -> dict:
  """{selector: {run: (f, [f] mean excess NLL at positions s >= 1 with s % f = 0 .. f-1)}} --
  how the excess builds up between rectifications; each selector's unrectified run is grouped by
  the longest period of its rectified runs. Runs without per-position results are skipped."""
  import numpy as np
  out = {}
  for name, r in tf.items():
    if name == "dense" or "excess_nll_per_position" not in r:
      continue
    sel = name.split(" sparse")[0]
    out.setdefault(sel, {})[name] = np.asarray(r["excess_nll_per_position"])
  res = {}
  for sel, runs in out.items():
    longest = max((_phase_of(n) for n in runs), default=0)
    if not longest:
      continue
    res[sel] = {}
    for name, pp in runs.items():
      f = _phase_of(name) or longest
      s = np.arange(1, len(pp))
      res[sel][name] = (f, [float(pp[s[s % f == k]].mean()) for k in range(f)])
  return res


def _phase_plot(plt, tf: dict, out: pathlib.Path) -> list[str]:
  ph = rectify_phase(tf)
  if not ph:
    return []
  fig, axes = plt.subplots(1, len(ph), figsize=(5.5 * len(ph), 4.0), dpi=110, squeeze=False)
  for ax, (sel, runs) in zip(axes[0], ph.items()):
    for i, (name, (f, ys)) in enumerate(runs.items()):
      style = "-" if "rectify" not in name else "--" if "cache" in name else "-"
      ax.plot(range(f), ys, style, marker="o" if f <= 16 else None, ms=3, c=f"C{i}",
              label=name[len(sel) + 1:] + ("" if "rectify" in name else f" (by s mod {f})"))
    ax.axhline(0, c="gray", lw=1)
    ax.set_xlabel("s mod f (steps since the last rectification)")
    ax.set_ylabel("mean excess NLL over dense (nats/byte)")
    ax.set_title(sel, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("teacher-forced excess NLL by phase of the rectification cycle")
  fig.tight_layout()
  fig.savefig(out / "rectify_phase.png")
  plt.close(fig)
  return ["rectify_phase.png"]
