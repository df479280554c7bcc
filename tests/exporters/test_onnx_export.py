"""The ONNX export and the onnxruntime executor: checked graphs with real dynamic axes only, the
same logits as the torch executor and the reference forward (at full depth and with exits, for
every kv_fill), and the same greedy generations through the engine."""

import random
from dataclasses import replace

import onnx
import pytest
import torch

from exporters.onnx_export import export_onnx
from runtime.checkpoint import Checkpoint
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.ort_executor import OrtExecutor
from runtime.engine.params import ComputeParams, SamplingParams
from runtime.model import ExitSpec, PonderModel
from tests.exporters.models import KV_FILLS, tiny_checkpoint
from tests.runtime.engine.test_executor_parity import run_chunked

# A routed pool with a prelude and a coda exercises every graph kind.
OVERRIDES = dict(schedule="routed", n_pool=3, max_depth=3, n_prelude=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    ckpt, price = routed_checkpoint("propagate")
    return export_onnx(ckpt, tmp_path_factory.mktemp("onnx")), price


def routed_checkpoint(kv_fill: str) -> tuple[Checkpoint, float]:
    """The same weights with any kv_fill (the graphs do not depend on it)."""
    ckpt, price = tiny_checkpoint("routed", "propagate")
    model = PonderModel(replace(ckpt.config, kv_fill=kv_fill, **OVERRIDES)).eval()
    torch.manual_seed(0)
    model.reset_parameters()
    ckpt.model = model
    with torch.no_grad():
        price = float(model(torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))).exit_scores.quantile(0.5))
    return ckpt, price


def test_graphs_pass_the_checker_with_only_batch_and_sequence_axes_dynamic(exported):
    out, _ = exported
    names = {p.stem for p in out.glob("*.onnx")}
    assert names == {"embed", "gate", "router", "head"} | {f"{layer}.{part}" for layer in
                                                            ("prelude.0", "pool.0", "pool.1", "pool.2", "coda.0")
                                                            for part in ("kv", "step")}
    for path in out.glob("*.onnx"):
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        for value in [*model.graph.input, *model.graph.output]:
            for dim in value.type.tensor_type.shape.dim:
                assert dim.dim_param in ("", "tokens", "batch", "seq", "ctx"), (path.name, value.name, dim.dim_param)
                assert dim.dim_param or dim.dim_value > 0


@pytest.mark.parametrize("kv_fill", KV_FILLS)
def test_ort_executor_matches_torch_at_full_depth_and_with_exits(exported, kv_fill):
    out, _ = exported
    ckpt, price = routed_checkpoint(kv_fill)
    model = ckpt.model
    rng = random.Random(0)
    prompts = [[rng.randrange(64) for _ in range(n)] for n in (13, 7, 20, 1)]
    forced = [[rng.randint(0, 3) for _ in p] for p in prompts]
    exits = {
        "full depth": lambda i, start, n: {},
        "forced depths": lambda i, start, n: dict(depths=forced[i][start : start + n]),
        "price": lambda i, start, n: dict(price=price),
    }
    for name, exit_for in exits.items():
        ort_results, _ = run_chunked(model, prompts, exit_for, random.Random(1),
                                     make_executor=lambda m, cache: OrtExecutor(m.cfg, out, cache))
        torch_results, _ = run_chunked(model, prompts, exit_for, random.Random(1))
        for p, (ort_logits, ort_depths), (torch_logits, torch_depths) in zip(prompts, ort_results, torch_results):
            assert ort_depths == torch_depths, name
            assert (ort_logits - torch_logits).abs().max() < 1e-4, name
            spec = ExitSpec(price=price) if name == "price" else ExitSpec()
            if name == "forced depths":
                spec = ExitSpec(depths=torch.tensor([forced[prompts.index(p)]]))
            with torch.no_grad():
                ref = model(torch.tensor([p]), spec)
            assert ort_depths == ref.depth[0].tolist(), name
            torch.testing.assert_close(ort_logits, ref.logits[0], rtol=1e-4, atol=1e-4)
        if name == "price":
            assert len({d for _, ds in ort_results for d in ds}) > 1  # exits really differ per token


@pytest.mark.parametrize("kv_fill", KV_FILLS)
def test_engine_on_onnx_backend_generates_the_same_greedy_tokens(exported, kv_fill):
    out, price = exported
    ckpt, price = routed_checkpoint(kv_fill)
    prompts = [[random.Random(i).randrange(64) for _ in range(3 + 4 * i)] for i in range(4)]
    results = {}
    for backend in ("torch", "onnx"):
        engine = LLMEngine(ckpt, EngineConfig(block_size=4, max_num_seqs=4, max_num_batched_tokens=16, backend=backend,
                                              onnx_dir=str(out) if backend == "onnx" else None))
        for i, p in enumerate(prompts):
            for compute in (ComputeParams(), ComputeParams(exit_price=price)):
                engine.add_request(f"{i}-{compute.exit_price}", p, SamplingParams(max_tokens=12, temperature=0.0,
                                                                                  ignore_eos=True), compute)
        tokens: dict[str, tuple[list[int], list[int]]] = {}
        while engine.has_unfinished():
            for o in engine.step():
                ids, depths = tokens.setdefault(o.request_id, ([], []))
                ids += o.new_token_ids
                depths += o.exit_depths
        assert engine.scheduler.kv_usage() == 0.0
        results[backend] = tokens
    assert results["onnx"] == results["torch"]
    assert all(len(ids) == 12 for ids, _ in results["onnx"].values())


def test_onnx_backend_refuses_graphs_of_another_model(exported):
    out, _ = exported
    ckpt, _ = tiny_checkpoint("fixed", "propagate")
    with pytest.raises(ValueError, match="different model"):
        LLMEngine(ckpt, EngineConfig(backend="onnx", onnx_dir=str(out)))
    with pytest.raises(ValueError, match="onnx_dir"):
        EngineConfig(backend="onnx")
    with pytest.raises(ValueError, match="backend"):
        EngineConfig(backend="tensorrt")
