from __future__ import annotations

import math
import signal
import threading
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mcvi_ops.train import DivergenceGuard, EpochSeed, StopOnInterrupt


class _Run:
    """The parts of a Lightning trainer and training plan the guard uses."""

    def __init__(self):
        torch.manual_seed(0)
        self.pl_module = SimpleNamespace(module=nn.Linear(3, 2))
        self.trainer = SimpleNamespace(
            global_step=0,
            current_epoch=0,
            should_stop=False,
            sanity_checking=False,
            callback_metrics={},
        )

    def step(self, guard, loss, *, update=0.1):
        """One optimizer step (weights move by `update`), then the guard sees its loss."""
        with torch.no_grad():
            for p in self.pl_module.module.parameters():
                p.add_(update)
        self.trainer.global_step += 1
        guard.on_train_batch_end(
            self.trainer, self.pl_module, {"loss": torch.tensor(loss)}, None, 0
        )

    def weight(self):
        return float(self.pl_module.module.bias[0])


def test_guard_puts_back_the_last_weights_confirmed_by_a_good_loss():
    run = _Run()
    guard = DivergenceGuard(factor=10.0, snapshot_every_n_steps=2)
    guard.on_train_start(run.trainer, run.pl_module)
    start = run.weight()
    run.step(guard, 100.0)  # first loss: the reference; limit 100 + 10 * 100
    run.step(guard, 90.0)  # step 2: weights after it are a candidate, not yet confirmed
    candidate = run.weight()
    run.step(guard, 80.0)  # loss computed with the candidate's weights: confirmed
    run.step(guard, 70.0)  # step 4: a new candidate
    assert guard.diverged is None and not run.trainer.should_stop
    run.step(guard, 5_000.0)  # exploded: the step-4 candidate is not trusted
    assert run.trainer.should_stop
    assert guard.diverged["restored_step"] == 2
    assert run.weight() == pytest.approx(candidate)
    assert run.weight() != pytest.approx(start)
    assert "exploded to 5000" in guard.message and "lower `lr`" in guard.message


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_guard_stops_on_nonfinite_loss_or_weights(loss):
    run = _Run()
    guard = DivergenceGuard(factor=None)
    guard.on_train_start(run.trainer, run.pl_module)
    start = run.weight()
    run.step(guard, 1e12)  # no factor: only non-finite values count
    assert guard.diverged is None
    run.step(guard, loss)
    assert guard.diverged is not None and "the loss became" in guard.message
    assert run.weight() == pytest.approx(start)
    run = _Run()
    guard = DivergenceGuard()
    guard.on_train_start(run.trainer, run.pl_module)
    run.step(guard, 1.0, update=math.nan)
    assert "weights became NaN" in guard.message
    assert torch.isfinite(run.pl_module.module.weight).all()


def test_guard_checks_the_validation_loss():
    run = _Run()
    guard = DivergenceGuard(factor=100.0)
    guard.on_train_start(run.trainer, run.pl_module)
    run.step(guard, -50.0)  # losses can be negative: the limit uses the magnitude
    run.trainer.callback_metrics = {"validation_loss": torch.tensor(4.9e9)}
    guard.on_validation_epoch_end(run.trainer, run.pl_module)
    assert guard.diverged["stage"] == "validation"
    with pytest.raises(ValueError, match="positive or None"):
        DivergenceGuard(factor=0)


def test_epoch_seed_depends_on_seed_and_epoch_only():
    trainer = SimpleNamespace(current_epoch=3)
    seed = EpochSeed(7)
    draws = []
    for _ in range(2):
        torch.manual_seed(123)  # whatever came before
        seed.on_train_batch_start(trainer, None, None, 0)
        draws.append(torch.rand(3))
    torch.testing.assert_close(draws[0], draws[1])
    seed.on_train_batch_start(SimpleNamespace(current_epoch=4), None, None, 0)
    assert not torch.equal(torch.rand(3), draws[0])
    restored = EpochSeed(0)
    restored.load_state_dict(seed.state_dict())
    assert restored.seed == 7


def test_stop_on_interrupt_stops_after_the_step_then_at_once():
    trainer = SimpleNamespace(should_stop=False)
    before = signal.getsignal(signal.SIGINT)
    with StopOnInterrupt(trainer) as interrupt:
        signal.raise_signal(signal.SIGINT)  # first Ctrl-C: no exception, a stop request
        assert interrupt.requested and trainer.should_stop
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_stop_on_interrupt_does_nothing_outside_the_main_thread():
    trainer = SimpleNamespace(should_stop=False)
    errors = []

    def run():
        try:
            with StopOnInterrupt(trainer) as interrupt:
                assert not interrupt._installed
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert not errors
