"""One step beyond supervised thoughts: REINFORCE on the thought tokens, TRICE-style.

For each problem x, K thoughts z_k ~ p(z | x) are sampled (temperature 1, capped at
max_thought_tokens by forcing `</think>`). The reward of z_k is the answer's log-likelihood
r_k = log p(y | x, z_k), and the baseline is the mean reward of the other K-1 samples of the same
problem (a leave-one-out control variate, as in TRICE). The loss is

    - mean_k (r_k - b_k) * log p(z_k | x)   - mean_k log p(y | x, z_k)

which ascends the marginal answer likelihood E_z[log p(y | x, z)]: thoughts that make the answer
likelier get likelier, and the answer learns to read the thoughts the policy now writes. No
thought is ever supervised here; only the answer is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from runtime.checkpoint import load_checkpoint, save_checkpoint
from runtime.model import PonderModel
from runtime.thought_mask import thought_attention_mask
from training.thought_decode import decode, held_out_accuracy
from training.thought_tasks import thought_task_for


@dataclass
class RLConfig:
    steps: int = 200
    batch_size: int = 32  # problems per step
    samples: int = 4  # thoughts per problem
    lr: float = 1e-4
    max_thought_tokens: int | None = None  # default: the trained length
    thought_kv: str = "keep"
    seed: int = 0
    eval_problems: int = 500
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.samples < 2:
            raise ValueError(f"steps={self.steps} and batch_size={self.batch_size} must be >= 1, samples="
                             f"{self.samples} >= 2 (the baseline is the other samples' mean)")
        if self.thought_kv not in ("keep", "discard"):
            raise ValueError(f"thought_kv={self.thought_kv!r} must be 'keep' or 'discard'")


def _sequences(ids: torch.Tensor, forced: torch.Tensor, answer: torch.Tensor, P: int, end_id: int, eos: int, pad: int):
    """Sampled rows (prompt and <think>: P tokens, then the thought) -> full rows with the answer
    appended, and the target positions of sampled thought tokens and of answer tokens ((N, T-1) bool).
    A thought that stopped without </think> (an <eos> inside it) is closed by a forced one."""
    rows, thought_pos, answer_pos = [], [], []
    for r in range(len(ids)):
        row = ids[r].tolist()
        closed = end_id in row[P:]
        e = row.index(end_id, P) if closed else next((j for j in range(P, len(row)) if row[j] in (eos, pad)), len(row))
        full = row[:e] + [end_id] + answer[r].tolist() + [eos]
        rows.append(full)
        sampled = [P - 1 + j for j in range(e + closed - P) if not forced[r, j]]  # token P+j is target P+j-1
        thought_pos.append(sampled)
        answer_pos.append(list(range(e, len(full) - 1)))
    T = max(len(x) for x in rows)
    seqs = torch.full((len(rows), T), pad)
    tp = torch.zeros(len(rows), T - 1, dtype=torch.bool)
    ap = torch.zeros_like(tp)
    for r, (row, t, a) in enumerate(zip(rows, thought_pos, answer_pos)):
        seqs[r, : len(row)] = torch.tensor(row)
        tp[r, t], ap[r, a] = True, True
    return seqs, tp, ap


def rl_finetune(checkpoint: Path, out: Path, rc: RLConfig) -> dict:
    ckpt = load_checkpoint(checkpoint)
    model, cfg = ckpt.model, ckpt.config
    if rc.thought_kv not in cfg.thought_kv:
        raise ValueError(f"{checkpoint} was trained for thought_kv {cfg.thought_kv}, not {rc.thought_kv!r}")
    task = thought_task_for(cfg, checkpoint)
    n = task.thought_len
    cap = n if rc.max_thought_tokens is None else rc.max_thought_tokens
    discard = rc.thought_kv == "discard"
    caps = sorted({0, n // 2, n, cap})
    before = held_out_accuracy(model, task, caps, discard, rc.eval_problems)
    print(f"held-out accuracy before RL ({rc.thought_kv}): {before}")
    opt = torch.optim.AdamW(model.parameters(), lr=rc.lr, weight_decay=0.0, betas=(0.9, 0.95))
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "metrics.jsonl").open("w")
    P, K = task.prompt_len + 1, rc.samples  # thoughts are sampled after the prompt and <think>
    bar = tqdm(range(rc.steps), desc="rl-thoughts", dynamic_ncols=True)
    for step in bar:
        gen = torch.Generator().manual_seed(rc.seed * 1_000_003 + step)
        problems = task.sample_train(rc.batch_size, gen).repeat_interleave(K, 0)
        prompts, chain, answer = task.parts(problems)
        prompts = torch.cat([prompts, torch.full((len(prompts), 1), cfg.think_start_id)], 1)
        model.eval()
        with torch.no_grad():
            dec = decode(model, prompts, cap + 2, cap, discard, temperature=1.0, generator=gen, stop_at_think_end=True)
        seqs, thought_pos, answer_pos = _sequences(dec.ids, dec.forced, answer, P, cfg.think_end_id, cfg.eos_id,
                                                   cfg.pad_id)
        ids, targets = seqs[:, :-1], seqs[:, 1:]
        model.train()
        mask = thought_attention_mask(ids, cfg.think_start_id, cfg.think_end_id, True) if discard else None
        logp = torch.log_softmax(model(ids, mask=mask).logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
        thought_lp = (logp * thought_pos).sum(1)
        answer_lp = (logp * answer_pos).sum(1)
        reward = answer_lp.detach().view(-1, K)
        baseline = (reward.sum(1, keepdim=True) - reward) / (K - 1)
        advantage = (reward - baseline).view(-1)
        loss = -(advantage * thought_lp).mean() - answer_lp.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        k = min(cap, n, dec.ids.shape[1] - P)  # how far the sampled thought follows the supervised chain
        match = (dec.ids[:, P : P + k] == chain[:, :k]).all(1).float().mean().item()
        metrics = {"step": step + 1, "reward": reward.mean().item(), "answer_nll": -answer_lp.mean().item(),
                   "thought_tokens": dec.num_thought_tokens.float().mean().item(), "chain_match": match,
                   "answer_correct_p": answer_lp.exp().mean().item()}
        if (step + 1) % rc.log_every == 0 or step + 1 == rc.steps:
            log.write(json.dumps(metrics) + "\n")
            log.flush()
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", match=f"{match:.2f}")
    log.close()
    after = held_out_accuracy(model, task, caps, discard, rc.eval_problems)
    print(f"held-out accuracy after RL ({rc.thought_kv}): {after}")
    cfg.notes = {**cfg.notes, "rl_thoughts": {**asdict(rc), "from": str(checkpoint)}}
    save_checkpoint(out / "final", model, ckpt.tokenizer, ckpt.calibration)
    summary = {"config": asdict(rc), "from": str(checkpoint), "before": before, "after": after}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
