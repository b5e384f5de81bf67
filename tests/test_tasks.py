"""Built-in tasks produce correct, reproducible data and keep held-out problems out."""
import pytest
import torch

from fastlab.tasks.addition import EQUALS, IGNORE, PLUS, Addition, _held_out


def _number(digits):
    """The value of digits written least significant first."""
    return int("".join(str(int(d)) for d in reversed(digits)))


def test_addition_sequences_encode_correct_sums():
    task = Addition(n_digits=4)
    x, y = task.batch(step=3, batch_size=50, device="cpu", seed=7)
    assert x.shape == y.shape == (50, task.seq_len)
    seq = torch.cat([x, y[:, -1:]], dim=1)
    for row in seq:
        a, b = _number(row[:4]), _number(row[5:9])
        assert row[4] == PLUS and row[9] == EQUALS
        assert _number(row[10:]) == a + b
    assert (y[:, : task.prompt_len - 1] == IGNORE).all()
    assert (y[:, task.prompt_len - 1:] != IGNORE).all()


def test_batches_are_a_function_of_seed_and_step():
    task = Addition(n_digits=3)
    a1, _ = task.batch(5, 32, "cpu", seed=1)
    a2, _ = task.batch(5, 32, "cpu", seed=1)
    b, _ = task.batch(6, 32, "cpu", seed=1)
    assert torch.equal(a1, a2) and not torch.equal(a1, b)


def test_training_never_draws_held_out_problems():
    task = Addition(n_digits=3)
    x, _ = task.batch(0, 4096, "cpu")
    a = sum(x[:, i] * 10 ** i for i in range(3))
    b = sum(x[:, 4 + i] * 10 ** i for i in range(3))
    assert not _held_out(a, b).any()


def test_addition_curriculum_keeps_shapes_and_grows_on_the_threshold():
    task = Addition(n_digits=3, curriculum_start=1, curriculum_threshold=0.8)
    full = Addition(n_digits=3)
    x, y = task.batch(0, 64, torch.device("cpu"))
    fx, fy = full.batch(0, 64, torch.device("cpu"))
    assert x.shape == fx.shape and y.shape == fy.shape
    # one-digit operands: digits 1 and 2 of a and of b are 0 (a at 0..2, b at 4..6)
    assert (x[:, 1:3] == 0).all() and (x[:, 5:7] == 0).all()
    assert not task.curriculum_done
    assert task.curriculum({"exact_match": 0.79}) is None and task.level == 1
    assert "2 of 3" in task.curriculum({"exact_match": 0.8})
    state = task.state_dict()
    again = Addition(n_digits=3, curriculum_start=1)
    again.load_state_dict(state)
    assert again.level == 2
    assert torch.equal(again.batch(5, 32, torch.device("cpu"))[0],
                       task.batch(5, 32, torch.device("cpu"))[0])
    task.curriculum({"exact_match": 1.0})
    assert task.curriculum_done and task.curriculum({"exact_match": 1.0}) is None
    assert task.level == 3
    with pytest.raises(ValueError, match="curriculum_start"):
        Addition(n_digits=2, curriculum_start=3)
