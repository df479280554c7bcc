"""The shell-game thought task, and the shipped checkpoint that needs its thoughts and serves them
with their KV discarded."""

import json
import random
from pathlib import Path

import pytest
import torch

from runtime.checkpoint import load_checkpoint
from training.swap_task import END_THINK, EOS, ITEMS, SWAPS, THINK, _keys, swap_task
from training.thought_decode import held_out_accuracy
from training.thought_eval import evaluate_thoughts
from training.thought_tasks import thought_task_for, trained_modes

CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "swaps-think"


def test_the_thought_is_the_arrangement_after_each_swap_and_the_answer_the_last():
    task = swap_task(n_swaps=7, test_size=50)
    rng = random.Random(0)
    problems = torch.tensor([[rng.randrange(len(SWAPS)) for _ in range(7)] for _ in range(40)])
    prompt, thought, answer = task.parts(problems)
    tok = task.tokenizer
    for row, p, t, a in zip(problems.tolist(), prompt.tolist(), thought.tolist(), answer.tolist()):
        cups = list(ITEMS)
        states = []
        for s in row:
            i, j = SWAPS[s]
            cups[i], cups[j] = cups[j], cups[i]
            states.append("".join(cups).lower() + " ")
        assert tok.decode(t) == "".join(states)
        assert tok.decode(a) == "".join(cups) == task.answer_text(row)
        assert tok.encode(task.format_problem(row)).ids == p
    ids, targets = task._batch(problems[:2], torch.tensor([7, 0]))
    P = task.prompt_len
    assert ids[0, P] == THINK and ids[0, P + 8] == END_THINK and targets[0, P + 7] == END_THINK  # learnt close
    assert ids[1, P + 1] == END_THINK and targets[1, P] == -100  # the forced close at 0 thoughts carries no loss
    assert targets[1].tolist().count(EOS) == 1


def test_held_out_problems_are_distinct_and_never_drawn_for_training():
    task = swap_task(n_swaps=4, test_size=500)  # 1000 of the 10^4 problems held out: clashes are frequent
    held = set(_keys(torch.cat([task.valid_problems, task.test_problems])).tolist())
    assert len(held) == 1000
    gen = torch.Generator().manual_seed(0)
    drawn = torch.cat([task.sample_train(1000, gen) for _ in range(5)])
    assert not held & set(_keys(drawn).tolist())
    assert len(set(_keys(drawn).tolist())) > 3000  # still drawn from the rest, not from a small pool
    assert swap_task(n_swaps=4, test_size=500).test_problems.equal(task.test_problems)  # the split is fixed


def test_thought_kv_modes_follow_the_discard_share():
    assert trained_modes(0.0) == ["keep"] and trained_modes(0.5) == ["keep", "discard"]
    assert trained_modes(1.0) == ["discard"]
    with pytest.raises(ValueError, match="discard_fraction"):
        trained_modes(1.5)
    with pytest.raises(ValueError, match="n_swaps"):
        swap_task(n_swaps=2)


def test_the_shipped_checkpoint_needs_its_thoughts_and_reads_them_after_discard():
    ckpt = load_checkpoint(CHECKPOINT)
    cfg = ckpt.config
    assert cfg.thought_kv == ["keep", "discard"] and cfg.notes["task"] == "swaps"
    task = thought_task_for(cfg)
    n = task.thought_len
    torch.set_num_threads(1)
    acc = {mode: held_out_accuracy(ckpt.model, task, [0, n], mode == "discard", 300) for mode in ("keep", "discard")}
    assert acc["keep"][n] >= 0.95
    assert acc["discard"][n] >= 0.9 * acc["keep"][n]
    assert acc["keep"][0] <= 0.3 and acc["discard"][0] <= 0.3  # answering directly fails


def test_eval_thoughts_serves_the_checkpoint_and_discard_holds_fewer_blocks(tmp_path):
    result = evaluate_thoughts(CHECKPOINT, 32, 16, str(tmp_path / "t"), rounds=2)
    n = result["trained_thought_tokens"]
    full = {r["thought_kv"]: r for r in result["runs"] if r["max_thought_tokens"] == n}
    assert full["keep"]["accuracy"] >= 0.9 and full["discard"]["accuracy"] >= 0.9
    assert full["discard"]["peak_blocks_per_problem"] < full["keep"]["peak_blocks_per_problem"]
    assert full["discard"]["mean_blocks"] < full["keep"]["mean_blocks"]
    assert len(result["throughput"]["answers_per_s"]) == 2
    assert json.loads((tmp_path / "t.json").read_text())["task"] == "swaps" and (tmp_path / "t.png").is_file()


def test_the_reference_table_shows_why_addition_think_is_not_the_discard_checkpoint(tmp_path):
    from training.thought_eval import evaluate_reference

    result = evaluate_reference(CHECKPOINT.parent / "addition-think", 100, str(tmp_path / "r"))
    acc = result["accuracy"]
    assert acc["keep"][6] >= 0.9 and acc["discard"][6] < 0.3  # every answer digit was a thought token
    assert json.loads((tmp_path / "r.json").read_text())["accuracy"]["keep"]["6"] == acc["keep"][6]
