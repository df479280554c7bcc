import json

import pytest

from runtime.config import FORMAT_VERSION, PRESETS, ConfigError, ModelConfig


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
