"""Low-rank deltas of a model's linear weights: trained as LoRA, shipped as factors, served merged.

A checkpoint stores, next to a linear weight `name.weight` (which may come from its base), the
factors `name.lora_down` (r, in) and `name.lora_up` (out, r). Loading merges them once,
W + up @ down, so serving runs the same kernels as the plain model and pays nothing per token.
"""

from __future__ import annotations

import torch
from pathlib import Path

from safetensors import safe_open
from torch import Tensor, nn

DOWN, UP = ".lora_down", ".lora_up"
TARGETS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w_gate", "mlp.w_up", "mlp.w_down")


def merge_lora(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state with every factor pair folded into its weight (in fp32) and the factors removed."""
    merged = {k: v for k, v in state.items() if not k.endswith((DOWN, UP))}
    for key in state:
        if not key.endswith(DOWN):
            continue
        name = key[: -len(DOWN)]
        if name + UP not in state or name + ".weight" not in state:
            raise KeyError(f"LoRA factor {key} has no matching {name}{UP} or {name}.weight")
        weight = state[name + ".weight"]
        delta = state[name + UP].float() @ state[key].float()
        merged[name + ".weight"] = (weight.float() + delta).to(weight.dtype)
    return merged


def has_lora(checkpoint: Path) -> bool:
    """Whether a checkpoint directory's weights carry LoRA factors."""
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        return any(k.endswith((DOWN, UP)) for k in f.keys())


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable low-rank delta: base(x) + up(down(x)). `up` starts at zero,
    so the wrapped model starts as the original; `enabled = False` gives the original back (the
    teacher) without a second copy of the weights."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base, self.enabled = base, True
        self.down = nn.Parameter(torch.empty(rank, base.in_features))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.down, a=5**0.5)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        return out + (x @ self.down.t()) @ self.up.t() if self.enabled else out


def add_lora(model: nn.Module, rank: int, targets: tuple[str, ...] = TARGETS) -> dict[str, LoRALinear]:
    """Wrap every targeted linear of the model's blocks in place; returns them by weight name prefix."""
    wrapped = {}
    for name, module in list(model.named_modules()):
        for target in targets:
            parent_name, _, attr = target.rpartition(".")
            if name.endswith(parent_name) and isinstance(getattr(module, attr, None), nn.Linear):
                layer = LoRALinear(getattr(module, attr), rank)
                setattr(module, attr, layer)
                wrapped[f"{name}.{attr}"] = layer
    return wrapped


def set_lora_enabled(layers: dict[str, LoRALinear], enabled: bool) -> None:
    for layer in layers.values():
        layer.enabled = enabled


def lora_factors(layers: dict[str, LoRALinear]) -> dict[str, Tensor]:
    """The factors under the names a checkpoint stores them by."""
    out = {}
    for name, layer in layers.items():
        out[name + DOWN] = layer.down.detach().clone()
        out[name + UP] = layer.up.detach().clone()
    return out


@torch.no_grad()
def unwrap_lora(model: nn.Module, layers: dict[str, LoRALinear]) -> None:
    """Merge every delta into its base linear and put the plain linears back."""
    for name, layer in layers.items():
        layer.base.weight += layer.up @ layer.down
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer.base)
