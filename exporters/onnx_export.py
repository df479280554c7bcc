"""A Ponder checkpoint as ONNX graphs, one per component, with KV inputs and outputs.

Per-token routing and exits do not fit one static graph, so the engine's scheduler and
executor stay in Python and call these graphs (runtime/engine/ort_executor.py):

    embed.onnx          ids (tokens,) -> h (tokens, d)
    gate.onnx           h (tokens, d), step () -> h_step = h + P(step), exit_score (tokens,)   [exit head]
    router.onnx         h_step (tokens, d) -> route_logits (tokens, n_pool)                    [routed only]
    {layer}.kv.onnx     x (tokens, d), cos, sin (tokens, head_dim) -> k, v (tokens, n_kv_heads, head_dim)
    {layer}.step.onnx   x (batch, seq, d), cos, sin (batch, seq, head_dim),
                        k, v (batch, n_kv_heads, ctx, head_dim), mask (batch, seq, ctx) -> h (batch, seq, d)
    head.onnx           h (tokens, d) -> logits (tokens, vocab)

{layer} is prelude.i, pool.b or coda.i. A pool block's graphs take the step input h_step and add
its block embedding B(b) inside. `kv` is the projection a token writes to its KV slot, for its
own step and for kv_fill='propagate'; `step` attends over the gathered slot (KV in) and runs the
whole block. The only dynamic axes are tokens (batch x sequence, flattened), batch, seq and ctx.

Every layer has the same structure, so a layer graph is traced once per kind (with and without
a block embedding) and copied for each layer with that layer's weights; tracing is what takes
time. Graphs are saved unoptimized; onnxruntime folds constants when it loads them.
manifest.json lists the graphs beside the model config.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from runtime.checkpoint import Checkpoint
from runtime.layers import Block
from runtime.model import PonderModel

OPSET = 18
MANIFEST = "manifest.json"


class Piece(nn.Module):
    """A model-level component, fn(model, *inputs), as a module to trace."""

    def __init__(self, model: PonderModel, fn: Callable) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *inputs: Tensor):
        return self.fn(self.model, *inputs)


class LayerKV(nn.Module):
    """The K/V entry a layer writes for its input rows; `offset` is the block embedding B(b)."""

    def __init__(self, block: Block, offset: Tensor | None) -> None:
        super().__init__()
        self.block = block
        self.offset = nn.Parameter(offset, requires_grad=False) if offset is not None else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        x = x + self.offset if self.offset is not None else x
        k, v = self.block.kv(x[None], cos, sin)  # (1, Hkv, tokens, D)
        return k[0].transpose(0, 1), v[0].transpose(0, 1)


class LayerStep(LayerKV):
    """The whole block over padded rows, attending to the given K/V of its slot."""

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        x = x + self.offset if self.offset is not None else x
        return self.block.forward_with_kv(x, k, v, cos[:, None], sin[:, None], mask[:, None])


def layers(model: PonderModel) -> list[tuple[str, Block, Tensor | None]]:
    """(name, block, block-embedding offset or None) for every layer with a KV slot."""
    cfg = model.cfg
    out = [(f"prelude.{i}", b, None) for i, b in enumerate(model.prelude)]
    zero = torch.zeros(cfg.d_model)
    out += [(f"pool.{i}", b, model.block_input(zero, i).detach() if model.block_emb is not None else None)
            for i, b in enumerate(model.pool)]
    return out + [(f"coda.{i}", b, None) for i, b in enumerate(model.coda)]


def _gate(m: PonderModel, h: Tensor, step: Tensor):
    h_step = m.step_input(h, step)
    return h_step, m.exit_score(h_step, step)


def _specs(model: PonderModel) -> dict[str, tuple[nn.Module, tuple[Tensor, ...], list[str], list[str], dict]]:
    """name -> (module, example inputs, input names, output names, dynamic axes), for the model-level
    graphs and one template per layer kind."""
    cfg = model.cfg
    d, hd, hkv = cfg.d_model, cfg.head_dim, cfg.n_kv_heads
    n, R, M, L = 5, 2, 3, 7  # example sizes; all dynamic
    tok = {0: "tokens"}
    specs = {
        "embed": (Piece(model, lambda m, ids: m.embed(ids)), (torch.zeros(n, dtype=torch.long),), ["ids"], ["h"],
                  {"ids": tok}),
        "gate": (Piece(model, _gate), (torch.randn(n, d), torch.tensor(0)), ["h", "step"], ["h_step", "exit_score"],
                 {"h": tok}),
        "head": (Piece(model, lambda m, h: m.head(m.norm(h))), (torch.randn(n, d),), ["h"], ["logits"], {"h": tok}),
    }
    if model.router is not None:
        specs["router"] = (Piece(model, lambda m, h: m.route_logits(h)), (torch.randn(n, d),), ["h_step"],
                           ["route_logits"], {"h_step": tok})
    kv_in = (torch.randn(n, d), torch.randn(n, hd), torch.randn(n, hd))
    step_in = (torch.randn(R, M, d), torch.randn(R, M, hd), torch.randn(R, M, hd), torch.randn(R, hkv, L, hd),
               torch.randn(R, hkv, L, hd), torch.ones(R, M, L, dtype=torch.bool))
    padded, ctx = {0: "batch", 1: "seq"}, {0: "batch", 2: "ctx"}
    step_axes = {"x": padded, "cos": padded, "sin": padded, "k": ctx, "v": ctx, "mask": {0: "batch", 1: "seq", 2: "ctx"}}
    for kind in sorted({_kind(offset) for _, _, offset in layers(model)}):
        _, block, offset = next(layer for layer in layers(model) if _kind(layer[2]) == kind)
        specs[f"template.{kind}.kv"] = (LayerKV(block, offset), kv_in, ["x", "cos", "sin"], ["k", "v"],
                                        {"x": tok, "cos": tok, "sin": tok})
        specs[f"template.{kind}.step"] = (LayerStep(block, offset), step_in, ["x", "cos", "sin", "k", "v", "mask"],
                                          ["h"], step_axes)
    return specs


def _kind(offset: Tensor | None) -> str:
    return "offset" if offset is not None else "plain"


def _trace(module: nn.Module, inputs: tuple, input_names: list[str], output_names: list[str], axes: dict):
    dims = {name: torch.export.Dim(name) for spec in axes.values() for name in spec.values()}
    shapes = tuple({axis: dims[name] for axis, name in axes[i].items()} if i in axes else None for i in input_names)
    if isinstance(module, Piece):  # one *inputs argument
        shapes = (shapes,)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, inputs, input_names=input_names, output_names=output_names,
                                    dynamic_shapes=shapes, opset_version=OPSET, dynamo=True, optimize=False,
                                    verbose=False)
    return program.model_proto


def _with_weights(template, block: Block, offset: Tensor | None):
    """A copy of a layer template graph holding this layer's weights."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.ModelProto()
    proto.CopyFrom(template)
    weights = {f"block.{name}": p for name, p in block.state_dict().items()}
    if offset is not None:
        weights["offset"] = offset
    for i, init in enumerate(proto.graph.initializer):
        assert init.name in weights, f"template initializer {init.name} is not a layer weight"
        proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(weights[init.name].detach().float().numpy(), init.name))
    return proto


def export_onnx(ckpt: Checkpoint, out: str | Path, check: bool = True) -> Path:
    """Write every component graph of `ckpt` and manifest.json to `out`; check each with onnx.checker."""
    import onnx

    unsupported = [f for f in ("exit_adapter_rank", "exit_step_bias") if getattr(ckpt.config, f)]
    if unsupported:
        raise ValueError(f"the ONNX export does not implement {unsupported} yet (exit adapters / per-step exit bias of "
                         f"imported pretrained models); serve this checkpoint with the torch backend")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = ckpt.model.float().cpu().eval()
    protos = {}
    for name, (module, inputs, input_names, output_names, axes) in tqdm(_specs(model).items(), desc="trace onnx"):
        protos[name] = _trace(module, inputs, input_names, output_names, axes)
    for name, block, offset in layers(model):
        for part in ("kv", "step"):
            protos[f"{name}.{part}"] = _with_weights(protos[f"template.{_kind(offset)}.{part}"], block, offset)
    graphs = sorted(name for name in protos if not name.startswith("template."))
    for name in graphs:
        onnx.save_model(protos[name], str(out / f"{name}.onnx"))
        if check:
            onnx.checker.check_model(str(out / f"{name}.onnx"), full_check=True)
    manifest = {"config": ckpt.config.to_dict(), "opset": OPSET, "graphs": graphs}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out
