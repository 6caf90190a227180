"""The ReSSL objective as pure functions, plus the queue of teacher keys.

Names: q = L2-normalised student embeddings (strong views), k = L2-normalised teacher embeddings
(weak view), queue = K x D bank of past teacher keys, read BEFORE this batch is pushed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32 and float64 stay (float64 for exact reference tests)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def ressl_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau_s: float,
               tau_t: float) -> torch.Tensor:
    """Relation cross-entropy  -sum_j p_t[j] log p_s[j], averaged over samples (and views).

    q:     (N, D) or (V, N, D) student embeddings, L2-normalised; V strong views share one target
    k:     (N, D) teacher embeddings of the weak view, L2-normalised; no gradient flows into it
    queue: (K, D) teacher keys from earlier steps (snapshot before the push)
    Returns a 0-dim float32 (float64 for float64 inputs) tensor. Computed in float32 at least, whatever the autocast dtype: a 0.04
    temperature turns bf16 rounding of the logits (~0.4% relative) into visibly different targets.
    """
    queue = _upcast(queue.detach())
    with torch.no_grad():
        p_t = F.softmax(_upcast(k.detach()) @ queue.T / tau_t, dim=-1)  # (N, K)
    log_p_s = F.log_softmax(_upcast(q) @ queue.T / tau_s, dim=-1)  # (N, K) or (V, N, K)
    return -(p_t * log_p_s).sum(dim=-1).mean()


def infonce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo-style InfoNCE for the extended version's warm-up (our reading of the TPAMI paper).

    Positive = the teacher key of the same image (k[i] for q[i]); negatives = the queue.
    q: (N, D) or (V, N, D); k: (N, D); queue: (K, D). Returns a 0-dim float32 tensor.
    """
    q, k, queue = _upcast(q), _upcast(k.detach()), _upcast(queue.detach())
    pos = (q * k).sum(dim=-1, keepdim=True)  # (..., N, 1)
    neg = q @ queue.T  # (..., N, K)
    logits = torch.cat([pos, neg], dim=-1) / tau
    # Target index 0 (the positive) for every row: -log_softmax(logits)[..., 0].
    return -F.log_softmax(logits, dim=-1)[..., 0].mean()


def warmup_mixed_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau_s: float,
                      tau_t: float, tau_nce: float, relation_weight: torch.Tensor) -> torch.Tensor:
    """(1 - w) * InfoNCE + w * ReSSL, with w = relation_weight in [0, 1] (a 0-dim tensor, so a
    changing ramp does not recompile). w = 1 is the plain relation loss."""
    w = relation_weight.to(_upcast(q).dtype)
    return (1 - w) * infonce_loss(q, k, queue, tau_nce) + w * ressl_loss(q, k, queue, tau_s, tau_t)


@torch.no_grad()
def collapse_indicators(k: torch.Tensor, queue: torch.Tensor, tau_t: float) -> torch.Tensor:
    """Two cheap signs that the relation has collapsed, as a (2,) float32 device tensor:

    [0] mean entropy of the teacher's targets softmax(k @ queue.T / tau_t) over log K: 1 = uniform
        targets (the relation carries no information; the loss then sits near log K);
    [1] mean cosine between distinct queue keys: 1 = every key the same direction. Exact and O(K D):
        for unit rows, sum_{i != j} <v_i, v_j> = |sum_i v_i|^2 - K.
    k: (N, D) L2-normalised teacher keys (this step's, before their push); queue: (K, D) unit rows.
    Costs one N x K matmul; the loop calls it at log steps only.
    """
    queue = _upcast(queue)
    size = queue.shape[0]
    log_p = F.log_softmax(_upcast(k) @ queue.T / tau_t, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1).mean() / math.log(size)
    total = queue.sum(dim=0)
    mean_cos = ((total * total).sum() - size) / (size * (size - 1))
    return torch.stack([entropy, mean_cos])


class Queue:
    """FIFO ring buffer of L2-normalised teacher keys, K x D, with the write pointer on the device.

    The pointer is a device tensor so `push` never synchronises with the host (and stays capturable
    by CUDA graphs). Rows start as random unit vectors, as in the reference implementation.
    """

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None):
        buf = torch.randn(size, dim, generator=generator)
        self.buffer = F.normalize(buf, dim=1).to(device)  # (K, D) float32
        self.ptr = torch.zeros((), dtype=torch.long, device=device)  # next row to write
        self._arange_cache: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.buffer.shape[0]

    @torch.no_grad()
    def push(self, keys: torch.Tensor, enabled: torch.Tensor | None = None) -> None:
        """Write keys (N, D) at rows ptr..ptr+N-1 (mod K) and advance the pointer by N.

        enabled: optional 0-dim bool device tensor; False leaves buffer and pointer unchanged
        (a step skipped by the non-finite guard) without a host sync.
        """
        n = keys.shape[0]
        if self._arange_cache is None or self._arange_cache.shape[0] != n:
            self._arange_cache = torch.arange(n, device=self.buffer.device)
        rows = (self.ptr + self._arange_cache) % self.size
        keys = keys.detach().to(self.buffer.dtype)
        if enabled is not None:
            keys = torch.where(enabled, keys, self.buffer[rows])
            n = n * enabled.long()
        self.buffer.index_copy_(0, rows, keys)
        self.ptr.copy_((self.ptr + n) % self.size)

    def state_dict(self) -> dict:
        return {"buffer": self.buffer, "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        if state["buffer"].shape != self.buffer.shape:
            raise ValueError(f"queue shape {tuple(state['buffer'].shape)} in the checkpoint differs "
                             f"from the configured {tuple(self.buffer.shape)} (method.queue_size, "
                             "model.proj_dim)")
        self.buffer.copy_(state["buffer"])
        self.ptr.copy_(state["ptr"])
