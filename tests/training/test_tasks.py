import torch

from training.tasks import IGNORE, MODE_GLOBAL, MODE_LOCAL, digits_task, modadd_task


def test_digit_task_targets_and_disjoint_splits():
    task = digits_task(train_size=5000, valid_size=1000, test_size=1000)
    for split in (task.train, task.test):
        modes, digits, answer = split[:, 0], split[:, 1:6], split[:, 6]
        expected = torch.where(modes == MODE_LOCAL, digits[:, -1], digits.sum(1) % 10)
        assert torch.equal(answer, expected)
        assert set(modes.tolist()) == {MODE_LOCAL, MODE_GLOBAL}
    train_rows = {tuple(r) for r in task.train.tolist()}
    assert not any(tuple(r) in train_rows for r in task.test.tolist())
    ids, targets = task.train_batch(8, torch.Generator().manual_seed(0))
    assert ids.shape == (8, 6) and (targets[:, :-1] == IGNORE).all() and (targets[:, -1] >= 0).all()
    assert task.tokenizer.encode("<global>12345").ids == [MODE_GLOBAL, 1, 2, 3, 4, 5]


def test_modadd_task():
    task = modadd_task(p=13)
    a, plus, b, eq, c = task.train.T
    assert torch.equal(c, (a + b) % 13) and (plus == 13).all() and (eq == 14).all()
    assert len(task.train) + len(task.valid) + len(task.test) == 169


def test_batches_are_a_function_of_the_seed():
    task = digits_task(train_size=5000, valid_size=1000, test_size=1000)
    a = task.train_batch(16, torch.Generator().manual_seed(7))
    b = task.train_batch(16, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
