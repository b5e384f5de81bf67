"""Built-in tasks produce correct, reproducible data and keep held-out problems out."""
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
