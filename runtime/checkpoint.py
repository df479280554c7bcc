"""Checkpoint directory: config.json, model.safetensors, tokenizer.json, calibration.json. No pickle."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from runtime.calibration import Calibration
from runtime.config import ConfigError, ModelConfig
from runtime.model import PonderModel

CONFIG, WEIGHTS, TOKENIZER, CALIBRATION = "config.json", "model.safetensors", "tokenizer.json", "calibration.json"

# The embedded default model, shipped in the repository (override with PONDER_DEFAULT_MODEL).
DEFAULT_MODEL = Path(os.environ.get("PONDER_DEFAULT_MODEL", Path(__file__).resolve().parent.parent / "checkpoints" / "austen-small"))


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete, corrupt, or from a newer Ponder."""


@dataclass
class Checkpoint:
    model: PonderModel
    tokenizer: Tokenizer
    calibration: Calibration
    path: Path | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg


def save_checkpoint(
    path: str | Path,
    model: PonderModel,
    tokenizer: Tokenizer,
    calibration: Calibration | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a checkpoint directory. `dtype` casts floating weights on disk (e.g. bfloat16)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.cfg.save(path / CONFIG)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "head.weight" and model.cfg.tie_embeddings:
            continue  # tied to embed.weight
        tensor = tensor.detach().cpu()
        state[name] = (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).contiguous()
    save_file(state, str(path / WEIGHTS), metadata={"format": "pt", "ponder_format_version": str(model.cfg.format_version)})
    tokenizer.save(str(path / TOKENIZER))
    (calibration or Calibration.uncalibrated()).save(path / CALIBRATION)
    return path


def _need(path: Path, name: str) -> Path:
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {name}; a Ponder checkpoint needs {CONFIG}, {WEIGHTS}, "
                              f"{TOKENIZER} and {CALIBRATION}")
    return file


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    try:
        return ModelConfig.from_json(_need(path, CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / CONFIG} is not valid JSON: {e}") from e
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG}: {e}") from e


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Checkpoint:
    path = Path(path)
    cfg = load_config(path)
    try:
        state = load_file(str(_need(path, WEIGHTS)))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path / WEIGHTS} is corrupt or unreadable: {e}") from e
    model = PonderModel(cfg)
    expected = {k for k in model.state_dict() if not (k == "head.weight" and cfg.tie_embeddings)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path / WEIGHTS} does not match config.json: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{path / WEIGHTS} does not match config.json: {e}") from e
    try:
        tokenizer = Tokenizer.from_file(str(_need(path, TOKENIZER)))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path / TOKENIZER} is corrupt: {e}") from e
    try:
        calibration = Calibration.from_dict(json.loads(_need(path, CALIBRATION).read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CALIBRATION} is corrupt: {e}") from e
    model = model.to(device=device, dtype=dtype).eval()
    return Checkpoint(model=model, tokenizer=tokenizer, calibration=calibration, path=path)
