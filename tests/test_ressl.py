"""ressl_loss / infonce_loss against an independent float64 re-derivation; the queue's FIFO contract."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fast_ressl.ressl import Queue, infonce_loss, ressl_loss, warmup_mixed_loss


def _unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def reference_loss_and_grad(q, k, queue, tau_s, tau_t):
    """Plain numpy float64, row by row, from the formula in shared/method/ressl.md:
    loss = -1/N sum_i sum_j p_t[i,j] log p_s[i,j]; dL/dq_i = (p_s[i] - p_t[i]) @ B / (tau_s N)."""
    q, k, B = (np.asarray(t, dtype=np.float64) for t in (q, k, queue))
    n = q.shape[0]
    total, grad = 0.0, np.zeros_like(q)
    for i in range(n):
        zt = B @ k[i] / tau_t
        pt = np.exp(zt - zt.max()); pt /= pt.sum()
        zs = B @ q[i] / tau_s
        log_ps = zs - (zs.max() + math.log(np.exp(zs - zs.max()).sum()))
        total += -(pt * log_ps).sum()
        grad[i] = (np.exp(log_ps) - pt) @ B / (tau_s * n)
    return total / n, grad


@pytest.mark.parametrize("n,k_size,d", [(4, 16, 8), (32, 256, 64), (7, 96, 128)])
@pytest.mark.parametrize("tau_s,tau_t", [(0.1, 0.04), (0.2, 0.05), (1.0, 0.5)])
def test_ressl_loss_matches_float64_reference(n, k_size, d, tau_s, tau_t):
    q = _unit(n, d, seed=1).requires_grad_(True)
    k = _unit(n, d, seed=2).requires_grad_(True)
    queue = _unit(k_size, d, seed=3).requires_grad_(True)
    loss = ressl_loss(q, k, queue, tau_s, tau_t)
    loss.backward()
    ref, ref_grad = reference_loss_and_grad(q.detach(), k.detach(), queue.detach(), tau_s, tau_t)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(ref, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(q.grad.numpy(), ref_grad, rtol=1e-9, atol=1e-12)
    # Gradients reach only the student: the teacher key and the queue are constants.
    assert k.grad is None and queue.grad is None


def test_ressl_loss_float32_and_bf16_inputs_close_to_reference():
    q, k, queue = _unit(16, 32, seed=4), _unit(16, 32, seed=5), _unit(128, 32, seed=6)
    ref, _ = reference_loss_and_grad(q, k, queue, 0.1, 0.04)
    got32 = ressl_loss(q.float(), k.float(), queue.float(), 0.1, 0.04)
    assert got32.dtype == torch.float32 and got32.item() == pytest.approx(ref, rel=1e-5)
    got_bf16 = ressl_loss(q.bfloat16(), k.bfloat16(), queue.float(), 0.1, 0.04)
    assert got_bf16.dtype == torch.float32 and got_bf16.item() == pytest.approx(ref, rel=2e-2)


def test_multiview_loss_is_mean_over_views():
    k, queue = _unit(8, 16, seed=7), _unit(64, 16, seed=8)
    qs = [_unit(8, 16, seed=10 + v) for v in range(3)]
    stacked = ressl_loss(torch.stack(qs), k, queue, 0.1, 0.04)
    per_view = [reference_loss_and_grad(qv, k, queue, 0.1, 0.04)[0] for qv in qs]
    assert stacked.item() == pytest.approx(sum(per_view) / 3, rel=1e-12)


def test_identical_relations_give_entropy_of_target():
    # q = k and tau_s = tau_t: the loss is the entropy of p_t (KL = 0), and the gradient vanishes.
    k, queue = _unit(5, 8, seed=11), _unit(32, 8, seed=12)
    q = k.clone().requires_grad_(True)
    loss = ressl_loss(q, k, queue, 0.07, 0.07)
    p = F.softmax(k @ queue.T / 0.07, dim=1)
    entropy = -(p * p.log()).sum(1).mean()
    assert loss.item() == pytest.approx(entropy.item(), rel=1e-12)
    loss.backward()
    assert q.grad.abs().max().item() < 1e-12


def test_infonce_matches_float64_reference():
    q, k, queue = _unit(6, 16, seed=13), _unit(6, 16, seed=14), _unit(40, 16, seed=15)
    tau = 0.2
    got = infonce_loss(q, k, queue, tau)
    qn, kn, B = q.numpy(), k.numpy(), queue.numpy()
    ref = 0.0
    for i in range(6):
        logits = np.concatenate([[qn[i] @ kn[i]], B @ qn[i]]) / tau
        ref += -(logits[0] - math.log(np.exp(logits).sum()))
    assert got.item() == pytest.approx(ref / 6, rel=1e-12)


def test_warmup_mix_endpoints():
    q, k, queue = _unit(6, 16, seed=16), _unit(6, 16, seed=17), _unit(40, 16, seed=18)
    mix = lambda w: warmup_mixed_loss(q, k, queue, 0.1, 0.04, 0.2, torch.tensor(w, dtype=torch.float64))
    assert mix(0.0).item() == pytest.approx(infonce_loss(q, k, queue, 0.2).item(), rel=1e-12)
    assert mix(1.0).item() == pytest.approx(ressl_loss(q, k, queue, 0.1, 0.04).item(), rel=1e-12)
    half = 0.5 * infonce_loss(q, k, queue, 0.2) + 0.5 * ressl_loss(q, k, queue, 0.1, 0.04)
    assert mix(0.5).item() == pytest.approx(half.item(), rel=1e-12)


def test_compiled_loss_matches_eager():
    q, k, queue = _unit(8, 16, seed=19).float(), _unit(8, 16, seed=20).float(), _unit(64, 16, seed=21).float()
    compiled = torch.compile(ressl_loss)
    assert compiled(q, k, queue, 0.1, 0.04).item() == pytest.approx(
        ressl_loss(q, k, queue, 0.1, 0.04).item(), rel=1e-5)


# ----------------------------------------------------------------------------- queue
def test_queue_starts_with_unit_rows():
    queue = Queue(32, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(queue.buffer.norm(dim=1), torch.ones(32), atol=1e-6)
    assert queue.ptr.item() == 0 and queue.ptr.dtype == torch.long


def test_queue_fifo_wraps_around():
    queue = Queue(10, 2)
    for i in range(4):  # pushes of 4 rows each: 0-3, 4-7, 8-9 + 0-1, 2-5
        keys = torch.full((4, 2), float(i + 1))
        queue.push(keys)
        assert queue.ptr.item() == (4 * (i + 1)) % 10
    rows = queue.buffer[:, 0].tolist()
    assert rows == [3, 3, 4, 4, 4, 4, 2, 2, 3, 3]


def test_loss_sees_the_queue_from_before_the_push():
    q, k = _unit(4, 8, seed=22).float(), _unit(4, 8, seed=23).float()
    queue = Queue(8, 8, generator=torch.Generator().manual_seed(1))
    before = queue.buffer.clone()
    loss = ressl_loss(q, k, queue.buffer, 0.1, 0.04)  # the loop computes the loss first ...
    queue.push(k)                                      # ... and pushes after the optimizer step
    assert loss.item() == pytest.approx(ressl_loss(q, k, before, 0.1, 0.04).item(), rel=1e-6)
    assert not torch.equal(queue.buffer, before)
    assert torch.equal(queue.buffer[:4], k)


def test_queue_state_round_trip_and_shape_check():
    a = Queue(8, 4, generator=torch.Generator().manual_seed(2))
    a.push(torch.ones(3, 4))
    b = Queue(8, 4)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.buffer, b.buffer) and a.ptr.item() == b.ptr.item() == 3
    with pytest.raises(ValueError, match="queue_size"):
        Queue(16, 4).load_state_dict(a.state_dict())
