"""The executor on onnxruntime: the same scheduler, batching, paged KV cache and per-token exits
as `Executor`; every weight-bearing computation runs in an ORT session instead of torch.

The graphs come from `ponder export --format onnx` (exporters/onnx_export.py documents each
graph's inputs and outputs). The KV cache stays a torch tensor on the CPU; numpy views of it
cross into ORT without copies.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from runtime.config import ModelConfig
from runtime.engine.executor import Executor, Layer, Padding
from runtime.engine.kv_cache import PagedKVCache

# Config fields the graphs are built from; the serving config must agree on them.
GRAPH_FIELDS = ("vocab_size", "d_model", "n_heads", "n_kv_heads", "d_ff", "n_prelude", "n_coda", "n_pool", "max_depth",
                "schedule", "step_embedding", "block_embedding", "exit_hidden", "norm_eps")


class OrtExecutor(Executor):
    per_sequence_attention = False  # its exported block graph takes the padded layout
    def __init__(self, cfg: ModelConfig, graph_dir: str | Path, cache: PagedKVCache, num_threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("the onnx backend needs onnxruntime: pip install 'ponder[onnx]'") from e
        if cfg.exit_adapter_rank or cfg.exit_step_bias:
            raise ValueError("the onnx backend does not run exit adapters or per-step exit biases yet; use backend='torch'")
        graph_dir = Path(graph_dir)
        manifest_path = graph_dir / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{graph_dir} has no manifest.json; write it with `ponder export --format onnx`")
        manifest = json.loads(manifest_path.read_text())
        exported = ModelConfig.from_dict(manifest["config"])
        differ = [f for f in GRAPH_FIELDS if getattr(exported, f) != getattr(cfg, f)]
        if differ:
            raise ValueError(f"the ONNX graphs in {graph_dir} were exported from a different model ({differ} differ); "
                             f"export this checkpoint again")
        if cache.k.device.type != "cpu" or cache.k.dtype != torch.float32:
            raise ValueError(f"the onnx backend runs on the CPU in float32; got a {cache.k.dtype} cache on "
                             f"{cache.k.device}: use device='cpu', dtype='float32'")
        self.model, self.cache, self.cfg, self.device = None, cache, cfg, torch.device("cpu")
        self._init_state()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Python runs between graph calls; spinning ORT threads would take the core it needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {name: ort.InferenceSession(str(graph_dir / f"{name}.onnx"), options,
                                                    providers=["CPUExecutionProvider"])
                         for name in manifest["graphs"]}

    def _run(self, graph: str, **inputs: Tensor) -> list[Tensor]:
        outs = self.sessions[graph].run(None, {name: t.contiguous().numpy() for name, t in inputs.items()})
        return [torch.from_numpy(o) for o in outs]

    # ----- compute (see Executor) -----

    def _embed(self, ids: Tensor) -> Tensor:
        return self._run("embed", ids=ids)[0]

    def _gate(self, h: Tensor, s: int, need_score: bool) -> tuple[Tensor, Tensor | None]:
        h_step, score = self._run("gate", h=h, step=torch.tensor(s))
        return h_step, score if need_score else None

    def _route_logits(self, h_step: Tensor) -> Tensor:
        return self._run("router", h_step=h_step)[0]

    def _project(self, layer: Layer, x: Tensor, cos: Tensor, sin: Tensor,
                 queries: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        k, v = self._run(f"{layer[0]}.{layer[1]}.kv", x=x, cos=cos, sin=sin)
        return k, v, None  # the step graph computes its own queries

    def _block_padded(self, layer: Layer, x: Tensor, q: Tensor | None, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
                      mask: Tensor, padding: Padding) -> Tensor:
        out = self._run(f"{layer[0]}.{layer[1]}.step", x=padding.pad(x), cos=padding.pad(cos), sin=padding.pad(sin),
                        k=k, v=v, mask=mask)[0]
        return padding.unpad(out)

    def _adapt(self, h: Tensor, depth: Tensor) -> Tensor:
        return h  # checkpoints with exit adapters are refused in __init__

    def _logits(self, h: Tensor) -> Tensor:
        return self._run("head", h=h)[0]
