"""Variance-reduced optimizers (gradnoise.optim) against direct float64 transcriptions of
their papers' updates, on a fixed sequence of per-batch quadratics; SVRG against SGD on
least squares; the same-batch closure contract; state_dict round trips; bad options."""
import io
import math

import pytest
import torch
from torch import nn

from gradnoise.optim import MARS, STORM, SVRG

DT = torch.float64
SHAPES = [(3, 4), (2, 1, 2, 2), (4,)]   # a matrix, a conv weight [C_out, C_in, kh, kw], a bias


# --- a fixed sequence of per-batch functions f(x, ξ_t) = Σ_p ½ x_pᵀ A_tp x_p − r_tpᵀ x_p ---

def _problem(steps, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    fns = []
    for _ in range(steps):
        parts = []
        for shape in SHAPES:
            n = math.prod(shape)
            q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
            a = q @ torch.diag(torch.rand(n, generator=gen, dtype=DT) * 1.5 + 0.5) @ q.T
            parts.append(((a + a.T) / 2, scale * torch.randn(n, generator=gen, dtype=DT)))
        fns.append(parts)
    x0 = [0.5 * scale * torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]
    return fns, x0


def _grad(fns, t, xs):
    """Hand-written ∇f(x, ξ_t) = A_t x − r_t, per tensor, no autograd."""
    return [(a @ x.reshape(-1) - r).reshape(x.shape) for (a, r), x in zip(fns[t], xs)]


def _params(x0):
    return [nn.Parameter(x.clone()) for x in x0]


def _closure(fns, t, params, log=None):
    def closure():
        if log is not None:
            log.append((t, [p.detach().clone() for p in params]))
        loss = sum(0.5 * p.reshape(-1) @ a @ p.reshape(-1) - r @ p.reshape(-1)
                   for (a, r), p in zip(fns[t], params))
        loss.backward()
        return loss
    return closure


def _close(params, xs):
    return max(float((p.detach() - x).abs().max()) for p, x in zip(params, xs))


# --- transcriptions of the papers' updates, written from the equations ---

def _storm_ref(fns, x0, steps, k=0.1, w=0.1, c=100.0, lr=None, a=None):
    x, x_prev, d, s, eta_prev = [t.clone() for t in x0], None, None, 0.0, None
    for t in range(steps):
        g = _grad(fns, t, x)
        if d is None:
            d = g
        else:
            g_old = _grad(fns, t, x_prev)             # previous iterate, SAME batch ξ_t
            a_t = a if lr is not None else min(1.0, c * eta_prev ** 2)
            d = [gi + (1 - a_t) * (di - go) for gi, di, go in zip(g, d, g_old)]
        s += sum(float((gi ** 2).sum()) for gi in g)
        eta = lr if lr is not None else k / (w + s) ** (1 / 3)
        x_prev, x, eta_prev = x, [xi - eta * di for xi, di in zip(x, d)], eta
    return x


def _mars_ref(fns, x0, steps, exact, lr=3e-3, betas=(0.95, 0.99), eps=1e-8, wd=0.0,
              gamma=0.025, mars_1d=False):
    b1, b2 = betas
    x, x_prev, g_last = [t.clone() for t in x0], None, None
    m = [torch.zeros_like(t) for t in x0]
    v = [torch.zeros_like(t) for t in x0]
    clipped = []
    for t in range(1, steps + 1):
        g = _grad(fns, t - 1, x)
        if exact:
            g_tilde = None if x_prev is None else _grad(fns, t - 1, x_prev)
        else:
            g_tilde = g_last
        new = []
        for i, xi in enumerate(x):
            if xi.dim() >= 2 or mars_1d:
                c = g[i] if g_tilde is None else g[i] + gamma * b1 / (1 - b1) * (g[i] - g_tilde[i])
                norm = float(torch.sqrt((c ** 2).sum()))
                clipped.append(norm > 1)
                if norm > 1:
                    c = c / norm
            else:
                c = g[i]
            m[i] = b1 * m[i] + (1 - b1) * c
            v[i] = b2 * v[i] + (1 - b2) * c * c
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            new.append(xi - lr * (wd * xi + m_hat / (torch.sqrt(v_hat) + eps)))
        x_prev, x, g_last = x, new, g
    return x, clipped


# --- (2) the optimizers match the transcriptions to 1e-12 ---

@pytest.mark.parametrize("opts", [{}, {"k": 0.5, "w": 2.0, "c": 3.0}, {"lr": 0.05, "a": 0.3}])
def test_storm_matches_the_paper(opts):
    fns, x0 = _problem(7)
    params = _params(x0)
    opt = STORM(params, **opts)
    for t in range(7):
        opt.step(_closure(fns, t, params))
    assert _close(params, _storm_ref(fns, x0, 7, **opts)) < 1e-12


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("opts", [{}, {"lr": 0.05, "weight_decay": 0.1, "gamma": 0.3, "mars_1d": True},
                                  {"lr": 0.02, "betas": (0.9, 0.95), "gamma": 0.5}])
def test_mars_matches_the_paper(exact, opts):
    fns, x0 = _problem(7, scale=0.3)
    params = _params(x0)
    opt = MARS(params, exact=exact, **opts)
    for t in range(7):
        opt.step(_closure(fns, t, params))
    ref_opts = {("wd" if k == "weight_decay" else k): v for k, v in opts.items()}
    want, clipped = _mars_ref(fns, x0, 7, exact, **ref_opts)
    assert _close(params, want) < 1e-12
    assert any(clipped) and not all(clipped)      # both sides of the clip are exercised
    if opts.get("gamma", 0.025) > 0.1:            # the correction matters: AdamW-on-clip differs
        plain, _ = _mars_ref(fns, x0, 7, exact, **{**ref_opts, "gamma": 0.0})
        assert _close(params, plain) > 1e-4


def test_mars_without_a_closure_is_the_approximate_form():
    fns, x0 = _problem(6, scale=0.3)
    params = _params(x0)
    opt = MARS(params, lr=0.05, gamma=0.4)
    for t in range(6):
        opt.zero_grad()
        _closure(fns, t, params)()
        opt.step()
    assert _close(params, _mars_ref(fns, x0, 6, False, lr=0.05, gamma=0.4)[0]) < 1e-12


# --- (3) MARS keeps a copy of the previous gradient, not a reference ---

def test_mars_previous_gradient_is_a_copy_under_zero_grad_in_place():
    fns, x0 = _problem(6, scale=0.3)
    params = _params(x0)
    opt, last = MARS(params, lr=0.05, gamma=0.4, mars_1d=True), None
    for t in range(6):
        opt.zero_grad(set_to_none=False)          # keeps .grad tensors, writes into them
        _closure(fns, t, params)()
        if last is not None:
            # the kept g_{t−1} is its own tensor, still ∇f(x_{t−1}, ξ_{t−1}), so the
            # correction γβ/(1−β)(g_t − g_{t−1}) is non-zero and the transcription's
            g_now, g_then = _grad(fns, t, [q.detach() for q in params]), _grad(fns, t - 1, last)
            for p, now, then in zip(params, g_now, g_then):
                kept = opt.state[p]["prev_grad"]
                assert kept.data_ptr() != p.grad.data_ptr()
                assert torch.allclose(kept, then, rtol=0, atol=1e-12)
                assert torch.allclose(p.grad, now, rtol=0, atol=1e-12)
                assert float((p.grad - kept).abs().max()) > 1e-3
        last = [q.detach().clone() for q in params]
        opt.step()
    want, _ = _mars_ref(fns, x0, 6, False, lr=0.05, gamma=0.4, mars_1d=True)
    plain, _ = _mars_ref(fns, x0, 6, False, lr=0.05, gamma=0.0, mars_1d=True)
    assert _close(params, want) < 1e-12 and _close(params, plain) > 1e-4


# --- the same-batch closure contract ---

@pytest.mark.parametrize("make", [lambda ps: STORM(ps), lambda ps: MARS(ps, exact=True)])
def test_second_gradient_is_the_previous_iterate_on_the_same_batch(make):
    fns, x0 = _problem(5)
    params = _params(x0)
    opt, log, starts = make(params), [], []
    for t in range(5):
        starts.append([p.detach().clone() for p in params])
        calls = len(log)
        opt.step(_closure(fns, t, params, log))
        new = log[calls:]
        assert [c[0] for c in new] == [t] * (1 if t == 0 else 2)   # same batch ξ_t each call
        if t:
            assert _close_list(new[0][1], starts[t - 1]) == 0           # first call at x_{t−1}
        assert _close_list(new[-1][1], starts[t]) == 0              # last call at x_t
        assert _close_list([p.detach() for p in params], starts[t]) > 0
        for p, want in zip(params, _grad(fns, t, starts[t])):        # .grad is ∇f(x_t, ξ_t)
            assert torch.allclose(p.grad, want, rtol=0, atol=1e-12)


def _close_list(xs, ys):
    return max(float((x - y).abs().max()) for x, y in zip(xs, ys))


def test_svrg_evaluates_the_snapshot_on_the_same_batch():
    fns, x0 = _problem(4)
    params = _params(x0)
    opt, log = SVRG(params, lr=0.1), []
    opt.snapshot(_closure(fns, 0, params))
    snap = [p.detach().clone() for p in params]
    for t in range(1, 4):
        here = [p.detach().clone() for p in params]
        calls = len(log)
        opt.step(_closure(fns, t, params, log))
        (t1, at1), (t2, at2) = log[calls:]
        assert t1 == t2 == t and _close_list(at1, snap) == 0 and _close_list(at2, here) == 0


def test_closure_randomness_is_replayed_for_the_second_point():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 1)).to(DT)
    data = torch.randn(64, 5, dtype=DT)
    opt, drawn = STORM(model.parameters(), lr=0.01, a=0.5), []

    def closure():
        idx = torch.randint(64, (8,))                 # a batch sampled inside the closure
        loss = model(data[idx]).square().mean()
        loss.backward()
        drawn.append(idx)
        return loss

    for _ in range(3):
        opt.step(closure)
    assert len(drawn) == 5 and torch.equal(drawn[1], drawn[2]) and torch.equal(drawn[3], drawn[4])
    assert not torch.equal(drawn[2], drawn[3])
    # after the steps the generator is where one closure call per step would have left it
    state = torch.get_rng_state()
    torch.manual_seed(0)
    again = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 1)).to(DT)
    data = torch.randn(64, 5, dtype=DT)
    for _ in range(3):
        again(data[torch.randint(64, (8,))])
    assert torch.equal(torch.get_rng_state(), state)


# --- (1) SVRG converges past SGD's noise floor on least squares ---

def test_svrg_beats_the_sgd_noise_floor_on_least_squares():
    gen = torch.Generator().manual_seed(0)
    n, d, b, lr = 256, 8, 8, 0.05
    x = torch.randn(n, d, generator=gen, dtype=DT)
    y = x @ torch.randn(d, 1, generator=gen, dtype=DT) + 0.5 * torch.randn(n, 1, generator=gen, dtype=DT)
    f_star = float(0.5 * (x @ torch.linalg.lstsq(x, y).solution - y).square().mean())

    def full_loss(w):
        return 0.5 * (x @ w - y).square().mean()

    def run(kind, epochs):
        w = torch.zeros(d, 1, dtype=DT, requires_grad=True)
        draw = torch.Generator().manual_seed(1)
        opt = SVRG([w], lr=lr) if kind == "svrg" else torch.optim.SGD([w], lr=lr)
        for _ in range(epochs):
            if kind == "svrg":
                opt.snapshot(lambda: full_loss(w).backward())
            for _ in range(2 * n // b):                       # m = 2N/B steps per snapshot
                idx = torch.randint(n, (b,), generator=draw)

                def closure():
                    opt.zero_grad()
                    loss = 0.5 * (x[idx] @ w - y[idx]).square().mean()
                    loss.backward()
                    return loss
                if kind == "svrg":
                    opt.step(closure)
                else:
                    closure()
                    opt.step()
        return float(full_loss(w.detach())) - f_star

    svrg_gap = run("svrg", 12)
    sgd_gap = run("sgd", 36)               # three times SVRG's steps: more gradient evaluations
    assert sgd_gap > 1e-4                  # SGD sits at its noise floor, lr·tr(Σ)/b-sized
    assert abs(svrg_gap) < 1e-10           # SVRG converged linearly to the lstsq optimum
    assert abs(svrg_gap) < 1e-6 * sgd_gap


# --- (4) state_dict round trips: continuing after a reload is the uninterrupted run ---

OPTIMIZERS = {
    "svrg": lambda ps: SVRG(ps, lr=0.05, weight_decay=0.01),
    "storm": lambda ps: STORM(ps, k=0.3, w=1.0, c=10.0),
    "storm-constant": lambda ps: STORM(ps, lr=0.05, a=0.2),
    "mars": lambda ps: MARS(ps, lr=0.01, weight_decay=0.1),
    "mars-exact": lambda ps: MARS(ps, lr=0.01, exact=True),
}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(DT)


def _train(model, opt, kind, steps):
    gen = torch.Generator().manual_seed(3)
    data = torch.randn(40, 4, generator=gen, dtype=DT)
    target = torch.randn(40, 2, generator=gen, dtype=DT)
    for t in steps:
        idx = torch.arange(t * 5, t * 5 + 8) % 40

        def closure():
            opt.zero_grad()
            loss = (model(data[idx]) - target[idx]).square().mean()
            loss.backward()
            return loss
        if kind == "svrg" and t % 3 == 0:
            opt.snapshot(lambda: (model(data) - target).square().mean().backward())
        opt.step(closure)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_state_dict_round_trip(kind):
    straight = _model()
    _train(straight, OPTIMIZERS[kind](straight.parameters()), kind, range(7))

    first = _model()
    opt = OPTIMIZERS[kind](first.parameters())
    _train(first, opt, kind, range(4))
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    second = _model()
    second.load_state_dict(saved["model"])
    opt2 = OPTIMIZERS[kind](second.parameters())
    opt2.load_state_dict(saved["opt"])
    _train(second, opt2, kind, range(4, 7))
    for a, b in zip(straight.parameters(), second.parameters()):
        assert torch.equal(a, b)


# --- (5) bad options: one-line ValueErrors ---

BAD = [
    lambda ps: SVRG(ps, lr=-0.1),
    lambda ps: SVRG(ps, lr=0.1, weight_decay=-1.0),
    lambda ps: STORM(ps, k=-1.0),
    lambda ps: STORM(ps, w=0.0),
    lambda ps: STORM(ps, c=-1.0),
    lambda ps: STORM(ps, lr=0.1),
    lambda ps: STORM(ps, lr=-0.1, a=0.5),
    lambda ps: STORM(ps, lr=0.1, a=1.5),
    lambda ps: MARS(ps, lr=-1e-3),
    lambda ps: MARS(ps, betas=(1.0, 0.99)),
    lambda ps: MARS(ps, betas=(0.9, -0.1)),
    lambda ps: MARS(ps, gamma=-0.1),
    lambda ps: MARS(ps, eps=-1.0),
    lambda ps: MARS(ps, weight_decay=-1.0),
    lambda ps: MARS([{"params": ps[:1]}, {"params": ps[1:], "exact": True}]),
    lambda ps: MARS([{"params": ps[:1]}, {"params": ps[1:], "lr": -1.0}]),
]


@pytest.mark.parametrize("make", BAD)
def test_bad_options_raise_one_line_value_errors(make):
    with pytest.raises(ValueError) as err:
        make(_params(_problem(1)[1]))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("make", [lambda ps: STORM(ps), lambda ps: SVRG(ps, lr=0.1),
                                  lambda ps: MARS(ps, exact=True)])
def test_missing_closure_is_a_clear_error(make):
    fns, x0 = _problem(1)
    params = _params(x0)
    _closure(fns, 0, params)()
    with pytest.raises(ValueError, match="needs a closure") as err:
        make(params).step()
    assert "\n" not in str(err.value)
    assert _close(params, x0) == 0


def test_svrg_needs_a_snapshot():
    fns, x0 = _problem(1)
    params = _params(x0)
    opt = SVRG(params, lr=0.1)
    with pytest.raises(RuntimeError, match="snapshot"):
        opt.step(_closure(fns, 0, params))
    with pytest.raises(ValueError, match="no gradients"):
        opt.snapshot()


# --- (6) parameters without a gradient are skipped ---

@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_parameters_without_grad_are_skipped(kind):
    model = _model()
    unused = nn.Parameter(torch.ones(3, dtype=DT))
    frozen = nn.Parameter(torch.ones(2, 2, dtype=DT), requires_grad=False)
    opt = OPTIMIZERS[kind]([*model.parameters(), unused, frozen])
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, kind, range(4))
    assert torch.equal(unused, torch.ones(3, dtype=DT)) and torch.equal(frozen, torch.ones(2, 2, dtype=DT))
    assert not opt.state.get(frozen)
    if kind != "svrg":                               # SVRG's snapshot covers every trainable one
        assert not opt.state.get(unused)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_failing_closure_leaves_the_current_weights_in_place():
    fns, x0 = _problem(2)
    params = _params(x0)
    opt = STORM(params, lr=0.1, a=0.5)
    opt.step(_closure(fns, 0, params))
    here = [p.detach().clone() for p in params]

    def broken():
        raise KeyError("data loader failed")
    with pytest.raises(KeyError):
        opt.step(broken)                             # raised while x_{t−1} was swapped in
    assert _close(params, here) == 0
