"""Kernel warm-up: the engine core runs at start-up every GEMM shape its steps can run, because oneDNN
builds and keeps a kernel (~0.5-1.5 MB) for each shape it meets; bf16 linears bucket their rows."""

import random

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from runtime import attention, layers
from runtime.calibration import Calibration
from runtime.checkpoint import Checkpoint
from runtime.config import ModelConfig
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.params import ComputeParams, SamplingParams
from runtime.layers import Linear, onednn_candidate, set_linear_kernel
from runtime.model import PonderModel
from training.tasks import symbol_tokenizer

GEMMS = {torch.ops.aten.linear.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
         torch.ops.aten.bmm.default}


class GemmShapes(TorchDispatchMode):
    """The (op, input shapes) of every GEMM run under it."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS or "linear_pointwise" in str(func):
            self.seen.add((str(func), *(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))


def test_bf16_aten_linears_run_bucketed_row_counts():
    mode = layers._mode
    set_linear_kernel("aten")
    try:
        torch.manual_seed(0)
        lin = Linear(32, 24, bias=True).to(torch.bfloat16)
        with torch.inference_mode(), GemmShapes() as gemms:
            outs = {rows: lin(torch.randn(rows, 32, dtype=torch.bfloat16)) for rows in range(17, 41)}
    finally:
        set_linear_kernel(mode)
    assert {s[1][0] for s in gemms.seen} == {32, 48}  # 17..32 -> 32 rows, 33..40 -> 48
    for rows, out in outs.items():
        assert out.shape == (rows, 24)


def test_bucketed_rows_give_the_rows_of_f_linear():
    torch.manual_seed(0)
    lin = Linear(32, 24, bias=True).to(torch.bfloat16)
    x = torch.randn(2, 19, 32, dtype=torch.bfloat16)  # 38 rows, run as 48
    with torch.inference_mode():
        got = lin(x)
    torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), rtol=2e-2, atol=2e-2)


def bf16_engine(**engine_kwargs) -> LLMEngine:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", n_pool=3, max_depth=3, max_seq_len=64, eos_id=63)
    model = PonderModel(cfg).eval().to(torch.bfloat16)
    ckpt = Checkpoint(model=model, tokenizer=symbol_tokenizer([chr(65 + i) for i in range(64)]),
                      calibration=Calibration.uncalibrated())
    return LLMEngine(ckpt, EngineConfig(max_num_seqs=6, max_num_batched_tokens=48, **engine_kwargs))


def test_after_warm_up_a_varied_workload_meets_no_new_gemm_shape():
    linear_mode, attention_mode = layers._mode, attention._mode
    set_linear_kernel("onednn" if onednn_candidate(torch.bfloat16) else "aten")
    attention.set_attention_kernel("grouped")  # its GEMM shapes are bucketed too
    try:
        with GemmShapes() as start:
            engine = bf16_engine()
        rng = random.Random(0)
        with GemmShapes() as serving:
            for i in range(40):  # prompts of 1..40 tokens, 1..8 new tokens, exits by price: batches of every shape
                engine.add_request(f"r{i}", [rng.randrange(64) for _ in range(rng.randint(1, 40))],
                                   SamplingParams(max_tokens=rng.randint(1, 8), temperature=0.0, ignore_eos=True),
                                   ComputeParams(exit_price=rng.choice([0.0, 0.05, 0.2, 1.0])))
                if i % 3 == 0:
                    engine.step()
            while engine.has_unfinished():
                engine.step()
        assert serving.seen and serving.seen <= start.seen, sorted(serving.seen - start.seen)[:5]
        with GemmShapes() as cold:
            bf16_engine(warm_up=False)
        assert not cold.seen  # nothing runs at start-up without warm-up
    finally:
        set_linear_kernel(linear_mode)
        attention.set_attention_kernel(attention_mode)
