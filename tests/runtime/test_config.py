import json

import pytest

from runtime.config import FORMAT_VERSION, PRESETS, ConfigError, ModelConfig
from runtime.kv_fill import KVFill


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name):
    cfg = ModelConfig.from_name(name)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(again.to_json()) == json.loads(cfg.to_json())


def test_overrides_apply_and_validate():
    cfg = ModelConfig.from_name("tiny", kv_fill="shared")
    assert cfg.kv_fill == "shared" and cfg.n_core_slots == 1
    with pytest.raises(ConfigError, match="kv_fill"):
        ModelConfig.from_name("tiny", kv_fill="sometimes")


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(schedule="fixed", n_pool=3, max_depth=2), "n_pool"),
        (dict(schedule="recurrent", n_pool=2, max_depth=4), "n_pool=2 must be 1"),
        (dict(d_model=60, n_heads=8), "divisible"),
        (dict(n_heads=4, n_kv_heads=3), "multiple"),
        (dict(min_depth=3, max_depth=2, n_pool=2), "min_depth"),
        (dict(eos_id=10_000), "eos_id"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(schedule="sometimes"), "schedule"),
    ],
)
def test_bad_values_name_the_field(fields, message):
    base = dict(PRESETS["tiny"])
    base.update(fields)
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**base)


def test_newer_format_version_is_refused_with_upgrade_hint():
    data = ModelConfig.from_name("tiny").to_dict()
    data["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ConfigError, match="upgrade ponder"):
        ModelConfig.from_dict(data)


def test_unknown_fields_and_presets_are_refused():
    data = ModelConfig.from_name("tiny").to_dict()
    data["flux_capacitor"] = 1
    with pytest.raises(ConfigError, match="flux_capacitor"):
        ModelConfig.from_dict(data)
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.from_name("enormous")


@pytest.mark.parametrize("fill", list(KVFill))
def test_kv_fill_is_an_enum_and_config_json_keeps_the_plain_string(tmp_path, fill):
    cfg = ModelConfig.from_name("tiny", kv_fill=fill.value)
    assert cfg.kv_fill is fill
    cfg.save(tmp_path / "config.json")
    text = (tmp_path / "config.json").read_text()
    assert f'"kv_fill": "{fill.value}"' in text  # what older Ponder wrote and reads
    assert type(cfg.to_dict()["kv_fill"]) is str
    again = ModelConfig.from_json(text)
    assert again.kv_fill is fill and again == cfg


def test_a_bad_kv_fill_names_the_allowed_values():
    data = ModelConfig.from_name("tiny").to_dict()
    data["kv_fill"] = "sometimes"
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(data)
    message = str(err.value)
    assert "kv_fill='sometimes'" in message
    assert all(repr(f.value) in message for f in KVFill)


def test_kv_fill_slots():
    assert [KVFill.SHARED.slot(s) for s in range(3)] == [0, 0, 0] and KVFill.SHARED.num_slots(3) == 1
    assert [KVFill.SHARED.writes_slot(s) for s in range(3)] == [True, False, False]
    for fill in (KVFill.PROPAGATE, KVFill.LATEST):
        assert [fill.slot(s) for s in range(3)] == [0, 1, 2] and fill.num_slots(3) == 3
        assert all(fill.writes_slot(s) for s in range(3))
