"""Each rule's maths alone, without the capture: the kernels' per-sample forms against
autograd on random inputs (one backward per sample, float64), and the forms' norms,
inner products and projections against their materialised gradients."""
import pytest
import torch
import torch.nn.functional as F

from gradnoise.capture.conv import ConvForm
from gradnoise.capture.embedding import lookup_form
from gradnoise.capture.forms import Dense, Factored, ForwardFactor, Lookup, cross, inner, project, sq_norms
from gradnoise.capture.linear import linear_forms
from gradnoise.capture.norm import affine_forms

torch.manual_seed(0)
D = torch.float64


def _per_sample(fn, params, xs, gys):
    """``[n, *p.shape]`` per parameter: autograd of ``<fn(x_i, *params), gy_i>`` per sample."""
    out = [[] for _ in params]
    for x, gy in zip(xs, gys):
        ps = [p.detach().clone().requires_grad_(True) for p in params]
        grads = torch.autograd.grad(fn(x.unsqueeze(0), *ps), ps, gy.unsqueeze(0))
        for o, g in zip(out, grads):
            o.append(g)
    return [torch.stack(o) for o in out]


def test_linear_forms_match_autograd():
    n, t, d_in, d_out = 4, 5, 3, 6
    w, b = torch.randn(d_out, d_in, dtype=D), torch.randn(d_out, dtype=D)
    x, gy = torch.randn(n, t, d_in, dtype=D), torch.randn(n, t, d_out, dtype=D)
    gw, gb = _per_sample(F.linear, [w, b], x, gy)
    forms = linear_forms(x, gy)
    torch.testing.assert_close(forms["weight"].materialise(), gw)
    torch.testing.assert_close(forms["weight"].gram_sq_norms(), gw.pow(2).sum((1, 2)))
    torch.testing.assert_close(forms["weight"].total(), gw.sum(0))
    torch.testing.assert_close(forms["bias"].grads, gb)


def test_lookup_form_matches_autograd_with_padding():
    n, t, v, d = 3, 6, 5, 4
    table = torch.randn(v, d, dtype=D)
    ids = torch.randint(0, v, (n, t))
    ids[:, 1] = ids[:, 0]  # a repeated id per sample
    ids[:, 2] = 0          # the padding index
    gy = torch.randn(n, t, d, dtype=D)
    (gw,) = _per_sample(lambda i, w: F.embedding(i, w, padding_idx=0), [table], ids, gy)
    form = lookup_form(torch.where(ids == 0, -1, ids), gy, v)
    torch.testing.assert_close(form.materialise(), gw)
    torch.testing.assert_close(form.gram_sq_norms(), gw.pow(2).sum((1, 2)))
    torch.testing.assert_close(form.total(), gw.sum(0))


@pytest.mark.parametrize("dims, groups, transposed, stride, size", [
    (1, 1, False, 2, 7), (2, 2, False, 2, 7), (2, 1, False, 2, 7), (3, 1, False, 2, 7), (1, 1, True, 2, 7),
    (2, 2, True, 2, 7), (2, 1, False, 1, 16),  # 256 positions: the grouped convolution
])
def test_conv_form_matches_autograd(dims, groups, transposed, stride, size):
    n, c_in, c_out, k = 3, 4, 6, 3
    spatial = (size, size - 1, size - 2)[:dims]
    conf = ([stride] * dims, [1] * dims, [1] * dims, groups)
    if transposed:
        w = torch.randn(c_in, c_out // groups, *[k] * dims, dtype=D)
        fn = lambda x, w: getattr(F, f"conv_transpose{dims}d")(x, w, None, stride, 1, 1, groups, 1)  # noqa: E731
    else:
        w = torch.randn(c_out, c_in // groups, *[k] * dims, dtype=D)
        fn = lambda x, w: getattr(F, f"conv{dims}d")(x, w, None, stride, 1, 1, groups)  # noqa: E731
    x = torch.randn(n, c_in, *spatial, dtype=D)
    gy = torch.randn_like(fn(x, w))
    (gw,) = _per_sample(fn, [w], x, gy)
    src, dst = (gy, x) if transposed else (x, gy)
    form = ConvForm(src, dst, tuple(w.shape), conf, 1)
    assert form.grouped == (size == 16 or dims == 3)
    torch.testing.assert_close(form.materialise(), gw)
    torch.testing.assert_close(form.total(), gw.sum(0))
    if form.has_gram:
        torch.testing.assert_close(form.gram_sq_norms(), gw.pow(2).flatten(1).sum(1))


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_affine_forms_match_autograd(norm):
    n = 3
    if norm == "layer":
        x, w, b = torch.randn(n, 5, 6, dtype=D), torch.randn(6, dtype=D), torch.randn(6, dtype=D)
        fn = lambda x, w, b: F.layer_norm(x, (6,), w, b)  # noqa: E731
        xhat = F.layer_norm(x, (6,))
    else:
        x, w, b = torch.randn(n, 4, 3, 3, dtype=D), torch.randn(4, dtype=D), torch.randn(4, dtype=D)
        fn = lambda x, w, b: F.group_norm(x, 2, w, b)  # noqa: E731
        xhat = F.group_norm(x, 2)
    gy = torch.randn_like(x)
    gw, gb = _per_sample(fn, [w, b], x, gy)
    forms = affine_forms(xhat.unsqueeze(1), gy.unsqueeze(1), w.shape, b.shape, channel=norm == "group")
    torch.testing.assert_close(forms["weight"].grads, gw)
    torch.testing.assert_close(forms["bias"].grads, gb)


def test_sq_norms_of_a_large_float32_row_are_accurate():
    """38.6M entries (GPT-2's tied table): one fused norm is ~1e-3 off in float32 here."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 38_597_376, generator=g)
    ref = x.double().pow(2).sum(1)
    got = sq_norms(x)
    assert got.dtype == torch.float32
    assert float(((got.double() - ref) / ref).abs().max()) < 1e-6
    assert float(((sq_norms(x.bfloat16()).double() - x.bfloat16().double().pow(2).sum(1)) / ref).abs().max()) < 1e-5


# ---- cross terms from factors ----------------------------------------------------------------
def _factored(n, t, r, c, start=0, num_rows=None):
    return Factored(torch.randn(n, t, r, dtype=D), torch.randn(n, t, c, dtype=D), num_rows or r, start)


def _dense_of(form, rows, cols):
    g = form.materialise()
    full = torch.zeros(g.shape[0], rows, cols, dtype=D)
    start = getattr(form, "start", 0)
    full[:, start: start + g.shape[1]] = g.reshape(g.shape[0], g.shape[1], -1)
    return full


PAIRS = {
    "linear-linear": lambda: (_factored(3, 4, 5, 6), ForwardFactor("cols", torch.randn(3, 2, 6, dtype=D)),
                              (0, 5), torch.randn(3, 2, 5, dtype=D), "rows"),
    "lookup-linear (tied head after the table)": lambda: (
        Lookup(torch.randint(-1, 7, (3, 4)), torch.randn(3, 4, 5, dtype=D), 7),
        ForwardFactor("cols", torch.randn(3, 2, 5, dtype=D)), (0, 7), torch.randn(3, 2, 7, dtype=D), "rows"),
    "linear-lookup (the table after the tied head)": lambda: (
        _factored(3, 4, 7, 5), ForwardFactor("rows", torch.randint(-1, 7, (3, 6))), (0, 7),
        torch.randn(3, 6, 5, dtype=D), "cols"),
    "lookup-lookup (a table used twice)": lambda: (
        Lookup(torch.randint(0, 4, (3, 5)), torch.randn(3, 5, 2, dtype=D), 4),
        ForwardFactor("rows", torch.randint(0, 4, (3, 3))), (0, 4), torch.randn(3, 3, 2, dtype=D), "cols"),
    "row spans (slices of a packed projection)": lambda: (
        _factored(3, 4, 3, 5, start=2, num_rows=9), ForwardFactor("cols", torch.randn(3, 2, 5, dtype=D)),
        (4, 5), torch.randn(3, 2, 5, dtype=D), "rows"),
    "transposed use": lambda: (
        _factored(3, 4, 5, 6), ForwardFactor("rows", torch.randn(3, 2, 5, dtype=D)), (0, 5),
        torch.randn(3, 2, 6, dtype=D), "cols"),
    "dense-linear": lambda: (Dense(torch.randn(3, 5, 6, dtype=D)), ForwardFactor("cols", torch.randn(3, 2, 6, dtype=D)),
                             (0, 5), torch.randn(3, 2, 5, dtype=D), "rows"),
}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_projection_gives_the_materialised_inner_product(pair):
    """``Σ_t y_t·Q_t`` (the earlier use projected on the later use's forward factor) equals
    ``⟨G, G'⟩`` of the two materialised per-sample gradients."""
    form, fwd, span, y, y_side = PAIRS[pair]()
    rows = span[0] + span[1] if fwd.side == "cols" else getattr(form, "num_rows", None) or form.materialise().shape[1]
    rows = max(rows, getattr(form, "num_rows", 0))
    first = form.materialise()
    cols = first.reshape(first.shape[0], first.shape[1], -1).shape[2]
    g1 = _dense_of(form, rows, cols)
    if fwd.side == "cols":  # the partner: rows y over its span, cols x
        partner = Factored(y, fwd.x, rows, span[0])
    elif fwd.is_ids:
        partner = Lookup(fwd.x, y, rows)
    else:
        partner = Factored(fwd.x, y, rows, 0)
    g2 = _dense_of(partner, rows, cols)
    want = (g1 * g2).sum((1, 2))
    torch.testing.assert_close(cross(project(form, fwd, span), y), want)
    torch.testing.assert_close(inner(form, fwd, span, y), want)
