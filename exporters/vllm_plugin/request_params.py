"""Per-request compute parameters in vLLM: a logits processor that publishes them for the forward.

vLLM passes no per-request value into a generation model's forward, but its V1 logits processors
see every request's SamplingParams (with `extra_args`, filled from the OpenAI body's
`vllm_xargs`) as it joins the persistent batch, and `update_state` runs before the forward of
each step (gpu_input_batch.refresh_metadata). So `PonderRequestParams` keeps each batch row's
(price, min_depth, max_depth), and publishes them as dense per-row tensors in this module,
in the worker process that also runs the model. The model then expands them to tokens with the
step's attention metadata (`query_start_loc`: rows' tokens are contiguous, in batch-row order).

A request sends `{"vllm_xargs": {"compute_budget": 0.5}}` (or `exit_price`, `min_depth`,
`max_depth`); rows without them take the server's defaults (`--hf-overrides`). Installed as the
`vllm.logits_processors` entry point `ponder`, it never changes logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from runtime.calibration import Calibration

KEYS = ("compute_budget", "exit_price", "min_depth", "max_depth")
UNBOUNDED = 2**31  # depth bound where the model's is unknown (the API server's validation)


@dataclass
class RowParams:
    price: Tensor  # (rows,) exit when the predicted gain is below it; -inf: no exit by price
    min_depth: Tensor  # (rows,) long
    max_depth: Tensor  # (rows,) long


_current: RowParams | None = None  # this step's rows, published by the logits processor


def current() -> RowParams | None:
    return _current


def server_price(hf_config) -> float | None:
    """The server-wide price from `--hf-overrides` (exit_price, or compute_budget via calibration)."""
    if getattr(hf_config, "exit_price", None) is not None:
        return float(hf_config.exit_price)
    budget = getattr(hf_config, "compute_budget", None)
    return None if budget is None else price_for_budget(hf_config, float(budget))


def price_for_budget(hf_config, budget: float) -> float | None:
    if budget >= 1.0:
        return None
    table = hf_config.calibration
    return Calibration(prices=table["prices"], depth_fractions=table["depth_fractions"]).price_for_budget(budget)


def request_values(extra: dict, max_depth: int) -> dict:
    """The request's Ponder keys, checked; raises ValueError (HTTP 400) naming the field."""
    got = {k: extra[k] for k in KEYS if k in extra}
    if "compute_budget" in got and "exit_price" in got:
        raise ValueError("give compute_budget or exit_price, not both")
    budget = got.get("compute_budget")
    if budget is not None and not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise ValueError(f"compute_budget={budget!r} must be a number in (0, 1]")
    price = got.get("exit_price")
    if price is not None and not (isinstance(price, (int, float)) and price >= 0 and math.isfinite(price)):
        raise ValueError(f"exit_price={price!r} must be a finite number >= 0")
    for key in ("min_depth", "max_depth"):
        value = got.get(key)
        if value is not None and not (isinstance(value, int) and 0 <= value <= max_depth):
            raise ValueError(f"{key}={value!r} must be an integer in [0, {max_depth}]")
    if got.get("min_depth") is not None and got.get("max_depth") is not None and got["min_depth"] > got["max_depth"]:
        raise ValueError(f"min_depth={got['min_depth']} exceeds max_depth={got['max_depth']}")
    return got


class PonderRequestParams(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        hf = vllm_config.model_config.hf_config
        self.enabled = getattr(hf, "architectures", None) == ["PonderForCausalLM"]
        self.hf, self.device, self.rows, self.batch_size = hf, device, {}, 0
        if self.enabled:
            default = server_price(hf)
            self.default = (-math.inf if default is None else default, hf.min_depth, hf.max_depth)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """In the API server, before the request is queued: a bad value is a 400 there. The model's
        depth is not known here, so depths past it are clamped in the worker (`_row`), never raised."""
        extra = sampling_params.extra_args or {}
        if any(k in extra for k in KEYS):
            request_values(extra, max_depth=UNBOUNDED)

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: Tensor) -> Tensor:
        return logits

    def _row(self, params: SamplingParams, *_) -> tuple[float, int, int] | None:
        got = request_values(params.extra_args, UNBOUNDED) if params.extra_args else {}  # validated already
        if not got:
            return None
        price = self.default[0]
        if "exit_price" in got:
            price = float(got["exit_price"])
        elif "compute_budget" in got:
            p = price_for_budget(self.hf, float(got["compute_budget"]))
            price = -math.inf if p is None else p
        D = self.hf.max_depth
        return price, min(got.get("min_depth", self.default[1]), D), min(got.get("max_depth", self.default[2]), D)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        global _current
        if not self.enabled:
            return
        if batch_update is not None:
            self.batch_size = batch_update.batch_size
            process_dict_updates(self.rows, batch_update, self._row)
        values = [self.rows.get(i, self.default) for i in range(self.batch_size)]
        _current = RowParams(
            price=torch.tensor([v[0] for v in values], dtype=torch.float32, device=self.device),
            min_depth=torch.tensor([v[1] for v in values], dtype=torch.long, device=self.device),
            max_depth=torch.tensor([v[2] for v in values], dtype=torch.long, device=self.device),
        )
