"""benchmarks/profile_mgpu.py: the trace reduction on a hand-made trace; on a GPU the whole run."""

import json

import pytest

from benchmarks import profile_mgpu


def ev(name, ph, ts, tid):
  return {"name": name, "ph": ph, "ts": ts, "pid": 1, "tid": tid}


def test_summarize_sums_nested_phases_per_block():
  # two warpgroups, two blocks each: dequant_k 2 us, qk 3 us holding dequant_v 1 us
  events = []
  for tid in (1, 2):
    t = 10.0 * tid
    for _ in range(2):
      events += [ev("dequant_k", "B", t, tid), ev("dequant_k", "E", t + 2, tid),
                 ev("qk", "B", t + 2, tid), ev("dequant_v", "B", t + 3, tid),
                 ev("dequant_v", "E", t + 4, tid), ev("qk", "E", t + 5, tid)]
      t += 5
  s = profile_mgpu.summarize({"traceEvents": events})
  assert s["_warpgroups"] == 2 and s["_span_us"] == 10.0
  assert s["dequant_k"] == {"us_per_block": 2.0, "share": 0.4, "entries": 4}
  assert s["qk"]["us_per_block"] == 3.0 and s["dequant_v"]["us_per_block"] == 1.0
  with pytest.raises(ValueError, match="no complete phase"):
    profile_mgpu.summarize({"traceEvents": [ev("qk", "B", 0.0, 1)]})


@pytest.mark.gpu
def test_profile_run_on_a_gpu(tmp_path):
  out = tmp_path / "p.json"
  assert profile_mgpu.main(["--batch", "1", "--seq", "2048", "--configs", ";overlap=1",
                            "--out", str(out)]) == 0
  rows = json.loads(out.read_text())["results"]
  assert [r["config"] for r in rows] == ["defaults", "overlap=1"]
  for r in rows:
    assert {"dequant_k", "dequant_v", "qk", "softmax", "pv"} <= set(r)
