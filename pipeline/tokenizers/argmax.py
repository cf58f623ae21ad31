"""The code of each position, ``argmax_v (W r + b)_v``, without the full fp32 logit matrix.

The dVAE's last layer is a 1×1 conv from ``C`` features to ``V`` code logits (C = 2048, V = 8192
for OpenAI's encoder: 1/8 of its FLOPs), and a token is only the argmax. On a CPU with bf16 dot
products (AVX512-BF16, AMX) the logits are first computed in bf16 (~3× faster than fp32 here),
together with a rigorous bound on how far each one can be from its fp32 value; every code whose
bf16 logit is within that bound of the bf16 winner's exact fp32 logit is then recomputed in fp32,
and the argmax is taken over those. The result is the fp32 argmax: a code that was ruled out is provably below
the winner. Positions with too many surviving codes (exact ties, e.g. a zero feature vector with
equal biases) get their full fp32 row, so the tie-break stays torch's (the lowest index).

Error bound for one logit (Cauchy-Schwarz; u = 2^-8 for bf16, 2^-24 for fp32 accumulation):

    |W·r - W̃·r̃|      ≤ ‖W - W̃‖·‖r‖ + ‖W̃‖·‖r - r̃‖           (rounding W and r to bf16)
    accumulation      ≤ C·2^-24·‖W̃‖·‖r̃‖                      (fp32 sums of the bf16 products)
    bf16 output       ≤ 2^-8·|ŷ| (≤ 2^-8·max|ŷ| of the row)     (the GEMM returns bf16)

Shapes: ``r`` [P, C] float32 (P = positions), ``w`` [V, C], ``b`` [V]; result int64 [P].

The same code runs on CUDA, where it gives the bf16 and tf32 precisions their fp32 argmax at bf16
tensor-core speed (pipeline/tokenizers/numerics.py). The bound needs fp32 accumulation in the bf16
GEMM: oneDNN does that on CPU; on CUDA `numerics()` turns cuBLAS's reduced-precision bf16
reductions off. Call it inside `numerics.exact_fp32` so that the fp32 parts are not autocast or TF32.
"""

from __future__ import annotations

import torch

_U_BF16 = 2.0**-8
_U_FP32 = 2.0**-24


def bf16_matmul_is_fast() -> bool:
    """Whether this CPU has native bf16 dot products (else screening would cost more than it saves)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: do not guess
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


class ScreenedArgmax:
    """``argmax(r @ w.T + b, dim=1)`` for fp32 ``r``, exact, screened in bf16 (see module docstring)."""

    # Above this many surviving codes a position is cheaper as one full fp32 row.
    MAX_CANDIDATES = 64

    def __init__(self, w: torch.Tensor, b: torch.Tensor):
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise ValueError(f"w must be [V, C] and b [V], got {tuple(w.shape)} and {tuple(b.shape)}")
        self.w = w.detach().float().contiguous()  # [V, C]
        self.b = b.detach().float().contiguous()  # [V]
        self.b_bf16 = self.b.to(torch.bfloat16)
        self.last_candidates = 0.0  # mean surviving codes per position in the last call
        self.wt_bf16 = self.w.to(torch.bfloat16).t().contiguous()  # [C, V]: the GEMM's right side
        w_round = self.wt_bf16.t().float()
        self.w_err_max = float((self.w - w_round).norm(dim=1).max())  # max_v ‖W_v - W̃_v‖
        self.w_norm_max = float(w_round.norm(dim=1).max())  # max_v ‖W̃_v‖

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        if r.ndim != 2 or r.shape[1] != self.w.shape[1] or r.dtype != torch.float32:
            raise ValueError(f"r must be float32 [P, {self.w.shape[1]}], got {r.dtype} {tuple(r.shape)}")
        p, c = r.shape
        r_b = r.to(torch.bfloat16)
        approx = torch.mm(r_b, self.wt_bf16)  # [P, V] bf16
        approx += self.b_bf16  # biases rounded too: covered by the output term
        r_round = r_b.float()
        r_norm = r.norm(dim=1)  # [P]
        bound = (self.w_err_max * r_norm + self.w_norm_max * (r - r_round).norm(dim=1)
                 + c * _U_FP32 * self.w_norm_max * r_round.norm(dim=1))
        top_v = approx.argmax(1)  # [P] the bf16 winner
        top = approx.gather(1, top_v[:, None])[:, 0].float()
        row_abs = torch.maximum(top.abs(), approx.amin(1).float().abs())
        # The bias's own bf16 rounding and the output rounding: 2 ulps of the row's largest value.
        bound += 2 * _U_BF16 * (row_abs + self.b.abs().max())
        bound *= 1.05  # second-order terms (products of the rounding errors above)
        # The bf16 winner's exact logit is a value the true maximum reaches at least, so a code
        # can win only if its bf16 logit is within one bound of it.
        top_exact = (r * self.w[top_v]).sum(1) + self.b[top_v]
        thresh = top_exact - bound
        thresh -= _U_BF16 * thresh.abs()  # compared in bf16: round the threshold down
        cand = approx >= thresh.to(torch.bfloat16)[:, None]  # [P, V]
        pi, vi = cand.nonzero(as_tuple=True)  # sorted by position, then code
        counts = torch.bincount(pi, minlength=p)
        self.last_candidates = pi.numel() / max(p, 1)
        out = torch.empty(p, dtype=torch.int64, device=r.device)
        many = counts > self.MAX_CANDIDATES
        if many.any():
            rows = many.nonzero(as_tuple=True)[0]
            out[rows] = torch.addmm(self.b, r[rows], self.w.t()).argmax(1)
            keep = ~many[pi]
            pi, vi = pi[keep], vi[keep]
        if pi.numel():
            exact = (r[pi] * self.w[vi]).sum(1) + self.b[vi]  # fp32 logits of the survivors
            best = torch.full((p,), float("-inf"), device=r.device).scatter_reduce(0, pi, exact, "amax")
            # First (lowest) code reaching the best value, as torch.argmax breaks ties.
            big = torch.iinfo(torch.int64).max
            win = torch.where(exact == best[pi], vi, big)
            first = torch.full((p,), big, dtype=torch.int64, device=r.device).scatter_reduce(0, pi, win, "amin")
            few = ~many
            out[few] = first[few]
        return out
