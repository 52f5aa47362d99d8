"""The approximate leave-one-out losses (fedmtl/client/loo.py) against the exact ones: refit
without each row in turn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedmtl.client.loo import alo_losses, system_size


def _fit(z, y, kind, lam, anchor_w, anchor_b, bias_only):
    """argmin Σ_i loss_i + λ/2·‖ψ − anchor‖² to machine precision (float64 L-BFGS)."""
    head = torch.nn.Linear(z.shape[1], anchor_w.shape[0]).double()
    with torch.no_grad():
        head.weight.copy_(anchor_w)
        head.bias.copy_(anchor_b)
    head.weight.requires_grad_(not bias_only)
    params = [head.bias] if bias_only else list(head.parameters())
    opt = torch.optim.LBFGS(
        params,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        out = head(z)
        if kind == "classification":
            loss = F.cross_entropy(out, y, reduction="sum")
        else:
            loss = ((out[:, 0] - y) ** 2).sum()
        loss = loss + lam / 2 * (
            ((head.weight - anchor_w) ** 2).sum() + ((head.bias - anchor_b) ** 2).sum()
        )
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return head


@pytest.mark.parametrize(
    ("kind", "n", "d", "c"),
    [
        ("regression", 30, 4, 1),  # the P × P Hessian
        ("regression", 5, 9, 1),  # n·C < P: the kernel form
        ("classification", 40, 3, 3),
        ("classification", 6, 12, 3),  # the kernel form
    ],
)
@pytest.mark.parametrize("scope", ["all", "bias"])
def test_alo_matches_refitting_without_each_row(kind, n, d, c, scope):
    """Exact for ridge regression (one Newton step is the whole refit); within a few hundredths
    of a nat per row for multinomial regression."""
    gen = torch.Generator().manual_seed(n + d + c)
    z = torch.randn(n, d, dtype=torch.float64, generator=gen)
    if kind == "regression":
        y = torch.randn(n, dtype=torch.float64, generator=gen)
    else:
        y = torch.randint(0, c, (n,), generator=gen)
    anchor_w = 0.3 * torch.randn(c, d, dtype=torch.float64, generator=gen)
    anchor_b = torch.zeros(c, dtype=torch.float64)
    lam, bias_only = 2.0, scope == "bias"
    head = _fit(z, y, kind, lam, anchor_w, anchor_b, bias_only)
    approx = alo_losses(z, head(z).detach(), y, kind, lam, scope)
    exact = []
    for i in range(n):
        keep = torch.arange(n) != i
        refit = _fit(z[keep], y[keep], kind, lam, anchor_w, anchor_b, bias_only)
        out = refit(z[i : i + 1]).detach()
        if kind == "classification":
            exact.append(float(F.cross_entropy(out, y[i : i + 1])))
        else:
            exact.append(float((out[0, 0] - y[i]) ** 2))
    exact = np.array(exact)
    assert approx.shape == (n,)
    if kind == "regression":
        np.testing.assert_allclose(approx, exact, rtol=1e-5, atol=1e-6)
    else:
        assert np.abs(approx - exact).max() < 0.1
        assert abs(approx.mean() - exact.mean()) < 0.05 * exact.mean()
    # and it is not the in-sample loss: leaving a row out costs something
    with torch.no_grad():
        out = head(z)
    in_sample = (
        F.cross_entropy(out, y, reduction="none")
        if kind == "classification"
        else (out[:, 0] - y) ** 2
    ).numpy()
    assert approx.mean() > in_sample.mean()


def test_alo_needs_a_proper_prior_and_sizes_its_system():
    z, eta, y = torch.zeros(3, 2), torch.zeros(3, 2), torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match="prior precision"):
        alo_losses(z, eta, y, "classification", 0.0)
    assert system_size(100, 10, 64) == 650  # P = C·(d + 1)
    assert system_size(20, 10, 64) == 200  # n·C when smaller
    assert system_size(20, 10, 64, "bias") == 10


@pytest.mark.parametrize(
    ("n", "d", "c", "scope"), [(50, 3, 4, "all"), (6, 12, 3, "all"), (50, 3, 4, "bias")]
)
def test_alo_on_some_rows_is_those_rows_of_the_full_computation(n, d, c, scope):
    """``rows``: the same left-out losses for those rows (the Hessian still sums every row)."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(n, d, dtype=torch.float64, generator=gen)
    eta = torch.randn(n, c, dtype=torch.float64, generator=gen)
    y = torch.randint(0, c, (n,), generator=gen)
    rows = torch.arange(0, n, 3)
    full = alo_losses(z, eta, y, "classification", 1.5, scope)
    some = alo_losses(z, eta, y, "classification", 1.5, scope, rows)
    np.testing.assert_allclose(some, full[rows.numpy()], rtol=1e-10)
