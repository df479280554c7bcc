"""The engine end to end on a tiny model: batch invariance, budgets, sampling, stops, no leaks."""

import random

import pytest
import torch

from runtime.calibration import Calibration
from runtime.checkpoint import Checkpoint
from runtime.config import ModelConfig
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.generate import generate
from runtime.engine.params import ComputeParams, ParamError, SamplingParams
from runtime.engine.scheduler import OverloadedError
from runtime.engine.validation import RequestTooLongError
from runtime.model import ExitSpec, PonderModel
from training.tasks import symbol_tokenizer

SYMBOLS = [chr(ord("a") + i) for i in range(26)] + [chr(ord("A") + i) for i in range(26)] + list(" .,!?-'\n;:0123456789")[:12]


def make_engine(kv_fill="propagate", seed=0, **engine_kwargs) -> LLMEngine:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny", kv_fill=kv_fill, n_pool=3, max_depth=3, max_seq_len=64, eos_id=63)
    model = PonderModel(cfg).eval()
    with torch.no_grad():
        scores = model(torch.randint(0, 64, (4, 32))).exit_scores.flatten()
    prices = sorted(float(scores.quantile(q)) for q in (0.1, 0.3, 0.5, 0.7, 0.9))
    # A real (if small) calibration of this random model, so budgets map to working prices.
    fracs = []
    with torch.no_grad():
        ids = torch.randint(0, 64, (4, 32))
        for p in prices:
            fracs.append(float(model(ids, ExitSpec(price=p)).depth.float().mean()) / 3)
    calibration = Calibration(prices=prices, depth_fractions=fracs, measured_on="random",
                              quality=[{"budget": 1.0, "ppl": 60.0, "ppl_increase": 0.0}, {"budget": 0.5, "ppl": 66.0,
                                                                                           "ppl_increase": 0.1}],
                              quality_measured_on="test data")
    ckpt = Checkpoint(model=model, tokenizer=symbol_tokenizer(SYMBOLS), calibration=calibration)
    return LLMEngine(ckpt, EngineConfig(**{"block_size": 4, "max_num_seqs": 8, "max_num_batched_tokens": 64, **engine_kwargs}))


def drain(engine: LLMEngine, limit: int = 10_000) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for _ in range(limit):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            r = results.setdefault(out.request_id, {"tokens": [], "depths": [], "text": "", "finish": None})
            r["tokens"] += out.new_token_ids
            r["depths"] += out.exit_depths
            r["text"] += out.new_text
            if out.finished:
                r["finish"] = out.finish_reason
    assert not engine.has_unfinished()
    return results


@pytest.mark.parametrize("kv_fill", ["propagate", "latest", "shared"])
def test_greedy_is_batch_invariant_and_matches_the_reference(kv_fill):
    rng = random.Random(0)
    prompts = [[rng.randrange(63) for _ in range(rng.randint(1, 20))] for _ in range(10)]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    alone = {}
    for i, p in enumerate(prompts[:3]):
        engine = make_engine(kv_fill)
        engine.add_request(f"r{i}", p, greedy, ComputeParams(exit_price=engine.ckpt.calibration.prices[2]))
        alone[f"r{i}"] = drain(engine)[f"r{i}"]
    engine = make_engine(kv_fill, num_kv_blocks=24)  # small cache: preemption by recompute happens too
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, greedy, ComputeParams(exit_price=engine.ckpt.calibration.prices[2]))
    together = drain(engine)
    for rid, r in alone.items():
        assert together[rid]["tokens"] == r["tokens"]
        assert together[rid]["depths"] == r["depths"]
    # The oracle: the reference forward, recomputing the whole sequence for every token.
    for i in range(3):
        ref = generate(engine.ckpt.model, prompts[i], 8, ExitSpec(price=engine.ckpt.calibration.prices[2]))
        assert together[f"r{i}"]["tokens"] == ref.token_ids and together[f"r{i}"]["depths"] == ref.exit_depths
    assert engine.scheduler.allocator.num_used == 0


def test_budget_lowers_depth_and_accounting_adds_up():
    engine = make_engine()
    prompt = list(range(20))
    engine.add_request("full", prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), ComputeParams(compute_budget=1.0))
    engine.add_request("half", prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), ComputeParams(compute_budget=0.4))
    out = drain(engine)
    assert out["full"]["depths"] == [3] * 12
    assert sum(out["half"]["depths"]) < sum(out["full"]["depths"])
    assert engine.num_core_steps == sum(engine.block_steps) == engine.executor.num_block_calls
    assert engine.num_core_steps < engine.num_core_steps_full == (2 * 20 + 2 * 11) * 3


def test_seeded_sampling_reproduces_across_batches():
    params = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, min_p=0.01, seed=1234, ignore_eos=True,
                            repetition_penalty=1.2, presence_penalty=0.5)
    engine = make_engine()
    engine.add_request("a", [1, 2, 3], params)
    first = drain(engine)["a"]["tokens"]
    engine = make_engine()
    engine.add_request("x", [5, 6], SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True))
    engine.add_request("a", [1, 2, 3], params)
    assert drain(engine)["a"]["tokens"] == first


def test_stop_strings_stop_ids_min_tokens_and_eos():
    engine = make_engine()
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    engine.add_request("free", [1, 2, 3], greedy)
    free = drain(engine)["free"]
    stop_token = free["tokens"][3]
    engine.add_request("ids", [1, 2, 3], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_token]))
    engine.add_request("min", [1, 2, 3], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_token],
                                                            min_tokens=free["tokens"].index(stop_token) + 1))
    stop_text = free["text"][5:7]
    engine.add_request("str", [1, 2, 3], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop_text]))
    out = drain(engine)
    assert out["ids"]["finish"] == "stop" and out["ids"]["tokens"][-1] == stop_token
    assert stop_token not in out["min"]["tokens"][: free["tokens"].index(stop_token) + 1]
    assert out["str"]["finish"] == "stop" and stop_text not in out["str"]["text"]
    assert free["text"].startswith(out["str"]["text"])


def test_abort_failure_and_overload_free_every_block():
    engine = make_engine(max_num_seqs=2, max_waiting=2)  # 2 running and 2 waiting at most
    for i in range(4):
        engine.add_request(f"r{i}", list(range(10)), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    with pytest.raises(OverloadedError):
        engine.add_request("one-too-many", [1], SamplingParams())
    engine.step()
    engine.step()
    assert engine.abort("r0") and not engine.abort("r0")
    real_run = engine.executor.run
    engine.executor.run = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost"))
    failed = engine.step()  # a failing step fails its requests and leaves the engine usable
    engine.executor.run = real_run
    assert failed and all(o.finish_reason == "error" and "device lost" in o.error for o in failed)
    engine.add_request("after", [1, 2], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert drain(engine)["after"]["finish"] == "length"
    assert engine.scheduler.allocator.num_used == 0 and engine.kv_usage() == 0


@pytest.mark.parametrize("fields, param", [
    (dict(compute_budget=0.0), "compute_budget"), (dict(compute_budget=1.5), "compute_budget"),
    (dict(max_depth=9), "max_depth"), (dict(min_depth=-1), "min_depth"), (dict(exit_price=-1.0), "exit_price"),
    (dict(min_depth=3, max_depth=1), "min_depth"),
])
def test_bad_compute_params_name_the_field(fields, param):
    engine = make_engine()
    with pytest.raises(ParamError) as e:
        engine.add_request("bad", [1, 2], SamplingParams(), ComputeParams(**fields))
    assert e.value.param == param
    assert not engine.has_unfinished()


def test_bad_prompts_and_sampling_params():
    engine = make_engine()
    with pytest.raises(ParamError, match="prompt"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ParamError, match="vocabulary"):
        engine.add_request("oov", [1, 999], SamplingParams())
    with pytest.raises(RequestTooLongError):
        engine.add_request("long", list(range(60)), SamplingParams(max_tokens=10))
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(logprobs=50), dict(n=0)):
        with pytest.raises(ParamError):
            SamplingParams(**bad)
