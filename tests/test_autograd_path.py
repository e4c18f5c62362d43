"""The autograd path of marginops' custom operators (``marginops/ops.py``).

``margin_cross_entropy`` runs through ``torch.library`` custom operators:
``marginops::target_cosine``, ``marginops::margin_stats`` (the pass over the
classes, outside autograd) and ``marginops::margin_loss`` (plus
``marginops::margin_grads`` for the recompute backward), the first and the
last joined by zero-storage "carrier" tensors through which the dense
gradients travel. These
tests check that this path behaves like any other PyTorch op under autograd:

1. saved tensors go through ``save_for_backward`` only: saved-tensor hooks see
   and can replace them, the autograd nodes hold no tensor attributes, and an
   in-place change of an input after the forward is caught;
2. a retained graph gives the same bits on every backward (the workspace
   strategy hands its forward-made gradients over in place only when the graph
   is not kept);
3. ``gradcheck`` with default settings (which also checks reproducibility and
   undefined upstream gradients);
4. double backward raises a clear RuntimeError;
5. activation checkpointing (non-reentrant) gives the same results;
6. ``torch.compile``: no graph breaks, ``aot_eager`` and ``inductor`` training
   steps match eager, label checks still fire, bad static options;
7. autocast and mixed input dtypes;
8. the ``validate_labels`` modes.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import marginops as mo

from .conftest import assert_close_to_oracle, make_inputs, run

STRATEGIES = ("auto", "recompute")


# -- helpers --------------------------------------------------------------------------------------------


def _leaves(x, W):
    return x.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()


def _graph_nodes(root):
    """Every autograd node reachable from ``root`` through ``next_functions``."""
    seen, stack, order = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        order.append(node)
        stack.extend(fn for fn, _ in node.next_functions)
    return order


def _marginops_nodes(loss):
    return [n for n in _graph_nodes(loss.grad_fn) if "marginops" in n.name()]


def _softmax_node(loss):
    nodes = [n for n in _marginops_nodes(loss) if "margin_loss" in n.name()]
    assert len(nodes) == 1, [n.name() for n in _marginops_nodes(loss)]
    return nodes[0]


def _assert_path(loss, strategy):
    """The call took the strategy the test means to cover (workspace for ``auto`` on small problems)."""
    early = _softmax_node(loss).early
    assert early == (strategy == "auto"), f"strategy={strategy!r} ran with early={early}"


def _tensors_in(value, path="", depth=0):
    """(path, tensor) for every tensor in ``value``, looking inside lists, tuples, dicts and sets."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif depth < 5 and isinstance(value, (list, tuple, set, frozenset)):
        for i, v in enumerate(value):
            yield from _tensors_in(v, f"{path}[{i}]", depth + 1)
    elif depth < 5 and isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors_in(v, f"{path}[{k!r}]", depth + 1)


def _run_mixed(x, W, y, margin, scale, **options):
    """Forward + backward on leaf copies that keep their own dtypes (conftest.run casts W to x's dtype)."""
    xl, Wl = _leaves(x, W)
    loss = mo.margin_cross_entropy(xl, Wl, y, margin, scale, **options)
    loss.sum().backward()
    return loss.detach(), xl.grad, Wl.grad, loss


def _problem(B=6, C=11, D=5, dtype=torch.float64, ignore=1):
    x, W, y = make_inputs(B, C, D, dtype, ignore=ignore)
    return x, W, y


# -- 1. saved tensors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_saved_tensor_hooks_see_everything_and_give_same_bits(strategy):
    x, W, y = _problem(dtype=torch.float32)
    margin, scale = mo.ArcFace(0.5), 16.0

    def forward_backward():
        xl, Wl = _leaves(x, W)
        loss = mo.margin_cross_entropy(xl, Wl, y, margin, scale, strategy=strategy)
        _assert_path(loss, strategy)
        loss.backward()
        return loss.detach(), xl.grad, Wl.grad

    plain = forward_backward()

    storage, packed = {}, []

    def pack(t):
        key = len(storage)
        storage[key] = t.clone()
        packed.append(key)
        return key

    def unpack(key):
        return storage[key]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        hooked = forward_backward()
    assert len(packed) > 0, "the saved-tensor pack hook saw no tensors"
    for name, a, b in zip(("loss", "x.grad", "W.grad"), plain, hooked):
        assert b is not None and a.dtype == b.dtype, name
        assert torch.equal(a, b), f"{name} differs under saved_tensors_hooks: max diff {(a - b).abs().max()}"


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("return_stats", [False, True])
def test_custom_op_nodes_keep_no_tensor_attributes(strategy, return_stats):
    x, W, y = _problem()
    xl, Wl = _leaves(x, W)
    out = mo.margin_cross_entropy(xl, Wl, y, mo.ArcFace(0.5), 16.0, strategy=strategy, return_stats=return_stats)
    loss = out[0] if return_stats else out
    _assert_path(loss, strategy)
    nodes = _marginops_nodes(loss)
    names = sorted(n.name() for n in nodes)
    assert any("target_cosine" in n for n in names) and any("margin_loss" in n for n in names), names
    for node in nodes:
        attrs = vars(node) if hasattr(node, "__dict__") else {}
        held = [f"{node.name()}.{k}{p}" for k, v in attrs.items() for p, _ in _tensors_in(v)]
        assert not held, f"autograd nodes hold tensors outside save_for_backward: {held}"


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("which", ["W", "x"])
def test_inplace_change_after_forward_is_detected(strategy, which):
    x, W, y = _problem()
    xl, Wl = _leaves(x, W)
    loss = mo.margin_cross_entropy(xl, Wl, y, mo.CosFace(0.35), 16.0, strategy=strategy)
    _assert_path(loss, strategy)
    with torch.no_grad():
        (Wl if which == "W" else xl).mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_weight_sized_gradient_per_call(strategy, backend):
    """Forward and backward create one C x D tensor: the backend's dW, into which the target rows are
    added in place and which becomes W.grad (no second dense gradient, no copy of the weight)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from marginops.backends import native

    if backend == "native" and not native.enabled():
        pytest.skip(f"the native kernels are switched off by {native.ENV}")  # a failed build still fails below
    C, D, B = 500, 16, 8
    x, W, y = make_inputs(B, C, D, torch.float32, ignore=1)
    xl, Wl = _leaves(x, W)
    storages = set()

    class WeightSized(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= C * D * 4:
                    storages.add(t.untyped_storage().data_ptr())
            return out

    with WeightSized():
        loss = mo.margin_cross_entropy(xl, Wl, y, mo.ArcFace(0.5), 16.0, backend=backend, strategy=strategy)
        _assert_path(loss, strategy)
        loss.backward()
    assert storages - {Wl.untyped_storage().data_ptr()} == {Wl.grad.untyped_storage().data_ptr()}


# -- 2. retained graphs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_retained_graph_gives_identical_bits(strategy, dtype):
    x, W, y = _problem(B=8, C=40, D=6, dtype=dtype, ignore=2)
    xl, Wl = _leaves(x, W)
    loss = mo.margin_cross_entropy(xl, Wl, y, mo.ArcFace(0.5), 32.0, strategy=strategy)
    _assert_path(loss, strategy)
    minus3 = torch.tensor(-3.0, dtype=loss.dtype)

    first = torch.autograd.grad(loss, (xl, Wl), retain_graph=True)
    second = torch.autograd.grad(loss, (xl, Wl), retain_graph=True)
    for name, a, b in zip(("x.grad", "W.grad"), first, second):
        assert torch.equal(a, b), f"{name}: second backward of a retained graph differs"

    scaled = torch.autograd.grad(loss, (xl, Wl), grad_outputs=minus3, retain_graph=True)
    scaled_again = torch.autograd.grad(loss, (xl, Wl), grad_outputs=minus3, retain_graph=True)
    for name, a, b, g1 in zip(("x.grad", "W.grad"), scaled, scaled_again, first):
        assert torch.equal(a, b), f"{name}: backward with grad_output=-3 not reproducible on a retained graph"
        assert_close_to_oracle(a, -3 * g1.double(), name=f"{name} (grad_output=-3)")
    # the unit-gradient result is unchanged after the scaled passes
    again = torch.autograd.grad(loss, (xl, Wl), retain_graph=True)
    for name, a, b in zip(("x.grad", "W.grad"), first, again):
        assert torch.equal(a, b), f"{name}: changed after a scaled backward on the retained graph"

    last = torch.autograd.grad(loss, (xl, Wl), grad_outputs=minus3)  # frees the graph
    for name, a, b in zip(("x.grad", "W.grad"), scaled, last):
        assert torch.equal(a, b), f"{name}: final (non-retaining) backward differs from the retained ones"
    with pytest.raises(RuntimeError):
        torch.autograd.grad(loss, (xl, Wl))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_backward_twice_accumulates_exactly_double(strategy):
    x, W, y = _problem(B=8, C=40, D=6, dtype=torch.float32, ignore=1)
    xl, Wl = _leaves(x, W)
    loss = mo.margin_cross_entropy(xl, Wl, y, mo.ArcFace(0.5), 32.0, strategy=strategy)
    _assert_path(loss, strategy)
    loss.backward(retain_graph=True)
    once_W, once_x = Wl.grad.clone(), xl.grad.clone()
    loss.backward()
    assert torch.equal(Wl.grad, 2 * once_W), f"W.grad after two backwards: max diff {(Wl.grad - 2 * once_W).abs().max()}"
    assert torch.equal(xl.grad, 2 * once_x), f"x.grad after two backwards: max diff {(xl.grad - 2 * once_x).abs().max()}"

    # and the single-backward gradient is the one a fresh graph gives
    fresh = run(x, W, y, mo.ArcFace(0.5), 32.0, strategy=strategy)
    assert torch.equal(once_W, fresh.W_grad) and torch.equal(once_x, fresh.x_grad)


# -- 3. gradcheck ------------------------------------------------------------------------------------------

GRADCHECK_CASES = {
    "default_mean": dict(margin=mo.CosFace(0.35), scale=8.0),
    "sum": dict(margin=mo.CosFace(0.35), scale=8.0, reduction="sum"),
    "none_smoothing": dict(margin=mo.CosFace(0.35), scale=8.0, reduction="none", label_smoothing=0.1),
    "recompute": dict(margin=mo.CosFace(0.35), scale=8.0, strategy="recompute"),
    "unnormalized": dict(margin=None, scale=1.0, normalize=False),
    "arcface": dict(margin=mo.ArcFace(0.5), scale=8.0),
    "arcface_recompute_smoothing": dict(margin=mo.ArcFace(0.5), scale=8.0, strategy="recompute",
                                        label_smoothing=0.1),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck_default_settings(case):
    opts = dict(GRADCHECK_CASES[case])
    margin, scale = opts.pop("margin"), opts.pop("scale")
    x, W, y = make_inputs(5, 9, 4, torch.float64, ignore=1)
    x.requires_grad_()
    W.requires_grad_()

    def f(x, W):
        return mo.margin_cross_entropy(x, W, y, margin, scale, **opts)

    assert torch.autograd.gradcheck(f, (x, W))


# -- 4. double backward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_double_backward_raises(strategy):
    x, W, y = _problem()
    xl, Wl = _leaves(x, W)
    loss = mo.margin_cross_entropy(xl, Wl, y, mo.ArcFace(0.5), 16.0, strategy=strategy)
    _assert_path(loss, strategy)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, (xl, Wl), create_graph=True)


# -- 5. activation checkpointing ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_activation_checkpointing_matches(strategy):
    from torch.utils.checkpoint import checkpoint

    backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).double()
    head = mo.MarginHead(8, 50, margin=mo.ArcFace(0.5), scale=16.0, dtype=torch.float64, strategy=strategy)
    inp = torch.randn(12, 16, dtype=torch.float64)
    y = torch.randint(0, 50, (12,))
    y[3] = -100
    params = list(backbone.parameters()) + list(head.parameters())

    loss = head(backbone(inp), y)
    _assert_path(loss, strategy)
    loss.backward()
    plain = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    loss_ckpt = checkpoint(lambda i: head(backbone(i), y), inp, use_reentrant=False)
    loss_ckpt.backward()
    assert_close_to_oracle(loss_ckpt, loss, tol=1e-12, name="loss (checkpointed)")
    for i, (p, g) in enumerate(zip(params, plain)):
        assert p.grad is not None, f"parameter {i} got no gradient under checkpointing"
        assert_close_to_oracle(p.grad, g, tol=1e-12, name=f"param[{i}].grad (checkpointed)")


# -- 6. torch.compile ----------------------------------------------------------------------------------------

COMPILE_B, COMPILE_C, COMPILE_D = 24, 300, 16


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile_problem(return_stats: bool = False):
    """A small float32 backbone + ArcFace head, inputs and labels (one ignored row)."""
    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    backbone = nn.Sequential(nn.Linear(COMPILE_D, 32), nn.ReLU(), nn.Linear(32, COMPILE_D))
    head = mo.MarginHead(COMPILE_D, COMPILE_C, margin=mo.ArcFace(0.5), scale=16.0, return_stats=return_stats)
    with torch.no_grad():  # unit-scale class rows so the loss is not flat
        head.weight.normal_(generator=gen)
    inp = torch.randn(COMPILE_B, COMPILE_D, generator=gen)
    y = torch.randint(0, COMPILE_C, (COMPILE_B,), generator=gen)
    y[5] = -100
    return backbone, head, inp, y


def _model_fn(backbone, head, return_stats):
    def model_fn(inp, y):
        out = head(backbone(inp), y)
        if return_stats:
            loss, stats = out
            return loss, stats.prediction
        return out

    return model_fn


def test_compile_no_graph_breaks(fresh_dynamo):
    backbone, head, inp, y = _compile_problem()
    explanation = torch._dynamo.explain(_model_fn(backbone, head, False))(inp, y)
    reasons = [getattr(r, "reason", str(r)).splitlines()[0] for r in explanation.break_reasons]
    assert explanation.graph_break_count == 0, f"graph breaks: {reasons}"


def _train_compiled_vs_eager(compile_backend, return_stats, steps=3, lr=0.5):
    backbone, head, inp, y = _compile_problem(return_stats)
    eager_modules = (copy.deepcopy(backbone), copy.deepcopy(head))
    comp_modules = (copy.deepcopy(backbone), copy.deepcopy(head))
    eager_fn = _model_fn(*eager_modules, return_stats)
    compiled_fn = torch.compile(_model_fn(*comp_modules, return_stats), fullgraph=True, backend=compile_backend)
    eager_params = [p for m in eager_modules for p in m.parameters()]
    comp_params = [p for m in comp_modules for p in m.parameters()]
    names = [n for m in eager_modules for n, _ in m.named_parameters()]
    for step in range(steps):
        out_e, out_c = eager_fn(inp, y), compiled_fn(inp, y)
        loss_e, loss_c = (out_e[0], out_c[0]) if return_stats else (out_e, out_c)
        assert loss_c.dtype == loss_e.dtype == torch.float32
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=0.0, msg=f"step {step}: loss")
        if return_stats:
            assert torch.equal(out_c[1], out_e[1]), f"step {step}: prediction {out_c[1]} != eager {out_e[1]}"
        loss_e.backward()
        loss_c.backward()
        for name, pe, pc in zip(names, eager_params, comp_params):
            assert pc.grad is not None, f"step {step}: compiled {name} got no gradient"
            err = (pc.grad - pe.grad).abs().max().item()
            bound = 1e-5 * pe.grad.abs().max().item() + 1e-12
            assert err <= bound, f"step {step}: {name}.grad differs from eager by {err:.3e} > {bound:.3e}"
        with torch.no_grad():
            for p in eager_params + comp_params:
                p -= lr * p.grad
                p.grad = None


@pytest.mark.parametrize("return_stats", [False, True])
def test_compile_aot_eager_training_matches_eager(fresh_dynamo, return_stats):
    _train_compiled_vs_eager("aot_eager", return_stats)


@pytest.mark.parametrize("return_stats", [False, True])
def test_compile_inductor_training_matches_eager(fresh_dynamo, return_stats):
    _train_compiled_vs_eager("inductor", return_stats)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compile_per_row_scale_and_weight_matches_eager(fresh_dynamo, strategy):
    """Per-row scales (with their gradient) and row weights trace without a graph break; on the dense
    test backend (tests/dense_backend.py) until the fused backends implement Call.row_scale."""
    from torch._dynamo.utils import counters

    from . import dense_backend

    dense_backend.register()
    x, W, y = make_inputs(COMPILE_B, 40, COMPILE_D, torch.float32, ignore=1)
    scale = torch.linspace(8.0, 24.0, COMPILE_B)
    weight = torch.linspace(0.0, 2.0, COMPILE_B)

    def step(x_, W_, s_):
        return mo.margin_cross_entropy(x_, W_, y, mo.ArcFace(0.5), s_, row_weight=weight, backend="dense",
                                       label_smoothing=0.1, strategy=strategy)

    counters.clear()
    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() for t in (x, W, scale)]
        loss = fn(*leaves)
        _assert_path(loss, strategy) if fn is step else None
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    for name, a, b in zip(("loss", "x.grad", "W.grad", "scale.grad"), *results):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def test_compiled_bad_label_raises_value_error(fresh_dynamo):
    backbone, head, inp, y = _compile_problem()
    bad = y.clone()
    bad[7] = COMPILE_C + 5
    compiled = torch.compile(_model_fn(backbone, head, False), fullgraph=True, backend="aot_eager")
    compiled(inp, y)  # traced with good labels
    with pytest.raises(ValueError, match=r"labels\[\d+\] = "):
        compiled(inp, bad)
    torch._dynamo.reset()
    compiled = torch.compile(_model_fn(backbone, head, False), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"labels\[7\] = 305 "):  # first traced with the bad label
        compiled(inp, bad)


def _compiled_loss(fullgraph, **options):
    def f(x, W, y):
        return mo.margin_cross_entropy(x, W, y, mo.ArcFace(0.5), **{"scale": 16.0, **options})

    return torch.compile(f, fullgraph=fullgraph, backend="aot_eager")


def _compile_inputs():
    x, W, y = make_inputs(COMPILE_B, COMPILE_C, COMPILE_D, torch.float32, ignore=1)
    return x.requires_grad_(), W.requires_grad_(), y


def test_compiled_bad_scale_raises_value_error_without_fullgraph(fresh_dynamo):
    x, W, y = _compile_inputs()
    with pytest.raises(ValueError, match="scale"):
        mo.margin_cross_entropy(x, W, y, scale=-1.0)
    with pytest.raises(ValueError, match="scale"):
        _compiled_loss(False, scale=-1.0)(x, W, y)


@pytest.mark.parametrize("options, pattern", [
    (dict(scale=-1.0), "scale"),
    (dict(strategy="workspace", memory_budget=100, reduction="mean"), "memory_budget"),
], ids=["scale", "workspace-budget"])
def test_compiled_bad_static_options_raise_the_named_value_error(fresh_dynamo, options, pattern):
    """Without fullgraph the ValueError itself comes out (Dynamo breaks the graph, eager raises it);
    with fullgraph=True Dynamo raises an error of its own ("Observed exception") that quotes it."""
    x, W, y = _compile_inputs()
    with pytest.raises(ValueError, match=pattern):
        _compiled_loss(False, **options)(x, W, y)
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        _compiled_loss(True, **options)(x, W, y)
    quoted = re.search(r"ValueError\([^\n]*" + pattern, str(info.value))
    assert quoted, str(info.value)[:1000]


# -- 7. autocast and mixed dtypes ----------------------------------------------------------------------------


def test_autocast_bf16_backbone_fp32_head():
    backbone = nn.Linear(16, 8)
    head = mo.MarginHead(8, 60, margin=mo.ArcFace(0.5), scale=16.0)
    with torch.no_grad():
        head.weight.normal_()
    weight_before = head.weight.detach().clone()
    inp = torch.randn(10, 16, requires_grad=True)
    y = torch.randint(0, 60, (10,))
    y[2] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = backbone(inp)
        assert emb.dtype == torch.bfloat16
        loss = head(emb, y)
    assert loss.dtype == torch.float32
    assert head.weight.dtype == torch.float32
    assert torch.equal(head.weight.detach(), weight_before), "the forward changed head.weight"
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.dtype == torch.float32
    assert inp.grad is not None and inp.grad.dtype == torch.float32
    assert backbone.weight.grad is not None
    ref = mo.margin_cross_entropy(emb.float().detach(), head.weight.detach(), y, mo.ArcFace(0.5), 16.0,
                                  backend="reference")
    assert_close_to_oracle(loss, ref, tol=1e-5, name="loss under autocast")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_half_embeddings_fp32_weight(strategy, x_dtype):
    x, W, y = make_inputs(12, 70, 10, torch.float32, ignore=2)
    x = x.to(x_dtype)
    margin, scale = mo.ArcFace(0.5), 16.0
    loss, x_grad, W_grad, graph = _run_mixed(x, W, y, margin, scale, strategy=strategy)
    _assert_path(graph, strategy)
    assert loss.dtype == torch.float32
    assert x_grad.dtype == x_dtype and W_grad.dtype == torch.float32
    # oracle: the same (already rounded) inputs, upcast to float64
    ref = run(x.double(), W.double(), y, margin, scale, backend="reference")
    assert_close_to_oracle(loss, ref.loss, tol=3e-5, name="loss")
    assert_close_to_oracle(W_grad, ref.W_grad, tol=3e-5, name="W.grad")
    assert_close_to_oracle(x_grad, ref.x_grad, tol=1e-2, name="x.grad")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fp16_embeddings_fp64_weight(strategy):
    x, W, y = make_inputs(7, 30, 6, torch.float64, ignore=1)
    x = x.half()
    loss, x_grad, W_grad, graph = _run_mixed(x, W, y, mo.CosFace(0.35), 16.0, strategy=strategy, backend="torch")
    _assert_path(graph, strategy)
    assert loss.dtype == torch.float64
    assert x_grad.dtype == torch.float16 and W_grad.dtype == torch.float64
    ref = run(x.double(), W, y, mo.CosFace(0.35), 16.0, backend="reference")
    assert_close_to_oracle(loss, ref.loss, tol=1e-10, name="loss")
    assert_close_to_oracle(W_grad, ref.W_grad, tol=1e-10, name="W.grad")
    assert_close_to_oracle(x_grad, ref.x_grad, name="x.grad")


def test_integer_or_complex_inputs_raise_type_error():
    x, W, y = make_inputs(4, 5, 3, torch.float32)
    for bad_x in (x.to(torch.int64), x.to(torch.int32)):
        with pytest.raises(TypeError, match="embeddings"):
            mo.margin_cross_entropy(bad_x, W, y)
    with pytest.raises(TypeError, match="weight"):
        mo.margin_cross_entropy(x, W.to(torch.complex64), y)
    with pytest.raises(TypeError, match="embeddings"):
        mo.margin_cross_entropy(x.to(torch.complex64), W, y)


# -- 8. label checks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("bad_value", [-1, 11, 10_000])
def test_validate_labels_modes_on_cpu(strategy, bad_value):
    x, W, y = _problem(B=6, C=11, D=5, ignore=1)
    bad = y.clone()
    bad[4 if y[4] != -100 else 5] = bad_value
    xl, Wl = _leaves(x, W)
    with pytest.raises(RuntimeError):
        mo.margin_cross_entropy(xl, Wl, bad, validate_labels="device", strategy=strategy)
    with pytest.raises(ValueError, match=rf"labels\[\d\] = {bad_value} is outside \[0, 11\)"):
        mo.margin_cross_entropy(xl, Wl, bad, validate_labels="host", strategy=strategy)
    with pytest.raises(ValueError, match=rf"labels\[\d\] = {bad_value} is outside"):
        mo.margin_cross_entropy(xl, Wl, bad, strategy=strategy)  # True: the host check on CPU


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mode", [False, "device", "host", True])
def test_valid_labels_with_ignored_rows_pass_every_mode(strategy, mode):
    x, W, y = _problem(B=9, C=13, D=4, ignore=3)
    ours = run(x, W, y, mo.CosFace(0.35), 16.0, strategy=strategy, validate_labels=mode)
    ref = run(x, W, y, mo.CosFace(0.35), 16.0, backend="reference")
    for name, a, b in (("loss", ours.loss, ref.loss), ("x.grad", ours.x_grad, ref.x_grad),
                       ("W.grad", ours.W_grad, ref.W_grad)):
        assert_close_to_oracle(a, b, tol=1e-10, name=name)
    ignored = y == -100
    assert bool(ignored.any())
    assert torch.equal(ours.x_grad[ignored], torch.zeros_like(ours.x_grad[ignored]))
