"""The addition-with-thoughts task, its training with thought masks, and the RL sequence builder."""

import torch

from runtime.checkpoint import load_checkpoint
from runtime.thought_mask import thought_attention_mask
from training.tasks import IGNORE
from training.thought_decode import decode
from training.thought_rl import _sequences
from training.thought_tasks import (
    CARRY_BASE, END_THINK, EOS, PAD, THINK, addition_task, answer_text, format_problem, prompt_ids, thought_chain,
)
from training.trainer import TrainConfig, Trainer


def test_the_thought_chain_works_out_the_sum_digit_by_digit():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 10**6, (2, 500), generator=gen)
    thought, answer = thought_chain(a, b, 6)
    digits = torch.where(thought >= CARRY_BASE, thought - CARRY_BASE, thought)  # least significant first
    carry_out = thought[:, -1] >= CARRY_BASE
    total = (digits * 10 ** torch.arange(6)).sum(1) + carry_out.long() * 10**6
    assert torch.equal(total, a + b)
    assert ["".join(map(str, r)) for r in answer[:5].tolist()] == [answer_text(x, y, 6) for x, y in zip(a[:5].tolist(), b[:5].tolist())]
    tok = addition_task(n_digits=6, train_size=1, test_size=1).tokenizer
    assert tok.encode(format_problem(12345, 456789, 6)).ids == prompt_ids(torch.tensor([12345]), torch.tensor([456789]), 6)[0].tolist()


def test_batches_cut_thoughts_without_loss_on_forced_ends_and_held_out_problems_stay_out():
    task = addition_task(n_digits=4, train_size=5000, test_size=200)
    keys = lambda p: set((p[:, 0] * 10**4 + p[:, 1]).tolist())  # noqa: E731
    assert not keys(task.train_problems) & (keys(task.test_problems) | keys(task.valid_problems))
    ids, targets = task._batch(task.train_problems[:3], torch.tensor([0, 2, 4]))
    P = task.prompt_len
    assert (targets[:, : P - 1] == IGNORE).all()  # no loss on the operands
    assert targets[0, P - 1] == THINK and ids[0, P + 1] == END_THINK and targets[0, P] == IGNORE  # forced at 0
    assert ids[1, P + 3] == END_THINK and targets[1, P + 2] == IGNORE  # forced after 2 thoughts
    assert targets[2, P + 4] == END_THINK  # the full thought closes by itself: that is learnt
    assert (targets[0][ids[0] == PAD] == IGNORE).all() and EOS in targets[0].tolist()


def test_training_with_thought_masks_writes_the_thought_config_and_learns(tmp_path):
    torch.manual_seed(0)
    task = addition_task(n_digits=3, train_size=4000, test_size=64)
    gen = torch.Generator().manual_seed(1)
    ids, _ = task.train_batch(16, gen)
    mask = task.train_mask(ids, torch.Generator().manual_seed(2))
    discard = torch.rand(16, generator=torch.Generator().manual_seed(2)) < 0.5
    assert torch.equal(mask, thought_attention_mask(ids, THINK, END_THINK, discard)) and discard.any() and (~discard).any()
    tcfg = TrainConfig(task="addition", preset="tiny", steps=40, batch_size=32, lr=3e-3, warmup=2, audit_fraction=1.0,
                       value_weight=0.0, ds_weight=0.0, log_every=1, save_every=1000, bf16_autocast=False,
                       calibration_tokens=200, model_overrides=dict(max_seq_len=32, min_depth=2))
    final = Trainer(tcfg, task, tmp_path).fit()
    cfg = load_checkpoint(final).config
    assert (cfg.think_start_id, cfg.think_end_id, cfg.eos_id) == (THINK, END_THINK, EOS)
    assert cfg.thought_kv == ["keep", "discard"] and cfg.default_thought_tokens == 3
    import json
    losses = [json.loads(line)["loss_exit"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_rl_sequences_mark_sampled_thoughts_and_the_answer():
    P = 3  # prompt of 2 tokens and <think>
    ids = torch.tensor([[1, 2, THINK, 5, 6, END_THINK], [1, 2, THINK, 7, END_THINK, PAD]])
    forced = torch.tensor([[False, False, True], [False, False, False]])  # row 0's </think> was forced
    answer = torch.tensor([[4, 4], [3, 3]])
    seqs, thought_pos, answer_pos = _sequences(ids, forced, answer, P, END_THINK, EOS, PAD)
    assert seqs[0].tolist() == [1, 2, THINK, 5, 6, END_THINK, 4, 4, EOS]
    assert seqs[1].tolist() == [1, 2, THINK, 7, END_THINK, 3, 3, EOS, PAD]
    targets = seqs[:, 1:]
    assert targets[0][thought_pos[0]].tolist() == [5, 6]  # the forced </think> is not the policy's choice
    assert targets[1][thought_pos[1]].tolist() == [7, END_THINK]
    assert targets[0][answer_pos[0]].tolist() == [4, 4, EOS] and targets[1][answer_pos[1]].tolist() == [3, 3, EOS]


def test_reference_decode_caps_thoughts_like_the_engine():
    torch.manual_seed(0)
    task = addition_task(n_digits=3, train_size=10, test_size=8)
    from runtime.config import ModelConfig
    from runtime.model import PonderModel
    model = PonderModel(ModelConfig.from_name("tiny", vocab_size=26, eos_id=EOS, pad_id=PAD, think_start_id=THINK,
                                              think_end_id=END_THINK)).eval()
    prompts = torch.cat([prompt_ids(task.test_problems[:, 0], task.test_problems[:, 1], 3),
                         torch.full((8, 1), THINK)], 1)
    with torch.no_grad():
        dec = decode(model, prompts, 6, 2, discard=True)
    assert (dec.num_thought_tokens <= 2).all()
    closes = (dec.ids[:, prompts.shape[1] :] == END_THINK).float().argmax(1)
    assert torch.equal(closes, dec.num_thought_tokens)  # </think> right after the thoughts
