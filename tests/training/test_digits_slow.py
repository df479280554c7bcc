"""Train the digit task to the issue's targets (about 30 minutes on one CPU core)."""

import pytest

from runtime.checkpoint import load_checkpoint
from training.evaluate import evaluate
from training.tasks import digits_task
from training.trainer import TrainConfig, Trainer


@pytest.mark.slow
def test_digit_task_reaches_99_percent_with_deeper_global_tokens(tmp_path):
    task = digits_task()
    trainer = Trainer(TrainConfig(steps=4000, full_depth_steps=2000), task, tmp_path)
    trainer.fit()
    result = evaluate(trainer.model, load_checkpoint(tmp_path / "final").calibration, task, [0.5], max_tokens=len(task.test) * task.seq_len)
    row = result["adaptive"][0]
    assert row["local"]["accuracy"] >= 0.99 and row["global"]["accuracy"] >= 0.99
    assert row["global"]["mean_depth"] >= 2 * row["local"]["mean_depth"]
