import math

import pytest

from fast_ressl.schedules import lr_at, momentum_at, relation_weight_at


def test_lr_warmup_then_cosine():
    base, warm, total = 0.4, 10, 110
    assert lr_at(0, base, warm, total) == 0.0  # the official code's lr * T / warmup_iters at T = 0
    assert lr_at(1, base, warm, total) == pytest.approx(base / warm)
    assert lr_at(9, base, warm, total) == pytest.approx(base * 9 / warm)
    assert lr_at(10, base, warm, total) == pytest.approx(base)
    assert lr_at(60, base, warm, total) == pytest.approx(base / 2)
    assert lr_at(110, base, warm, total) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(60, base, warm, total, min_lr=0.1) == pytest.approx(0.25)
    values = [lr_at(s, base, warm, total) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_lr_without_warmup():
    assert lr_at(0, 1.0, 0, 100) == pytest.approx(1.0)


def test_momentum_schedules():
    assert momentum_at(50, 0.99, 100) == 0.99
    assert momentum_at(0, 0.99, 100, "cosine") == pytest.approx(0.99)
    assert momentum_at(50, 0.99, 100, "cosine") == pytest.approx(0.995)
    assert momentum_at(100, 0.99, 100, "cosine") == pytest.approx(1.0)


def test_relation_weight_handover():
    assert [relation_weight_at(s, 4, "hard") for s in range(6)] == [0, 0, 0, 0, 1, 1]
    assert [relation_weight_at(s, 4, "linear") for s in range(6)] == [0, 0.25, 0.5, 0.75, 1, 1]
    assert relation_weight_at(0, 0, "hard") == 1.0
