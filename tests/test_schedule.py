"""LR schedules: warmup-stable-decay, cosine, constant, and a governor-triggered early cooldown."""

import pytest

from unitrain.train.schedule import Schedule


def test_wsd_warms_up_holds_and_decays_to_zero():
    s = Schedule("wsd", total_steps=100, warmup=10, cooldown=20)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == s(79) == 1.0
    assert s(80) == pytest.approx(1.0) and s(90) == pytest.approx(0.5) and s(99) == pytest.approx(0.05)
    assert s(100) == 0.0


def test_cosine_and_constant():
    c = Schedule("cosine", 100, 0, 0)
    assert c(0) == pytest.approx(1.0) and c(50) == pytest.approx(0.5) and c(100) == pytest.approx(0.0)
    assert Schedule("constant", 100, 5, 20)(60) == 1.0


def test_early_cooldown_decays_from_the_current_lr_over_the_given_steps():
    s = Schedule("wsd", total_steps=100, warmup=10, cooldown=20)
    end = s.begin_cooldown(40, steps=8)
    assert end == 48
    assert s(39) == 1.0 and s(40) == pytest.approx(1.0) and s(44) == pytest.approx(0.5) and s(48) == 0.0
    late = Schedule("wsd", 100, 10, 20)
    assert late.begin_cooldown(95) == 100  # never past the plan


def test_schedule_state_survives_the_lambdalr_state_dict():
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = Schedule("wsd", 100, 10, 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, s)
    s.begin_cooldown(30, steps=5)
    state = sched.state_dict()
    s2 = Schedule("wsd", 100, 10, 20)
    sched2 = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), s2)
    sched2.load_state_dict(state)
    assert s2.early_stop_at == 30 and s2.early_cooldown == 5
