"""Built-in tasks produce correct, reproducible data and keep held-out problems out."""
import pytest
import torch

from fastlab.tasks import counter_uniform
from fastlab.tasks.addition import IGNORE, Addition, AdditionConfig

CPU = torch.device("cpu")


def _task(**kwargs) -> Addition:
    return Addition(AdditionConfig(**kwargs))


def _value(digits, base):
    """The value of digits written least significant first."""
    return sum(int(d) * base ** i for i, d in enumerate(digits))


def _batch(task, step, batch_size, seed=0):
    return task.batch(torch.tensor(step), batch_size, CPU, seed)


@pytest.mark.parametrize("base, n", [(10, 4), (16, 3), (2, 7), (36, 2)])
def test_addition_sequences_encode_correct_sums(base, n):
    task = _task(n_digits=n, base=base)
    batch = _batch(task, 3, 50, seed=7)
    x, y = batch["inputs"], batch["targets"]
    assert x.shape == y.shape == (50, task.seq_len)
    seq = torch.cat([x, y[:, -1:]], dim=1)
    for row in seq:
        a, b = _value(row[:n], base), _value(row[n + 1:2 * n + 1], base)
        assert row[n] == task.plus and row[2 * n + 1] == task.equals
        assert _value(row[2 * n + 2:], base) == a + b
        assert int(row.max()) < task.vocab_size
    assert (y[:, : task.prompt_len - 1] == IGNORE).all()
    assert (y[:, task.prompt_len - 1:] != IGNORE).all()


def test_batches_are_a_function_of_seed_and_step():
    task = _task(n_digits=3)
    a1 = _batch(task, 5, 32, seed=1)["inputs"]
    a2 = _batch(task, 5, 32, seed=1)["inputs"]
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, _batch(task, 6, 32, seed=1)["inputs"])
    assert not torch.equal(a1, _batch(task, 5, 32, seed=2)["inputs"])
    # no period: the steps 10,000 and 39 x 256 apart draw other problems
    for other in (5 + 10_000, 5 + 39 * 256):
        assert not torch.equal(a1, _batch(task, other, 32, seed=1)["inputs"])


def test_counter_uniform_is_uniform_and_reproducible():
    values = counter_uniform(3, 0, torch.tensor(11), (200_000,), 10, CPU)
    assert torch.equal(values, counter_uniform(3, 0, torch.tensor(11), (200_000,), 10, CPU))
    counts = torch.bincount(values, minlength=10).double()
    assert values.min() >= 0 and values.max() <= 9
    # each digit within 5 standard deviations of 20,000
    assert ((counts - 20_000).abs() < 5 * (20_000 * 0.9) ** 0.5).all(), counts
    with pytest.raises(ValueError, match="high must be"):
        counter_uniform(0, 0, torch.tensor(0), (3,), 0, CPU)


def test_training_never_draws_held_out_problems_and_evaluation_only_draws_them():
    task = _task(n_digits=2)
    x = _batch(task, 0, 4096)["inputs"]
    digits = torch.stack([x[:, :2], x[:, 3:5]], dim=1)
    assert not task._held_out(digits).any()
    held = task.held_out_problems(500, CPU)
    assert task._held_out(held).all()
    # about one pair in 20 of the 10,000 is held out: evaluation sees many distinct ones
    assert 200 <= len({tuple(p.flatten().tolist()) for p in held}) <= 500


def test_addition_curriculum_keeps_shapes_and_grows_on_the_threshold():
    task = _task(n_digits=3, curriculum_start=1, curriculum_threshold=0.8)
    full = _task(n_digits=3)
    x = _batch(task, 0, 64)["inputs"]
    assert x.shape == _batch(full, 0, 64)["inputs"].shape
    # one-digit operands: digits 1 and 2 of a and of b are 0 (a at 0..2, b at 4..6)
    assert (x[:, 1:3] == 0).all() and (x[:, 5:7] == 0).all()
    assert not task.curriculum_done
    assert task.curriculum({"exact_match": 0.79}) is None and task.level == 1
    assert "2 of 3" in task.curriculum({"exact_match": 0.8})
    x = _batch(task, 1, 256)["inputs"]
    assert (x[:, 2] == 0).all() and (x[:, 1] != 0).any()
    again = _task(n_digits=3, curriculum_start=1)
    again.load_state_dict(task.state_dict())
    assert again.level == 2
    assert torch.equal(_batch(again, 5, 32)["inputs"], _batch(task, 5, 32)["inputs"])
    task.curriculum({"exact_match": 1.0})
    assert task.curriculum_done and task.curriculum({"exact_match": 1.0}) is None
    assert task.level == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"n_digits": 0}, "task.n_digits must be"),
    ({"base": 1}, "task.base must be in"),
    ({"base": 37}, "task.base must be in"),
    ({"n_digits": 2, "curriculum_start": 3}, "task.curriculum_start"),
    ({"curriculum_threshold": 0}, "task.curriculum_threshold"),
])
def test_bad_addition_options_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdditionConfig(**kwargs)
