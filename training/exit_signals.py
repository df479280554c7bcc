"""Exit signals besides the value head, for eval-exits to compare on equal footing (DESIGN section 2).

Each signal is a per-depth score (D, N, T), higher meaning "safe to leave here"; a token exits at
the first depth >= min_depth whose score reaches a threshold, and the threshold is bisected on the
val split to hit the budget (exit_eval.calm_depths / calm_threshold), then those depths run through
the real forward with kv_fill, as CALM's softmax confidence does there.

  classifier  CALM's trained classifier: a logistic head per depth on the (RMS-normalised) state,
              trained on the training split to predict "this depth's top-1 equals the final top-1".
              Cost per test: one d_model dot product.
  latent      Huginn's latent criterion: the state's relative change over the last step,
              -|h_s - h_(s-1)| / |h_(s-1)|. No training; cost per test: two norms.
  oracle      not a signal but a bound: each token's depth chosen with hindsight (its label's NLL at
              every depth, from the full-depth states), trading NLL against depth with one
              multiplier per budget. It separates what the exit signal loses from what the
              backbone cannot give at that depth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm


class AgreementClassifier(nn.Module):
    def __init__(self, max_depth: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_depth, d_model))
        self.bias = nn.Parameter(torch.zeros(max_depth))

    def forward(self, states: Tensor, normed: bool = False) -> Tensor:
        """states (D, ..., d) entering each step -> agreement logits (D, ...)."""
        x = states if normed else F.rms_norm(states.float(), (states.shape[-1],))
        w = self.weight.view(self.weight.shape[0], *([1] * (x.dim() - 2)), -1)
        return (x * w).sum(-1) + self.bias.view(-1, *([1] * (x.dim() - 2)))


def train_classifier(states: Tensor, agree: Tensor, min_depth: int, steps: int = 300, lr: float = 1e-2) -> AgreementClassifier:
    """Fit the per-depth logistic heads on full-depth states (D+1, N, T, d) and labels agree (D, N, T)."""
    D = agree.shape[0]
    clf = AgreementClassifier(D, states.shape[-1])
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    x, y = F.rms_norm(states[:D].float(), (states.shape[-1],)), agree[min_depth:].float()
    for _ in tqdm(range(steps), desc="agreement classifier", unit="step"):
        loss = F.binary_cross_entropy_with_logits(clf(x, normed=True)[min_depth:], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.requires_grad_(False)


def latent_scores(states: Tensor) -> Tensor:
    """(D, N, T): minus the relative change of the state over the step before each depth (0 at depth 0)."""
    prev, cur = states[:-2].float(), states[1:-1].float()
    change = (cur - prev).norm(dim=-1) / prev.norm(dim=-1).clamp_min(1e-6)
    return torch.cat([torch.full_like(change[:1], -float("inf")), -change])


def oracle_depths(nll: Tensor, budget_layers: float, min_depth: int) -> Tensor:
    """Per-token depth minimising nll[d] + lam * d over d in [min_depth, D], lam bisected so the mean
    depth is budget_layers. nll: (D+1, N, T), each token's label NLL decoded at depth d."""
    D = nll.shape[0] - 1
    steps = torch.arange(D + 1, dtype=nll.dtype).view(-1, *([1] * (nll.dim() - 1)))
    allowed = nll[min_depth:]

    def depths(lam: float) -> Tensor:
        return (allowed + lam * steps[min_depth:]).argmin(0) + min_depth

    lo, hi = 0.0, 100.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if depths(mid).float().mean() > budget_layers:
            lo = mid
        else:
            hi = mid
    return depths(hi)
