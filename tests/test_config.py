import dataclasses

import pytest

from effjax.config import Config, ConfigError, apply_overrides, from_dict, load_config, to_dict

CONFIGS = ["tiny", "small", "base", "350m"]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_validate(name):
  cfg = load_config(f"configs/{name}.yaml")
  assert cfg.name == name
  # round trip through the plain-dict form is lossless
  assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("name", ["delt_lqs_folding", "longctx"])
def test_configs_of_external_corpora_name_them_under_the_data_root(name, tmp_path):
  """Configs that train on external corpora name them as root:<path> sources (no path outside the
  repository), so they load from any checkout; data.root is an ordinary override."""
  cfg = load_config(f"configs/{name}.yaml")
  assert cfg.name == name and from_dict(to_dict(cfg)) == cfg
  assert cfg.data.source.startswith("root:") and cfg.data.root is None
  if cfg.delt.reference_source:
    assert cfg.delt.reference_source.startswith("root:")
  assert load_config(f"configs/{name}.yaml", [f"data.root={tmp_path}"]).data.root == str(tmp_path)


def test_param_counts_match_names():
  counts = {n: load_config(f"configs/{n}.yaml").model.num_params() for n in CONFIGS}
  assert counts["tiny"] < 2e6
  assert 20e6 < counts["small"] < 30e6
  assert 110e6 < counts["base"] < 140e6
  assert 320e6 < counts["350m"] < 380e6


def test_overrides_apply_and_parse_types():
  cfg = load_config("configs/tiny.yaml", ["model.n_layers=2", "optim.lr=1e-4", "train.progress=false",
                                          "eval.splits=[valid, foo.txt]"])
  assert cfg.model.n_layers == 2 and cfg.optim.lr == 1e-4 and cfg.train.progress is False
  assert cfg.eval.splits == ("valid", "foo.txt")
  assert isinstance(cfg.optim.lr, float)


def test_unknown_top_level_and_nested_keys_name_the_key(tmp_path):
  with pytest.raises(ConfigError, match=r"unknown config key 'model\.n_layer'"):
    load_config("configs/tiny.yaml", ["model.n_layer=3"])
  p = tmp_path / "bad.yaml"
  p.write_text("model:\n  d_model: 64\n  dropout: 0.1\n")
  with pytest.raises(ConfigError, match=r"'model\.dropout'"):
    load_config(p)
  p.write_text("modle:\n  d_model: 64\n")
  with pytest.raises(ConfigError, match=r"unknown config key 'modle'"):
    load_config(p)


@pytest.mark.parametrize("override,key", [
    ("model.n_heads=5", "model.n_heads"),           # 5 does not divide d_model=128
    ("model.n_kv_heads=3", "model.n_kv_heads"),     # 3 does not divide n_heads=4
    ("train.grad_accum=5", "train.grad_accum"),     # 5 does not divide batch 32
    ("data.packing=zip", "data.packing"),
    ("model.attention_impl=flash3", "model.attention_impl"),
    ("data.seq_len=4096", "data.seq_len"),          # exceeds max_seq_len
    ("optim.lr=-1", "optim.lr"),
    ("optim.warmup_steps=10000", "optim.warmup_steps"),
    ("data.valid_fraction=1.5", "data.valid_fraction"),
    ("decode.kv_cache=int3", "decode.kv_cache"),
    ("decode.kv_k_mode=row", "decode.kv_k_mode"),
    ("decode.kv_group=0", "decode.kv_group"),
    ("decode.kv_flush=token", "decode.kv_flush"),
])
def test_impossible_values_name_the_key(override, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    load_config("configs/tiny.yaml", [override])


@pytest.mark.parametrize("override,key", [
    ("model.d_model=abc", "model.d_model"),
    ("model.d_model=1.5", "model.d_model"),
    ("train.progress=3", "train.progress"),
    ("data.source=[a, b]", "data.source"),
])
def test_wrong_types_name_the_key(override, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    load_config("configs/tiny.yaml", [override])


def test_missing_file_and_bad_yaml(tmp_path):
  with pytest.raises(ConfigError, match="not found"):
    load_config(tmp_path / "nope.yaml")
  p = tmp_path / "broken.yaml"
  p.write_text("model: [unclosed\n")
  with pytest.raises(ConfigError, match="not valid YAML"):
    load_config(p)
  with pytest.raises(ConfigError, match="key.sub=value"):
    apply_overrides({}, ["model.d_model"])


def test_configs_are_frozen():
  cfg = Config()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.model.d_model = 3  # type: ignore[misc]


def test_proxy_context_checked_only_when_the_proxy_runs():
  """A long-context model without DELT needs no matching proxy context; with a proxy-based
  scoring the proxy must cover the training sequence length."""
  base = ["model.max_seq_len=4096", "data.seq_len=4096", "delt.proxy.max_seq_len=1024"]
  assert load_config("configs/tiny.yaml", base).delt.scoring == "none"
  load_config("configs/tiny.yaml", base + ["delt.scoring=random", "delt.ordering=folding"])
  with pytest.raises(ConfigError, match=r"delt\.proxy\.max_seq_len"):
    load_config("configs/tiny.yaml", base + ["delt.scoring=loss", "delt.ordering=folding"])


@pytest.mark.parametrize("overrides,match", [
    (["decode.kv_cache=int4", "decode.kv_window=64"], "window"),        # window < group 128
    (["decode.kv_cache=int2", "decode.kv_v_group=24"], "v_group"),      # not a multiple of 32
    (["decode.kv_cache=int2", "model.d_model=96", "model.n_heads=4"], "head_dim"),  # 24 * 2 bits
])
def test_low_bit_cache_settings_fail_when_the_config_loads(overrides, match):
  with pytest.raises(ConfigError, match=rf"config key 'decode':.*{match}"):
    load_config("configs/tiny.yaml", overrides)


def test_decode_section_gives_the_cache_spec():
  from effjax.quant.kv import KVCacheSpec
  assert KVCacheSpec.from_config(load_config("configs/tiny.yaml").decode) is None
  cfg = load_config("configs/tiny.yaml", ["decode.kv_cache=int2", "decode.kv_group=64",
                                          "decode.kv_k_mode=token", "decode.kv_flush=layer"])
  assert KVCacheSpec.from_config(cfg.decode) == KVCacheSpec("int2", group=64, k_mode="token",
                                                            flush="layer")
  # generate's loop packs full windows between append-only steps unless told otherwise
  int4 = load_config("configs/tiny.yaml", ["decode.kv_cache=int4"]).decode
  assert KVCacheSpec.from_config(int4).flush == "loop" == KVCacheSpec("int4").flush
