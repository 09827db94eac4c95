"""RIFLE: when the head is re-initialised, how, and what happens to its optimizer state."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import deltatl.engine.rifle as rifle_module
from deltatl.engine.rifle import Rifle, rifle_steps
from deltatl.errors import DeltatlError


# --- rifle_steps ------------------------------------------------------------------------------------

def test_three_reinitialisations_over_forty_epochs_fall_on_epoch_boundaries_every_ten_epochs():
    assert rifle_steps(40 * 5, 3, steps_per_epoch=5) == [50, 100, 150]


def test_iteration_based_events_are_evenly_spaced_over_iterations():
    assert rifle_steps(100, 3) == [25, 50, 75]
    assert rifle_steps(9000, 2) == [3000, 6000]
    assert rifle_steps(10, 1) == [5]


def test_a_budget_that_is_not_whole_epochs_is_cut_into_iterations():
    assert rifle_steps(42, 1, steps_per_epoch=5) == [21]


def test_ten_epochs_with_three_reinitialisations_follow_the_authors_periods_and_the_last_head_keeps_the_rest():
    # train.py: periods of floor(10 / 4) = 2 epochs; re-inits after epochs 2, 4, 6; the last head trains 4
    assert rifle_steps(10 * 9, 3, steps_per_epoch=9) == [18, 36, 54]
    assert rifle_steps(10, 3) == [2, 4, 6]


@pytest.mark.parametrize("total, times, steps_per_epoch", [
    (200, 1, 5), (200, 2, 5), (200, 3, 5), (7 * 4, 3, 4), (10 * 3, 9, 3), (97, 4, None), (1000, 7, None),
    (12, 11, None), (90, 3, 9)])
def test_periods_are_floor_of_units_over_k_plus_one_and_the_remainder_goes_to_the_last_head(total, times,
                                                                                           steps_per_epoch):
    events = rifle_steps(total, times, steps_per_epoch)
    unit = steps_per_epoch if steps_per_epoch and total % steps_per_epoch == 0 else 1
    period = unit * (total // unit // (times + 1))
    assert len(events) == times
    bounds = [0, *events, total]
    periods = [b - a for a, b in zip(bounds, bounds[1:])]
    assert periods[:-1] == [period] * times  # equal whole-unit periods, as the authors' code
    assert periods[-1] == total - times * period >= period  # nothing cut; none in the final period
    assert periods[-1] - period < (times + 1) * unit  # the remainder is less than one unit per period


def test_a_reinitialisation_after_the_step_decay_or_a_short_last_head_is_warned_about():
    from deltatl.engine.rifle import rifle_warnings

    assert rifle_warnings([18, 36, 54], 90, decay_step=60) == []
    late = rifle_warnings([22, 45, 67], 90, decay_step=60)
    assert len(late) == 1 and "after the learning rate was divided" in late[0] and "cosine" in late[0]
    short = rifle_warnings([40, 85], 90, decay_step=None)
    assert len(short) == 1 and "5 of 90 steps" in short[0]
    assert rifle_warnings([], 90, decay_step=60) == []


def test_zero_reinitialisations_give_no_events():
    assert rifle_steps(100, 0) == [] and rifle_steps(100, 0, 10) == []


@pytest.mark.parametrize("total, times, steps_per_epoch, fragment", [
    (5 * 4, 5, 4, "more than 5 epochs"),
    (3, 3, None, "more than 3 steps"),
    (100, -1, None, ">= 0"),
])
def test_too_many_reinitialisations_for_the_budget_are_an_error(total, times, steps_per_epoch, fragment):
    with pytest.raises(DeltatlError, match=fragment):
        rifle_steps(total, times, steps_per_epoch)


# --- Rifle.after_step -------------------------------------------------------------------------------

def head_and_optimizer(fan_in: int = 256, classes: int = 64, momentum: float = 0.9):
    torch.manual_seed(0)
    backbone = nn.Linear(8, fan_in)
    head = nn.Linear(fan_in, classes)
    with torch.no_grad():
        head.weight.fill_(3.0)  # far outside the default init's range
        head.bias.fill_(3.0)
    optimizer = torch.optim.SGD([{"params": list(backbone.parameters())}, {"params": list(head.parameters())}],
                                lr=0.1, momentum=momentum)
    x = torch.randn(16, 8)
    optimizer.zero_grad()
    head(backbone(x)).square().mean().backward()
    optimizer.step()  # creates momentum buffers
    return backbone, head, optimizer


def test_after_step_fires_exactly_at_the_given_steps():
    _, head, optimizer = head_and_optimizer()
    rifle = Rifle(head, rifle_steps(60, 2, steps_per_epoch=6))
    assert rifle.steps == [18, 36]  # 10 epochs of 6 steps: periods of 3 epochs, the last head trains 4
    fired = [step for step in range(1, 61) if rifle.reinitialise(step, optimizer)]
    assert fired == [18, 36]


def test_reinitialisation_is_in_place_so_the_optimizer_still_holds_the_same_parameters():
    _, head, optimizer = head_and_optimizer()
    weight, bias = head.weight, head.bias
    pointers = weight.data_ptr(), bias.data_ptr()
    assert Rifle(head, [5]).reinitialise(5, optimizer)
    assert head.weight is weight and head.bias is bias
    assert (weight.data_ptr(), bias.data_ptr()) == pointers
    assert optimizer.param_groups[-1]["params"][0] is weight and optimizer.param_groups[-1]["params"][1] is bias
    assert (weight != 3.0).all() and (bias != 3.0).all()


def test_reinitialisation_draws_weight_and_bias_from_the_default_linear_init():
    fan_in, classes = 256, 64
    _, head, optimizer = head_and_optimizer(fan_in, classes)
    Rifle(head, [1]).reinitialise(1, optimizer)
    bound = 1 / math.sqrt(fan_in)
    for tensor in (head.weight, head.bias):
        assert tensor.abs().max() <= bound
        assert tensor.abs().max() > 0.9 * bound
    # U(-b, b): mean 0, variance b^2 / 3 (16384 draws: 2 % relative standard error of the variance)
    weight = head.weight.detach().double()
    assert abs(weight.mean().item()) < 0.02 * bound
    assert weight.var().item() == pytest.approx(bound ** 2 / 3, rel=0.06)
    reference = nn.Linear(fan_in, classes)
    assert weight.var().item() == pytest.approx(reference.weight.detach().double().var().item(), rel=0.1)


def test_the_same_seed_and_event_give_the_same_head_and_another_event_or_seed_another_head():
    def head_after(seed: int, event_step: int) -> torch.Tensor:
        _, head, optimizer = head_and_optimizer()
        torch.manual_seed(1234 + event_step)  # the global RNG plays no part
        rifle = Rifle(head, [10, 20], seed=seed)
        assert rifle.reinitialise(event_step, optimizer)
        return torch.cat([head.weight.detach().flatten(), head.bias.detach()])

    assert torch.equal(head_after(0, 10), head_after(0, 10))
    assert not torch.equal(head_after(0, 10), head_after(0, 20))
    assert not torch.equal(head_after(0, 10), head_after(1, 10))


def test_the_momentum_of_the_head_is_kept_by_default():
    backbone, head, optimizer = head_and_optimizer()
    buffers = {p: optimizer.state[p]["momentum_buffer"].clone() for p in [*backbone.parameters(), *head.parameters()]}
    Rifle(head, [3]).reinitialise(3, optimizer)
    for param, buffer in buffers.items():
        assert torch.equal(optimizer.state[param]["momentum_buffer"], buffer)


def test_reset_momentum_clears_the_heads_optimizer_state_only():
    backbone, head, optimizer = head_and_optimizer()
    kept = {p: optimizer.state[p]["momentum_buffer"].clone() for p in backbone.parameters()}
    Rifle(head, [3], reset_momentum=True).reinitialise(3, optimizer)
    for param in head.parameters():
        assert "momentum_buffer" not in optimizer.state.get(param, {})
    for param, buffer in kept.items():
        assert torch.equal(optimizer.state[param]["momentum_buffer"], buffer)
    # the next step starts a fresh buffer from the gradient alone
    optimizer.zero_grad()
    head(backbone(torch.randn(4, 8))).sum().backward()
    grad = head.bias.grad.clone()
    optimizer.step()
    assert torch.equal(optimizer.state[head.bias]["momentum_buffer"], grad)


def test_cyclic_head_learning_rate_restarts_at_one_at_each_period_and_nears_zero_at_its_end():
    total = 200
    rifle = Rifle(nn.Linear(4, 2), rifle_steps(total, 3, steps_per_epoch=5), cyclic_lr=True)
    starts, ends = [0, *rifle.steps], [*rifle.steps, total]
    for start, stop in zip(starts, ends):
        assert rifle.head_lr_factor(start, total) == pytest.approx(1.0)
        assert rifle.head_lr_factor(stop - 1, total) < 0.01
        middle = (start + stop) // 2
        assert rifle.head_lr_factor(middle, total) == pytest.approx(0.5, abs=0.05)
        factors = [rifle.head_lr_factor(s, total) for s in range(start, stop)]
        assert factors == sorted(factors, reverse=True)


# --- through a real run -------------------------------------------------------------------------------

def rifle_rows(run) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r.get("event") == "rifle"]


@pytest.mark.parametrize("flags, expected, late", [
    # 18 training images in batches of 4: 4 steps per epoch; the step schedule divides the lr after step 11
    (["--epochs", "4", "--rifle", "3"], [4, 8, 12], True),
    (["--epochs", "4", "--rifle", "3", "--schedule", "cosine"], [4, 8, 12], False),
    (["--iters", "10", "--rifle", "1"], [5], False),
])
def test_a_training_run_reinitialises_the_head_exactly_k_times_at_the_planned_steps(
        cli, image_folder, tiny_train_args, tmp_path, monkeypatch, recwarn, flags, expected, late):
    heads = []
    original = rifle_module.init_head_

    def counting_init(head, init="default", generator=None):
        heads.append(head)
        return original(head, init, generator)

    monkeypatch.setattr(rifle_module, "init_head_", counting_init)
    run = tmp_path / "run"
    base = [a for a in tiny_train_args if a not in ("--epochs", "1")] if "--iters" in flags else tiny_train_args
    result = cli("train", "--data", image_folder(), *base, "--method", "l2", *flags, "--out", run)
    assert result.code == 0, result.err
    assert rifle_rows(run) == expected
    # a re-initialisation after the step decay is warned about (the CLI prints it as one line)
    notes = [str(w.message) for w in recwarn if issubclass(w.category, rifle_module.RifleWarning)]
    assert [n.startswith("RIFLE re-initialises the head at step 12, after the learning rate was divided")
            for n in notes] == ([True] if late else [])
    assert len(heads) == len(expected)
    assert all(isinstance(h, nn.Linear) and h.out_features == 3 for h in heads)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rifle"] == len(expected)


def test_a_run_with_more_reinitialisations_than_epochs_is_one_error_line(cli, image_folder, tiny_train_args,
                                                                         tmp_path):
    result = cli("train", "--data", image_folder(), *tiny_train_args, "--epochs", "2", "--rifle", "2",
                 "--out", tmp_path / "run")
    assert result.code == 2
    assert result.err_lines == ["deltatl: error: --rifle 2 needs more than 2 epochs"]


def test_a_refused_rifle_count_leaves_the_out_folder_free_for_the_corrected_command(cli, image_folder,
                                                                                    tiny_train_args, tmp_path):
    root = image_folder()
    refused = cli("train", "--data", root, *tiny_train_args, "--epochs", "2", "--rifle", "2",
                  "--out", tmp_path / "run")
    assert refused.code == 2
    corrected = cli("train", "--data", root, *tiny_train_args, "--epochs", "2", "--rifle", "1",
                    "--out", tmp_path / "run")
    assert corrected.code == 0, corrected.err
