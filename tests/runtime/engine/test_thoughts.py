"""Thought tokens in the engine: the cap, hidden content, counting, and thought KV keep/discard
against the reference forward with the matching mask; blocks freed after each thought, no leaks."""

import random

import pytest
import torch

from runtime.calibration import Calibration
from runtime.checkpoint import Checkpoint
from runtime.config import ConfigError, ModelConfig
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.params import ComputeParams, ParamError, SamplingParams
from runtime.model import PonderModel
from runtime.thought_mask import thought_attention_mask
from training.tasks import symbol_tokenizer

SYMBOLS = [chr(ord("a") + i) for i in range(26)] + [chr(ord("A") + i) for i in range(26)] + list("0123456789")[:8]
THINK, END, EOS, PAD = 60, 61, 62, 63
SYMBOLS += ["<think>", "</think>", "<eos>", "<pad>"]


def make_engine(seed=0, thought_kv=("keep", "discard"), default_thought_tokens=None, kv_fill="propagate",
                min_depth=0, **engine_kwargs) -> LLMEngine:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny", kv_fill=kv_fill, n_pool=2, max_depth=2, min_depth=min_depth, max_seq_len=64, eos_id=EOS,
                                pad_id=PAD, think_start_id=THINK, think_end_id=END, thought_kv=list(thought_kv),
                                default_thought_tokens=default_thought_tokens)
    model = PonderModel(cfg).eval()
    ckpt = Checkpoint(model=model, tokenizer=symbol_tokenizer(SYMBOLS), calibration=Calibration.uncalibrated())
    return LLMEngine(ckpt, EngineConfig(**{"block_size": 4, "max_num_seqs": 8, "max_num_batched_tokens": 64,
                                           **engine_kwargs}))


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams, ComputeParams]], on_step=None):
    for rid, (prompt, sampling, compute) in requests.items():
        engine.add_request(rid, prompt, sampling, compute)
    results = {rid: {"tokens": [], "logprobs": [], "text": "", "reasoning": "", "hidden": [], "thoughts": 0}
               for rid in requests}
    while engine.has_unfinished():
        outs = engine.step()
        for out in outs:
            r = results[out.request_id]
            r["tokens"] += out.new_token_ids
            r["logprobs"] += [lp.logprob for lp in out.logprobs]
            r["text"] += out.new_text
            r["reasoning"] += out.new_reasoning_text
            r["hidden"] += out.hidden
            r["thoughts"] = out.output.num_thought_tokens
        if on_step:
            on_step(engine, outs)
    return results


def prompts_with_thought(rng: random.Random, n: int) -> list[list[int]]:
    """Random prompts that end with <think>, so every request starts in a thought."""
    return [[rng.randrange(60) for _ in range(rng.randint(1, 14))] + [THINK] for _ in range(n)]


def test_thought_mask_hides_the_span_only_after_the_first_visible_token():
    ids = torch.tensor([[1, 2, THINK, 5, 6, END, 7, 8]])
    keep = thought_attention_mask(ids, THINK, END, False)[0, 0]
    discard = thought_attention_mask(ids, THINK, END, True)[0, 0]
    assert torch.equal(keep, torch.tril(torch.ones(8, 8, dtype=torch.bool)))
    assert discard[5, 2:5].all()  # </think> still reads its thoughts
    assert not discard[6:, 2:5].any()  # the first visible token and later never do
    assert discard[6:, [0, 1, 5]].all()  # ...but see the prompt and </think>
    per_row = thought_attention_mask(torch.cat([ids, ids]), THINK, END, torch.tensor([False, True]))
    assert torch.equal(per_row[0, 0], keep) and torch.equal(per_row[1, 0], discard)


def reference_logprobs(model, prompt, tokens, discard: bool) -> torch.Tensor:
    ids = torch.tensor([prompt + tokens[:-1]])
    mask = thought_attention_mask(ids, THINK, END, discard) if discard else None
    with torch.no_grad():
        logits = model(ids, mask=mask).logits[0, len(prompt) - 1 :]
    return torch.log_softmax(logits.float(), -1)


@pytest.mark.parametrize("kv_fill", ["propagate", "shared"])
@pytest.mark.parametrize("mode", ["keep", "discard"])
def test_engine_matches_the_reference_forward_under_thought_kv(mode, kv_fill):
    engine = make_engine(kv_fill=kv_fill)
    rng = random.Random(0)
    prompts = prompts_with_thought(rng, 6)
    sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    caps = [0, 1, 2, 3, 5, 7]
    requests = {f"r{i}": (p, sampling, ComputeParams(max_thought_tokens=c, thought_kv=mode))
                for i, (p, c) in enumerate(zip(prompts, caps))}
    results = run(engine, requests)
    model = engine.ckpt.model
    for (prompt, _, compute), r in zip(requests.values(), results.values()):
        tokens = r["tokens"]
        assert END in tokens and r["thoughts"] == tokens.index(END) <= compute.max_thought_tokens
        ref = reference_logprobs(model, prompt, tokens, mode == "discard")
        chosen = ref.gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(r["logprobs"]), chosen, rtol=1e-4, atol=1e-4)
        forced = tokens.index(END) == compute.max_thought_tokens
        free = [j for j, t in enumerate(tokens) if not (forced and j == tokens.index(END))]
        assert [tokens[j] for j in free] == ref.argmax(-1)[free].tolist()  # greedy except the forced </think>
        if mode == "discard":  # the span really was dropped: keep would have given other logits after it
            after = tokens.index(END) + 2
            keep = reference_logprobs(model, prompt, tokens, False)
            assert not torch.allclose(keep[after:], ref[after:], atol=1e-3)
    assert engine.scheduler.allocator.num_used == 0


def test_discard_frees_each_thought_span_and_nothing_leaks():
    engine = make_engine(block_size=4)
    rng = random.Random(1)
    prompts = prompts_with_thought(rng, 5)
    sampling = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    requests = {f"r{i}": (p, sampling, ComputeParams(max_thought_tokens=9, thought_kv="discard"))
                for i, p in enumerate(prompts)}
    tables: dict[str, list[int]] = {rid: [] for rid in requests}
    usage: list[int] = []

    def on_step(engine, outs):
        usage.append(engine.scheduler.allocator.num_used)
        for rid in requests:
            req = engine.scheduler.get_request(rid)
            if req is not None:
                tables[rid].append((len(req.output_token_ids), req.num_discarded, len(req.block_table)))

    results = run(engine, requests, on_step)
    for rid, (prompt, _, _) in requests.items():
        tokens = results[rid]["tokens"]
        end = len(prompt) + tokens.index(END)  # token index of </think>
        start = len(prompt) - 1
        for num_out, discarded, num_blocks in tables[rid]:
            known = len(prompt) + num_out
            if known > end + 2:  # the token after </think> came out a step ago: the span is gone
                assert discarded == end - start
            elif known <= end + 1:
                assert discarded == 0
            # blocks held never exceed what the cached positions need
            assert num_blocks <= -(-(known - discarded) // 4)
        after = [b for n, d, b in tables[rid] if d]
        assert after and min(after) < max(b for _, _, b in tables[rid])  # the request's block count fell
    assert max(usage) > usage[-1] == 0 == engine.scheduler.allocator.num_used  # nothing leaks
    assert engine.scheduler.allocator.num_free == engine.scheduler.config.num_kv_blocks


def test_discard_survives_preemption_by_recompute():
    rng = random.Random(2)
    prompts = prompts_with_thought(rng, 6)
    sampling = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0)
    requests = {f"r{i}": (p, sampling, ComputeParams(max_thought_tokens=4, thought_kv="discard"))
                for i, p in enumerate(prompts)}
    roomy = run(make_engine(), requests)
    tight_engine = make_engine(num_kv_blocks=12, max_num_seqs=6)
    preempted = set()

    def on_step(engine, outs):
        preempted.update(r.request_id for r in engine.scheduler.requests.values()
                         if r.num_preemptions and r.num_spans_discarded)

    tight = run(tight_engine, requests, on_step)
    assert preempted  # some request was evicted after dropping a thought, and replayed it
    for rid in requests:
        assert tight[rid]["tokens"] == roomy[rid]["tokens"]
        torch.testing.assert_close(torch.tensor(tight[rid]["logprobs"]), torch.tensor(roomy[rid]["logprobs"]),
                                   rtol=1e-4, atol=1e-4)
    assert tight_engine.scheduler.allocator.num_used == 0


def test_thoughts_are_hidden_counted_capped_and_returned_on_request():
    engine = make_engine(default_thought_tokens=6, min_depth=2)  # fixed depth: the budget acts on thoughts only
    prompt = [1, 2, 3, THINK]
    sampling = SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)  # seeded: same stream each
    results = run(engine, {
        "shown": (prompt, sampling, ComputeParams(max_thought_tokens=3, include_thoughts=True)),
        "hidden": (prompt, sampling, ComputeParams(max_thought_tokens=3)),
        "budget": (prompt, sampling, ComputeParams(compute_budget=0.5)),  # round(0.5 * 6) = 3
        "zero": (prompt, sampling, ComputeParams(max_thought_tokens=0)),
    })
    shown, hidden = results["shown"], results["hidden"]
    assert shown["tokens"] == hidden["tokens"] == results["budget"]["tokens"]
    end = shown["tokens"].index(END)
    assert end <= 3 and shown["thoughts"] == end
    tok = engine.tokenizer
    assert shown["reasoning"] == tok.decode(shown["tokens"][:end]) and hidden["reasoning"] == ""
    visible = [t for t in shown["tokens"][end + 1 :] if t not in (THINK, END)]
    assert visible and shown["text"] == hidden["text"] == tok.decode(visible)
    assert shown["hidden"] == [True] * (end + 1) + [t in (THINK, END) for t in shown["tokens"][end + 1 :]]
    assert results["zero"]["tokens"][0] == END and results["zero"]["thoughts"] == 0


def test_thought_params_are_validated_against_the_checkpoint():
    keep_only = make_engine(thought_kv=("keep",))
    sampling = SamplingParams(max_tokens=4)
    with pytest.raises(ParamError, match="thought_kv"):
        keep_only.add_request("a", [1, 2], sampling, ComputeParams(thought_kv="discard"))
    with pytest.raises(ParamError, match="max_thought_tokens"):
        keep_only.add_request("b", [1, 2], sampling, ComputeParams(max_thought_tokens=-1))
    with pytest.raises(ConfigError, match="thought_kv"):
        ModelConfig.from_name("tiny", thought_kv=["forget"])
    with pytest.raises(ConfigError, match="think_start_id"):
        ModelConfig.from_name("tiny", thought_kv=["keep", "discard"])
    with pytest.raises(ConfigError, match="default_thought_tokens"):
        ModelConfig.from_name("tiny", think_start_id=1, think_end_id=2, default_thought_tokens=-3)
