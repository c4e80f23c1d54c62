"""Many small L2-regularised logistic regressions at once (the fg-seg linear classifier).

Why this solver: fg-seg trains one linear classifier per episode, a thousand episodes per
(layer, head, kind). Each problem is small (a few thousand tokens, head_dim features) and
convex, so Newton's method (IRLS) reaches the optimum in a handful of batched steps:
``torch.bmm`` builds every episode's gradient and Hessian together and one batched Cholesky
solve gives every step. The result is the exact regularised optimum, so it is deterministic
and needs no random initialisation, learning rate or seed.

Objective per episode (scikit-learn's ``LogisticRegression`` with its default ``C = 1``,
per-sample weights and soft targets allowed)::

    sum_i s_i * BCE(y_i, sigmoid(x_i . w + b)) + ||w||^2 / (2 C)

with features centred per episode and divided by one scale per episode (the root mean
square of the centred features over its weighted samples), so one C suits every layer whatever
the scale of its features. One scale, not one per dimension: per-dimension standardisation
would blow a dimension that is nearly constant on the support images (noise) up to the size of
the informative ones. The returned coefficients apply to raw features. Steps are damped by
backtracking (Armijo), so the objective never increases. Each Newton step solves with the
(D + 1)-square Hessian, or, when an episode has fewer support tokens N than that (3,585-wide
post-proj features of a few small images), the same step through the N-square system of the
Woodbury identity (``_token_space``): the same iterates for N^3 + N^2 D work in place of
D^3 + N D^2 per step. torch is imported inside the
functions only, so importing the probes does not load it. Checked against scikit-learn's
``LogisticRegression`` on hard labels (coefficients agree to a relative 2e-5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_JITTER = 1e-6  # added to the Hessian diagonal (the bias is not regularised)


@dataclass
class LinearModels:
    """Per-problem coefficients on raw features: score = x @ coef[e] + bias[e]."""

    coef: np.ndarray  # (E, D)
    bias: np.ndarray  # (E,)
    iterations: int


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def fit_logistic(x: np.ndarray, y: np.ndarray, weight: np.ndarray, C: float = 1.0, max_iter: int = 50,
                 tol: float = 1e-6, dev: str | None = None, space: str = "auto") -> LinearModels:
    """Fit E independent problems: ``x`` (E, N, D), targets ``y`` in [0, 1] and sample weights
    ``weight`` >= 0 of shape (E, N) (weight 0 = padding). Stops when every problem's Newton
    decrement is below ``tol`` times its objective, or after ``max_iter`` steps."""
    import torch

    dev = dev or device()
    X = torch.as_tensor(np.asarray(x, np.float32), device=dev)
    Y = torch.as_tensor(np.asarray(y, np.float32), device=dev)
    S = torch.as_tensor(np.asarray(weight, np.float32), device=dev)
    w, b, it = fit_logistic_torch(X, Y, S, C=C, max_iter=max_iter, tol=tol, space=space)
    return LinearModels(w.cpu().numpy(), b.cpu().numpy(), it)


def fit_logistic_torch(X, Y, S, C: float = 1.0, max_iter: int = 50, tol: float = 1e-6, space: str = "auto"):
    """``fit_logistic`` on float32 torch tensors already on their device (X (E, N, D), Y and S
    (E, N)): the coefficients (E, D) and biases (E,) as float32 tensors on that device, and the
    number of Newton steps. Nothing is copied to or from the host; each step synchronises once
    for its stopping test and once per backtracking test. ``space``: where the Newton system is
    solved, "features" ((D + 1)-square), "tokens" (N-square) or "auto" (the smaller)."""
    import torch

    dev = X.device
    E, N, D = X.shape
    # per-problem centring and scaling over weighted samples
    total = S.sum(1).clamp_min(1e-12)[:, None]  # (E, 1)
    mean = torch.einsum("en,end->ed", S, X) / total
    var = torch.einsum("en,end->ed", S, (X - mean[:, None]) ** 2) / total
    scale = var.mean(1, keepdim=True).sqrt()  # (E, 1)
    scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))
    Z = (X - mean[:, None]) / scale[:, None]
    Z = torch.cat([Z, torch.ones(E, N, 1, device=dev)], dim=2) * (S > 0)[..., None]  # bias column; pads -> 0
    reg = torch.full((D + 1,), 1.0 / float(C), device=dev, dtype=torch.float64)
    reg[-1] = 0.0
    theta = torch.zeros(E, D + 1, device=dev, dtype=torch.float64)
    if space not in ("auto", "features", "tokens"):
        raise ValueError(f"space must be auto, features or tokens, not {space!r}")
    tokens = space == "tokens" or (space == "auto" and N < D + 1)
    newton_step = _token_space(Z, reg) if tokens else _feature_space(Z, reg)

    def objective(th: torch.Tensor) -> torch.Tensor:
        z = torch.bmm(Z, th.to(torch.float32)[..., None])[..., 0]
        loss = (S * (torch.nn.functional.softplus(z) - Y * z)).sum(1).to(torch.float64)
        return loss + 0.5 * (th * th * reg).sum(1)

    f = objective(theta)
    it = 0
    for it in range(1, max_iter + 1):
        z = torch.bmm(Z, theta.to(torch.float32)[..., None])[..., 0]
        p = torch.sigmoid(z)
        grad = torch.bmm(Z.transpose(1, 2), (S * (p - Y))[..., None])[..., 0].to(torch.float64) + reg * theta
        step = newton_step(grad, S * p * (1 - p))
        decrement = (grad * step).sum(1)  # >= 0
        if bool((decrement <= tol * f.abs().clamp_min(1.0)).all()):
            break
        t = torch.ones(E, device=dev, dtype=torch.float64)
        new_theta, new_f = theta - step, objective(theta - step)
        for _ in range(30):  # backtracking, only for problems whose objective did not drop enough
            bad = new_f > f - 0.25 * t * decrement
            if not bool(bad.any()):
                break
            t = torch.where(bad, t * 0.5, t)
            cand = theta - t[:, None] * step
            cand_f = objective(cand)
            new_theta = torch.where(bad[:, None], cand, new_theta)
            new_f = torch.where(bad, cand_f, new_f)
        theta, f = new_theta, new_f
    w = theta[:, :D].to(torch.float32) / scale
    b = theta[:, D].to(torch.float32) - (w * mean).sum(1)
    return w, b, it


def _feature_space(Z, reg):
    """The Newton step H^-1 g with H = Z^T diag(c) Z + R, R = diag(reg + jitter), solved in the
    (D + 1)-square system."""
    import torch

    ridge = reg + _JITTER

    def step(grad, curv):
        hess = torch.bmm(Z.transpose(1, 2), Z * curv[..., None]).to(torch.float64)
        hess.diagonal(dim1=1, dim2=2).add_(ridge)  # in place: no second (D + 1)-square copy per episode
        chol, info = torch.linalg.cholesky_ex(hess)
        out = torch.cholesky_solve(grad[..., None], chol)[..., 0]
        return torch.where((info == 0)[:, None], out, grad)  # never happens with the jitter; be safe

    return step


def _token_space(Z, reg):
    """The same step through the Woodbury identity, solved in an N-square system:
    H^-1 g = R^-1 g - R^-1 Z^T c^1/2 (I + c^1/2 Z R^-1 Z^T c^1/2)^-1 c^1/2 Z R^-1 g.
    Z R^-1 Z^T is built once per fit (N^2 D); each step then costs N^3 / 3 + N D. In float64
    (a copy of the features, twice their float32 bytes): the bias's R^-1 is 1 / jitter, and its
    terms cancel."""
    import torch

    E, N, _ = Z.shape
    Z64 = Z.to(torch.float64)
    rinv = 1.0 / (reg + _JITTER)
    gram = torch.bmm(Z64 * rinv, Z64.transpose(1, 2))  # (E, N, N)
    eye = torch.eye(N, dtype=torch.float64, device=Z.device)

    def step(grad, curv):
        root = curv.to(torch.float64).sqrt()
        u = grad * rinv
        chol, info = torch.linalg.cholesky_ex(eye + root[:, :, None] * gram * root[:, None, :])
        v = torch.cholesky_solve((root * torch.bmm(Z64, u[..., None])[..., 0])[..., None], chol)[..., 0]
        out = u - rinv * torch.bmm(Z64.transpose(1, 2), (root * v)[..., None])[..., 0]
        return torch.where((info == 0)[:, None], out, grad)

    return step
