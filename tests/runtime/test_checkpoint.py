import json

import pytest
import torch

from runtime.calibration import Calibration
from runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from runtime.config import FORMAT_VERSION, ModelConfig
from runtime.model import ExitSpec, PonderModel
from training.tasks import symbol_tokenizer


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = PonderModel(ModelConfig.from_name("tiny", schedule="routed", n_pool=3, max_depth=3, kv_fill="latest"))
    tokenizer = symbol_tokenizer([chr(ord("a") + i) for i in range(26)] + [str(i) for i in range(10)])
    calibration = Calibration(prices=[0.01, 0.1, 1.0], depth_fractions=[0.9, 0.5, 0.1], measured_on="test")
    path = save_checkpoint(tmp_path / "ckpt", model, tokenizer, calibration)
    return path, model, tokenizer, calibration


def test_round_trip_preserves_weights_outputs_tokenizer_and_calibration(saved):
    path, model, tokenizer, calibration = saved
    assert sorted(p.name for p in path.iterdir()) == ["calibration.json", "config.json", "model.safetensors", "tokenizer.json"]
    ckpt = load_checkpoint(path)
    assert ckpt.config == model.cfg
    assert ckpt.calibration == calibration
    assert ckpt.tokenizer.encode("abc42").ids == tokenizer.encode("abc42").ids
    ids = torch.randint(0, 36, (2, 9))
    model.eval()
    with torch.no_grad():
        a, b = model(ids, ExitSpec(price=0.5)), ckpt.model(ids, ExitSpec(price=0.5))
    torch.testing.assert_close(a.logits, b.logits)
    assert torch.equal(a.depth, b.depth) and torch.equal(a.path, b.path)


def test_bf16_on_disk_loads_as_float32(saved, tmp_path):
    _, model, tokenizer, _ = saved
    path = save_checkpoint(tmp_path / "bf16", model, tokenizer, dtype=torch.bfloat16)
    ckpt = load_checkpoint(path)
    assert ckpt.model.embed.weight.dtype == torch.float32
    torch.testing.assert_close(ckpt.model.embed.weight, model.embed.weight.bfloat16().float())


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", "calibration.json"])
def test_missing_file_is_named(saved, name):
    path = saved[0]
    (path / name).unlink()
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", "calibration.json"])
def test_corrupt_file_is_named(saved, name):
    path = saved[0]
    (path / name).write_bytes(b"\x00garbage{")
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(path)


def test_newer_config_version_asks_for_upgrade(saved):
    path = saved[0]
    data = json.loads((path / "config.json").read_text())
    data["format_version"] = FORMAT_VERSION + 1
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="upgrade ponder"):
        load_checkpoint(path)


def test_weights_from_another_config_are_refused(saved, tmp_path):
    path = saved[0]
    data = json.loads((path / "config.json").read_text())
    data["d_model"] = 128
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="does not match config.json"):
        load_checkpoint(path)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
