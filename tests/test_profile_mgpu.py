"""benchmarks/profile_mgpu.py: the trace reduction on a hand-made trace; on a GPU the whole run."""

import json
import pathlib

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


def test_sass_histogram_counts_opcodes_with_their_first_modifier():
  text = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/              @!P0 HFMA2.BF16_V2 R3, R4, R5, -R6 ;
        /*0020*/                   HFMA2.MMA R2, -RZ, RZ, 0, 0 ;
        /*0030*/                   LOP3.LUT R7, R7, 0x3, RZ, 0xc0, !PT ;
        /*0040*/                   LOP3.LUT R8, R7, 0x3, RZ, 0xc0, !PT ;
        // a comment line, and a label:
.L_x_1:
"""
  h = profile_mgpu.sass_histogram(text)
  assert h == {"total": 5, "ops": {"LOP3.LUT": 2, "LDC": 1, "HFMA2.BF16_V2": 1, "HFMA2.MMA": 1}}
  assert "sass_error" in profile_mgpu.read_dump(str(pathlib.Path(__file__).parent / "nothing"))


def test_read_dump_keeps_the_ptxas_report_and_its_performance_warnings(tmp_path):
  (tmp_path / "k.ptxas").write_text(
      "ptxas info    : Compiling entry function 'k'\n"
      "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are "
      "serialized due to the presence of Extern calls in the function 'k'.\n"
      "ptxas info    : Used 128 registers, used 2 barriers\n"
      "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n")
  out = profile_mgpu.read_dump(str(tmp_path))
  assert out["ptxas"] == ["ptxas info    : Used 128 registers, used 2 barriers",
                          "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"]
  assert len(out["ptxas_warnings"]) == 1 and "serialized" in out["ptxas_warnings"][0]


@pytest.mark.gpu
def test_profile_ternary_on_a_gpu(tmp_path):
  out = tmp_path / "t.json"
  assert profile_mgpu.main(["--kernel", "ternary", "--shape", "4096x4096", "--configs",
                            ";gemv_s8=0", "--out", str(out)]) == 0
  s8, f16 = json.loads(out.read_text())["results"]    # the s8 GEMV (default), the 16-bit one
  assert {"load", "decode", "mma"} <= set(s8)
  assert {"load", "decode", "mma", "drain"} <= set(f16)


@pytest.mark.gpu
def test_profile_run_on_a_gpu(tmp_path):
  out = tmp_path / "p.json"
  assert profile_mgpu.main(["--batch", "1", "--seq", "2048", "--configs", ";overlap=1",
                            "--out", str(out)]) == 0
  rows = json.loads(out.read_text())["results"]
  assert [r["config"] for r in rows] == ["defaults", "overlap=1"]
  for r in rows:
    assert {"dequant_k", "dequant_v", "qk", "softmax", "pv"} <= set(r)
