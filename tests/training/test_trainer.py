import json

import pytest
import torch

from ponder.cli import main
from runtime.checkpoint import load_checkpoint
from training.tasks import digits_task
from training.trainer import TrainConfig, Trainer

SMALL = dict(task="digits", preset="tiny", batch_size=32, lr=3e-3, warmup=2, full_depth_steps=2, log_every=1,
             save_every=1000, bf16_autocast=False, calibration_tokens=1200)


@pytest.fixture(scope="module")
def task():
    return digits_task(train_size=4000, valid_size=500, test_size=500)


def test_resume_continues_exactly_as_an_uninterrupted_run(task, tmp_path):
    straight = Trainer(TrainConfig(steps=6, **SMALL), task, tmp_path / "a")
    straight.fit()
    first = Trainer(TrainConfig(steps=6, **SMALL), task, tmp_path / "b")
    assert first.fit(stop_at=3) is None  # interrupted: OUT/last only
    resumed = Trainer(TrainConfig(steps=6, **SMALL), task, tmp_path / "b")
    resumed.fit()
    assert resumed.step == 6
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert straight.controller.log_prices == resumed.controller.log_prices
    lines = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 7))
    assert {"loss_exit", "depth_fraction", "tokens_per_s", "price@0.5"} <= set(lines[-1])


def test_training_lowers_the_loss_and_writes_a_calibrated_checkpoint(task, tmp_path):
    trainer = Trainer(TrainConfig(steps=60, **{**SMALL, "full_depth_steps": 20}), task, tmp_path)
    final = trainer.fit()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(m["loss_exit"] for m in lines[-10:]) / 10 < sum(m["loss_exit"] for m in lines[:5]) / 5 - 0.3
    ckpt = load_checkpoint(final)
    fracs = ckpt.calibration.depth_fractions
    assert fracs[0] >= fracs[-1] and ckpt.calibration.num_tokens > 0


def test_routed_gumbel_training_updates_the_router(task, tmp_path):
    trainer = Trainer(TrainConfig(steps=3, model_overrides=dict(schedule="routed", n_pool=3, max_depth=2), **SMALL),
                      task, tmp_path)
    before = trainer.model.router.weight.detach().clone()
    for _ in range(3):
        trainer.train_step()
    assert not torch.allclose(before, trainer.model.router.weight)


def test_cli_train_generate_and_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--task", "digits", "--preset", "tiny", "--steps", "3", "--batch-size", "16",
                 "--out", str(out), "--no-bf16"]) == 0
    assert main(["generate", "--model", str(out / "final"), "--prompt", "<global>12345", "--max-tokens", "2",
                 "--compute-budget", "0.5", "--device", "cpu"]) == 0
    assert "mean exit depth" in capsys.readouterr().out
    assert main(["eval", str(out / "final"), "--task", "digits", "--budgets", "1.0,0.5", "--max-tokens", "3000",
                 "--out", str(tmp_path / "e")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert [r["budget"] for r in result["adaptive"]] == [1.0, 0.5]
    assert {"local", "global", "all"} <= set(result["adaptive"][0])
    assert (tmp_path / "e.png").stat().st_size > 1000


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err
