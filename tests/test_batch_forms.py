"""Per-batch quadratic forms (utils/batch_forms.py): every route against dense float64 derivatives."""

import os
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

from curvature_reference import (LOSSES, dense_gauss_newton, dense_gradient, dense_hessian, exact_trace_HS,
                                 forbid_fast_routes, tiny_cnn, tiny_data, tiny_images, tiny_mlp, tiny_resnet,
                                 tiny_resnet_bn)
from utils import batch_forms
from utils.batch_forms import (batch_quadratic_forms, batch_route, centred_forms, chain_quadratic_forms,
                               gauss_newton_forms, gauss_newton_route, noise_route, same_batch_route,
                               vmapped_quadratic_forms)
from utils.models import build_model
from utils.taylor import taylor_quadratic_forms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 10
IDX = torch.tensor([[0, 3, 5], [1, 2, 9], [4, 6, 8], [7, 0, 2]])


def test_the_route_follows_the_model_and_the_device():
    cnn, (X, Y) = tiny_cnn(), tiny_images(N, "ce")
    mlp_X, mlp_Y = tiny_data(N, "mse")
    assert batch_route(cnn, LOSSES["ce"], X, Y) == "r-operator"  # on the CPU
    assert batch_route(cnn, LOSSES["ce"], X, Y, device="cuda:0") == "vmap-double-backward"
    assert batch_route(cnn, LOSSES["ce"], X, Y, exact=True) == "double-backward"
    assert batch_route(tiny_mlp(), LOSSES["mse"], mlp_X, mlp_Y) == "stacked-gram"
    assert batch_route(tiny_mlp(), LOSSES["mse"], mlp_X, mlp_Y, exact=True) == "double-backward"
    # BatchNorm and residual networks: vmapped on a GPU; on the CPU by Taylor coefficients, vmapped
    # where batches are small enough to be overhead-bound.
    bn = tiny_mlp(batchnorm=True)
    assert batch_route(bn, LOSSES["mse"], mlp_X, mlp_Y, device="cuda") == "vmap-double-backward"
    assert batch_route(bn, LOSSES["mse"], mlp_X, mlp_Y) == "taylor"
    assert batch_route(bn, LOSSES["mse"], mlp_X, mlp_Y, batch_size=8) == "vmap-taylor"
    images = torch.zeros(4, 3, 32, 32)
    assert batch_route(tiny_resnet(), LOSSES["mse"], images, mlp_Y[:4], batch_size=16) == "taylor"
    assert batch_route(tiny_resnet(), LOSSES["mse"], images[:, :, :8, :8], mlp_Y[:4], batch_size=16) == \
        "vmap-taylor"
    with_dropout = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout(0.1), nn.Flatten(), nn.Linear(18, 2)).double()
    assert batch_route(with_dropout, LOSSES["ce"], X, Y, device="cuda") == "double-backward"
    assert batch_route(with_dropout, LOSSES["ce"], X, Y) == "double-backward"
    # A model vmap refused keeps the Taylor forms, a batch at a time.
    refused = tiny_mlp(batchnorm=True)
    batch_forms._VMAP_REFUSED.add(refused)
    assert batch_route(refused, LOSSES["mse"], mlp_X, mlp_Y, batch_size=8) == "taylor"
    # A model outside the Taylor rules (attention) keeps double backward.
    assert batch_route(build_model("vit", (3, 8, 8), 2), LOSSES["mse"], images[:, :, :8, :8], mlp_Y[:4],
                       batch_size=4) == "vmap-double-backward"


ROUTES = {  # (model, loss, data, exact) taking each same-batch route on the CPU; vmap is forced
    "stacked-gram": lambda: (tiny_mlp(), LOSSES["ce"], tiny_data(N, "ce"), False),
    "r-operator": lambda: (tiny_cnn(), LOSSES["mse"], tiny_images(N, "mse"), False),
    "double-backward": lambda: (tiny_mlp(batchnorm=True), LOSSES["mse"], tiny_data(N, "mse"), False),  # forced
    "exact": lambda: (tiny_mlp(), LOSSES["ce"], tiny_data(N, "ce"), True),
    "vmap-double-backward": lambda: (tiny_cnn(), LOSSES["ce"], tiny_images(N, "ce"), False),
    "taylor": lambda: (tiny_mlp(batchnorm=True), LOSSES["ce"], tiny_data(N, "ce"), False),  # forced
    "vmap-taylor": lambda: (tiny_mlp(batchnorm=True), LOSSES["mse"], tiny_data(N, "mse"), False),  # forced
}


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_every_same_batch_route_gives_the_dense_terms(name, monkeypatch):
    model, loss_fn, (X, Y), exact = ROUTES[name]()
    if name in ("vmap-double-backward", "double-backward", "vmap-taylor", "taylor"):
        monkeypatch.setattr(batch_forms, "batch_route", lambda *args, **kwargs: name)
    route = same_batch_route(model, loss_fn, X, Y, 3, exact=exact)
    # Twice: the Gram route gathers the rows of every sample once the batches asked for n rows.
    for _ in range(2):
        assert_dense_per_batch(model, loss_fn, X, Y, IDX, *route.forms(IDX))


def assert_dense_per_batch(model, loss_fn, X, Y, idx, quadratics, norms, train_mode=True):
    """(g_B^T H_B g_B, |g_B|^2) of each index row of ``idx`` equal the dense float64 values."""
    assert quadratics.shape == norms.shape == (idx.shape[0],)
    for rows, quadratic, norm2 in zip(idx, quadratics, norms):
        g = dense_gradient(model, loss_fn, X[rows], Y[rows], train_mode)
        H = dense_hessian(model, loss_fn, X[rows], Y[rows], train_mode)
        assert quadratic.item() == pytest.approx((g @ H @ g).item(), rel=1e-12)
        assert norm2.item() == pytest.approx((g @ g).item(), rel=1e-12)


@pytest.mark.parametrize("batchnorm, train_mode", [(False, True), (True, True), (True, False)])
def test_batch_quadratic_forms_match_dense_per_batch(batchnorm, train_mode):
    model, (X, Y) = tiny_mlp(batchnorm=batchnorm), tiny_data(N, "ce")
    loss_fn = LOSSES["ce"]
    model.train(not train_mode)  # the requested mode wins and the model's own flag comes back
    buffers = [b.clone() for b in model.buffers()]
    idx = torch.tensor([[0, 3, 5], [1, 2, 9], [4, 6, 8], [7, 0, 2]])
    quadratics, norms = batch_quadratic_forms(model, loss_fn, X, Y, idx, train_mode=train_mode)
    assert_dense_per_batch(model, loss_fn, X, Y, idx, quadratics, norms, train_mode)
    assert model.training == (not train_mode)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
@pytest.mark.parametrize("train_mode", [True, False])
def test_vmapped_quadratic_forms_match_dense_per_batch(loss_name, train_mode):
    model, (X, Y) = tiny_mlp(), tiny_data(N, loss_name)
    loss_fn = LOSSES[loss_name]
    # A frozen parameter stays out of g and H; an unused one has zero gradient and curvature.
    model[0].bias.requires_grad_(False)
    model.register_parameter("unused", torch.nn.Parameter(torch.ones(2, dtype=torch.float64)))
    model.train(not train_mode)  # the requested mode wins and the model's own flag comes back
    idx = torch.tensor([[0, 3, 5], [1, 2, 9], [4, 6, 8], [7, 0, 2], [5, 5, 1]])
    quadratics, norms = vmapped_quadratic_forms(model, loss_fn, X, Y, idx, train_mode=train_mode)
    assert_dense_per_batch(model, loss_fn, X, Y, idx, quadratics, norms, train_mode)
    assert model.training == (not train_mode)
    assert all(p.grad is None for p in model.parameters())


RESIDUAL = {  # (model, train_mode): the ResNet-20 of EOSS in float64, few trainable parameters
    "resnet": lambda: (tiny_resnet(), True),
    "resnet_bn-train": lambda: (tiny_resnet_bn(), True),
    "resnet_bn-eval": lambda: (tiny_resnet_bn(), False),
}


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
@pytest.mark.parametrize("case", sorted(RESIDUAL))
def test_residual_networks_take_vmap_with_batch_statistics_per_batch(case, loss_name):
    """Batch Sharpness and Gauss–Newton terms of ResNet-20 (with BatchNorm: each batch normalised by
    its own statistics in train mode, the running ones in eval mode) against the dense float64
    Hessian and Gauss–Newton matrix of each batch; every route agrees with the plain loop."""
    model, train_mode = RESIDUAL[case]()
    loss_fn = LOSSES[loss_name]
    X = torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    Y = tiny_data(N, loss_name)[1]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):  # running statistics unlike any batch's own
                module.running_mean.uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(1))
                module.running_var.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
    buffers = [b.clone() for b in model.buffers()]
    idx = IDX[:3]
    assert batch_route(model, loss_fn, X, Y, batch_size=3) == "vmap-taylor"
    quadratics, norms = same_batch_route(model, loss_fn, X, Y, 3, train_mode=train_mode).forms(idx)
    assert_dense_per_batch(model, loss_fn, X, Y, idx, quadratics, norms, train_mode)
    plain = batch_quadratic_forms(model, loss_fn, X, Y, idx, train_mode=train_mode)
    for others in (vmapped_quadratic_forms(model, loss_fn, X, Y, idx, train_mode=train_mode),  # on a GPU
                   taylor_quadratic_forms(model, loss_fn, X, Y, idx, train_mode=train_mode, vectorised=False)):
        torch.testing.assert_close(others, plain, rtol=1e-11, atol=0)
    torch.testing.assert_close((quadratics, norms), plain, rtol=1e-11, atol=0)
    route = gauss_newton_route(model, loss_fn, X, Y, 3, train_mode=train_mode)
    for terms in (route.forms(idx), gauss_newton_forms(model, loss_fn, X, Y, idx, train_mode=train_mode),
                  gauss_newton_forms(model, loss_fn, X, Y, idx, train_mode=train_mode, vectorised=False),
                  taylor_quadratic_forms(model, loss_fn, X, Y, idx, train_mode=train_mode, vectorised=False,
                                         gauss_newton=True)):
        for rows, quadratic, norm2 in zip(idx.tolist(), *terms):
            g = dense_gradient(model, loss_fn, X[rows], Y[rows], train_mode)
            G = dense_gauss_newton(model, loss_name, X[rows], Y[rows], train_mode)
            assert quadratic.item() == pytest.approx((g @ G @ g).item(), rel=1e-11)
            assert norm2.item() == pytest.approx((g @ g).item(), rel=1e-11)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(p.grad is None for p in model.parameters())
    assert not any("forward" in vars(m) for m in model.modules())  # BatchNorm is itself again


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_chain_quadratic_forms_match_dense_per_batch(loss_name):
    model, loss_fn, (X, Y) = tiny_cnn(), LOSSES[loss_name], tiny_images(N, loss_name)
    idx = torch.tensor([[0, 3, 5], [1, 2, 9], [4, 6, 8], [5, 5, 1]])
    quadratics, norms = chain_quadratic_forms(model, loss_fn, X, Y, idx)
    assert_dense_per_batch(model, loss_fn, X, Y, idx, quadratics, norms)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("network, exact, chunk_size", [("mlp", False, None), ("mlp", False, 4), ("mlp", True, 4),
                                                        ("cnn", False, 3), ("batchnorm", False, None)])
def test_full_data_and_centred_forms_are_the_dense_ones(network, exact, chunk_size):
    """g_B^T H g_B and |g|^2 (GNI), and (g_B - g)^T H (g_B - g), g^T H g (tr(HS)), by the Gram
    engine for the MLP and Hessian-vector products otherwise (BatchNorm in eval mode)."""
    model, (X, Y) = {"mlp": (tiny_mlp(), tiny_data(N, "ce")), "cnn": (tiny_cnn(), tiny_images(N, "ce")),
                     "batchnorm": (tiny_mlp(batchnorm=True), tiny_data(N, "ce"))}[network]
    loss_fn, train_mode = LOSSES["ce"], network != "batchnorm"
    H = dense_hessian(model, loss_fn, X, Y, train_mode)
    g = dense_gradient(model, loss_fn, X, Y, train_mode)
    G = torch.stack([dense_gradient(model, loss_fn, X[rows], Y[rows], train_mode) for rows in IDX.tolist()], dim=1)
    route = noise_route(model, loss_fn, X, Y, 3, chunk_size=chunk_size, train_mode=train_mode, exact=exact,
                        min_samples=5, max_samples=50, block_size=2)
    torch.testing.assert_close(route.forms(IDX), (G * (H @ G)).sum(0), rtol=1e-11, atol=1e-14)
    assert route.norm2() == pytest.approx((g @ g).item(), rel=1e-12)
    forms = centred_forms(model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode, exact=exact)
    centred = G - g[:, None]
    torch.testing.assert_close(forms.centred(IDX), (centred * (H @ centred)).sum(0), rtol=1e-10, atol=1e-14)
    assert (forms.norm2, forms.gHg) == pytest.approx(((g @ g).item(), (g @ H @ g).item()), rel=1e-12)


def test_centred_forms_of_every_single_sample_give_the_trace_of_HS():
    """With batches of one point, the mean of (g_i - g)^T H (g_i - g) over all i is tr(HS)."""
    model, (X, Y) = tiny_mlp(), tiny_data(N, "mse")
    trace_HS, _, _ = exact_trace_HS(model, LOSSES["mse"], X, Y)
    every_point = torch.arange(N)[:, None]
    for exact in (False, True):
        forms = centred_forms(model, LOSSES["mse"], X, Y, exact=exact)
        assert forms.centred(every_point).mean().item() == pytest.approx(trace_HS, rel=1e-11)


def test_exact_forms_never_ask_for_the_fast_routes(monkeypatch):
    forbid_fast_routes(monkeypatch)
    model, (X, Y) = tiny_mlp(), tiny_data(N, "mse")
    same_batch_route(model, LOSSES["mse"], X, Y, 3, exact=True).forms(IDX)
    noise_route(model, LOSSES["mse"], X, Y, 3, exact=True, min_samples=2, max_samples=4, block_size=2).forms(IDX)
    centred_forms(model, LOSSES["mse"], X, Y, exact=True).centred(IDX)
    with pytest.raises(AssertionError, match="fast route"):
        same_batch_route(model, LOSSES["mse"], X, Y, 3).forms(IDX)


class _ValueBranchingNet(nn.Module):
    """A user's model that torch.func.vmap refuses: it reads a tensor's value with ``.item()`` and
    branches on it (a data-dependent rescaling, as a user's code may do)."""

    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        if h.abs().max().item() > 0.5:
            h = h * 0.9
        return self.out(h)


@pytest.mark.parametrize("measure", ["batch_sharpness", "gn_batch_sharpness"])
def test_a_model_vmap_refuses_falls_back_to_the_loop_with_the_plain_value(measure):
    from utils import measures
    from utils.estimators import measurement_generator

    torch.manual_seed(0)
    model, (X, Y) = _ValueBranchingNet().double(), tiny_data(N, "mse")
    loss_fn = LOSSES["mse"]
    assert batch_route(model, loss_fn, X, Y, batch_size=3) == "vmap-double-backward"
    options = {"min_samples": 20, "max_samples": 60, "rel_se": 1e-9}
    with pytest.warns(UserWarning, match="cannot run under torch.func.vmap"):
        fast = getattr(measures, measure)(model, loss_fn, X, Y, 3, generator=measurement_generator(5, 0), **options)
    plain = getattr(measures, measure)(model, loss_fn, X, Y, 3, generator=measurement_generator(5, 0), exact=True,
                                       **options)
    assert fast.n == plain.n == 60
    assert fast.value == pytest.approx(plain.value, rel=1e-12) and fast.se == pytest.approx(plain.se, rel=1e-9)
    # Decided once: the model now takes the loop, and says so.
    assert batch_route(model, loss_fn, X, Y, batch_size=3) == "double-backward"


class _RowBranchingNet(_ValueBranchingNet):
    """The same rescaling decided row by row in a Python loop: each sample's loss depends on that
    sample alone (as the closed forms need), and vmap still refuses the ``.item()``."""

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        h = torch.stack([row * 0.9 if row.abs().max().item() > 0.5 else row for row in h])
        return self.out(h)


def test_closed_forms_of_a_model_vmap_refuses_take_per_sample_gradients_one_at_a_time():
    from curvature_reference import batch_derivatives, exact_ghg_family
    from utils import measures
    from utils.estimators import measurement_generator

    torch.manual_seed(0)
    model, (X, Y) = _RowBranchingNet().double(), tiny_data(N, "mse")
    loss_fn = LOSSES["mse"]
    with pytest.warns(UserWarning, match="cannot run under torch.func.vmap"):
        noise = measures.gni(model, loss_fn, X, Y, 3, generator=measurement_generator(5, 0))
    batch, _ = measures.gradient_norms(model, loss_fn, X, Y, 3, generator=measurement_generator(5, 0))
    assert noise.exact and batch.exact
    assert noise.value == pytest.approx(exact_ghg_family(model, loss_fn, X, Y, 3)["gni"], rel=1e-10)
    norms = [(g @ g).item() for g, _ in batch_derivatives(model, loss_fn, X, Y, 3)]
    assert batch.value == pytest.approx(sum(norms) / len(norms), rel=1e-10)


def test_a_model_that_mixes_the_samples_of_a_batch_is_sampled_not_taken_in_closed_form():
    """The batch-max branch of _ValueBranchingNet couples the samples: g_B is not the mean of the
    per-sample gradients, so the closed forms would be wrong; GNI and E_B|g_B|^2 are sampled
    instead and agree with the averages over all C(10, 3) batches within their SEs."""
    from curvature_reference import batch_derivatives, exact_ghg_family
    from utils import measures
    from utils.estimators import measurement_generator
    from utils.noise_decomposition import samples_separable

    torch.manual_seed(0)
    model, (X, Y) = _ValueBranchingNet().double(), tiny_data(N, "mse")
    loss_fn = LOSSES["mse"]
    with pytest.warns(UserWarning, match="cannot run under torch.func.vmap"):
        assert not samples_separable(model, loss_fn, X, Y)
        assert samples_separable(_RowBranchingNet().double(), loss_fn, X, Y)
    options = {"generator": measurement_generator(5, 0), "min_samples": 200, "max_samples": 400}
    noise = measures.gni(model, loss_fn, X, Y, 3, **options)
    batch, _ = measures.gradient_norms(model, loss_fn, X, Y, 3, **options)
    assert not noise.exact and noise.n >= 200 and not batch.exact and batch.n >= 200
    assert abs(noise.value - exact_ghg_family(model, loss_fn, X, Y, 3)["gni"]) < 4 * noise.se
    norms = [(g @ g).item() for g, _ in batch_derivatives(model, loss_fn, X, Y, 3)]
    assert abs(batch.value - sum(norms) / len(norms)) < 4 * batch.se


_REUSE_CHECK = """
import ctypes, resource, sys
sys.path.insert(0, {root!r})
from utils.resources import keep_freed_memory
kept = keep_freed_memory() if {keep} else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 16 << 20
def touched():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    return block
libc.free(touched())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
libc.free(touched())
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (size // 4096))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc only")
def test_freed_memory_is_reused_without_faulting_its_pages_in_again():
    """After keep_freed_memory a freed 16 MiB block is handed out again with its pages still
    mapped (next to no page faults); by default glibc returns it to the system and every page
    faults in anew. Fresh processes without torch: the setting is process-wide."""
    def faults_per_page(keep):
        out = subprocess.run([sys.executable, "-c", _REUSE_CHECK.format(root=ROOT, keep=keep)], capture_output=True,
                             text=True, check=True, timeout=60).stdout.split()
        return out[0] == "True", float(out[1])
    assert faults_per_page(True) == (True, pytest.approx(0, abs=0.05))
    kept, faults = faults_per_page(False)
    assert not kept and faults > 0.5


def test_every_route_on_the_cpu_keeps_freed_memory(monkeypatch):
    """Vectorised or a batch at a time, ours or the plain one, same-batch, Gauss–Newton or
    full-data forms: a route built for a model on the CPU keeps freed memory."""
    calls = []
    monkeypatch.setattr(batch_forms, "keep_freed_memory", lambda: calls.append(1))
    model, loss_fn = tiny_resnet_bn(), LOSSES["mse"]
    X, Y = torch.randn(N, 1, 8, 8, dtype=torch.float64), tiny_data(N, "mse")[1]
    assert batch_route(model, loss_fn, X, Y, batch_size=3) == "vmap-taylor"
    large = torch.randn(N, 1, 32, 32, dtype=torch.float64)
    assert batch_route(model, loss_fn, large, Y, batch_size=N) == "taylor"
    same_batch_route(model, loss_fn, X, Y, 3)
    same_batch_route(model, loss_fn, large, Y, N)
    same_batch_route(model, loss_fn, X, Y, 3, exact=True)
    gauss_newton_route(model, loss_fn, X, Y, 3)
    noise_route(model, loss_fn, X, Y, 3, min_samples=2, max_samples=4, block_size=2)
    assert len(calls) == 5
