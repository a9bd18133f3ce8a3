r"""The GGN of one mini-batch at the current point: products for second-order optimizers.

:class:`LocalGGN` runs the model's forward once (:func:`curvlab.func.linearize`) and then serves
everything a GGN-based optimizer needs at that point, without running the forward again:

* ``output`` (detached), ``loss`` (:math:`L`), ``grad_output`` (:math:`\nabla_{\hat y} L`);
* ``jvp(v)`` = :math:`J v` (parameter-form list in, output-shaped tensor out) and
  ``vjp(r)`` = :math:`J^\top r` (output-shaped in, list out);
* ``output_hvp(u)`` = :math:`H_L u` in output space;
* ``mv(v)`` = :math:`G v = J^\top H_L J v` (list in, list out) -- one ``jvp`` and one ``vjp``;
* ``quadratic(u, w)`` = :math:`u^\top H_L w` for already computed output tangents ``u = J a``,
  ``w = J b`` (so :math:`a^\top G b`), and ``gradient_dot(u)`` = :math:`\nabla_{\hat y}L^\top u`,
  both reduced in float64 -- the entries of CurveBall's and adaptive K-FAC's small quadratic
  models;
* ``gradient()`` = :math:`J^\top \nabla_{\hat y} L` (list);
* ``jacobian()`` (``(M, P)`` explicit Jacobian rows) and ``to_dense()`` (the ``P x P`` GGN) for
  the dense natural gradient on small models.

It is a :class:`~curvlab.operators.base.LinearOperator` over the flat parameter vector
(symmetric), so ``G @ v`` (flat, ``(P, K)`` columns, list or dict), :func:`curvlab.linalg.cg`,
``G.to_scipy()`` and the operator algebra (``G + lam * IdentityOperator.like(G)``) all work.

Conventions. :math:`L` is ``loss_fn(model(inputs), targets)`` with the loss's own reduction
(``'mean'`` or ``'sum'``), :math:`J = \partial\,\mathrm{output} / \partial\theta` for the
selected parameters :math:`\theta` (curvlab flat order: selected parameters in order, each
row-major), :math:`H_L = \partial^2 L / \partial\,\mathrm{output}^2` from the loss rule
(:mod:`curvlab.func.losses`, closed form for cross-entropy, MSE and BCE-with-logits). The GGN
is :math:`G = J^\top H_L J`; BatchNorm in training mode couples the examples of the batch and
is differentiated exactly (batch statistics).

Float operations. Every product is the same sequence of ``Linearization`` calls as the
optimizers' own code used (one column at a time for ``G @ M``, explicit Jacobian rows by
batched backward for ``to_dense``), so switching an optimizer to :class:`LocalGGN` keeps its
trajectory bit-identical. Nothing is cast: results are in the working precision (the
parameters' dtype; the output's dtype under autocast), except the float64 reductions of
:meth:`LocalGGN.quadratic` and :meth:`LocalGGN.gradient_dot`.

Side effects: none on parameters or ``.grad`` (products differentiate detached copies). The
constructor's forward updates buffers (BatchNorm running statistics) only with
``update_buffers=True``, exactly as ``model(inputs)`` would. In training mode with dropout
the forward's masks are fixed for all products of one :class:`LocalGGN`.

Cost counting: :attr:`LocalGGN.counts` counts the primitive passes in the vocabulary of the
optimizers' counters: ``forward`` (1 for the constructor, 0 for
:meth:`~LocalGGN.from_linearization`), ``jvp`` (tangent passes, a batched pass counts once),
``backward`` (backward passes, a batched backward counts once) and ``ggn_products`` (columns
of ``mv``/``G @ M``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.func import Linearization, linearize
from curvlab.func.losses import LossRule, loss_rule
from curvlab.func.params import ParamsArg, flatten, select_params
from curvlab.operators.base import LinearOperator
from curvlab.operators.flat import unflatten

__all__ = ["LocalGGN"]

Tangents = Sequence[Tensor] | Mapping[str, Tensor]

#: Default number of Jacobian rows (or columns) per batched pass in ``jacobian``/``to_dense``.
DEFAULT_JACOBIAN_CHUNK = 256


def _as_rule(loss_fn_or_rule: Any) -> LossRule:
    if isinstance(loss_fn_or_rule, LossRule):
        return loss_fn_or_rule
    if not callable(loss_fn_or_rule):
        raise TypeError(
            "LocalGGN: loss_fn_or_rule must be a loss callable (e.g. nn.CrossEntropyLoss()) or a "
            f"curvlab.func.losses.LossRule, got {type(loss_fn_or_rule).__name__}"
        )
    return loss_rule(loss_fn_or_rule)


def _check_chunk(chunk_size: int | None) -> int:
    if chunk_size is None:
        return DEFAULT_JACOBIAN_CHUNK
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"LocalGGN: chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


class LocalGGN(LinearOperator):
    r"""GGN :math:`J^\top H_L J` of one batch at the current parameters (see the module docstring).

    Args:
        model: The network (single-tensor output). Never modified, except its buffers by the
            one forward when ``update_buffers=True``.
        loss_fn_or_rule: ``loss_fn(output, targets) -> scalar`` (``'mean'``/``'sum'``
            reduction) or a :class:`curvlab.func.losses.LossRule`.
        params: The parameters :math:`\theta`: ``None`` (all trainable), a list of the model's
            parameters or names, or a ``{name: parameter}`` dict
            (:func:`curvlab.func.params.select_params`).
        inputs: The model's single positional input.
        targets: Targets for the loss (checked against the output by the rule).
        update_buffers: Let the forward update buffers as ``model(inputs)`` would (an
            optimizer's step forward); ``False`` leaves every buffer untouched.
        engine: ``"auto"``, ``"layerwise"`` or ``"functional"`` (:func:`curvlab.func.linearize`).

    Raises:
        TypeError: on a ``loss_fn_or_rule`` that is neither callable nor a rule, or a
            non-tensor model output.
        ValueError: on targets that do not fit the output, parameters of different dtypes or
            devices, or an unknown ``engine``.

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
        >>> G = LocalGGN(net, torch.nn.CrossEntropyLoss(), None, x, y)
        >>> G.shape, G.symmetric
        ((26, 26), True)
        >>> v = [torch.randn_like(p) for p in net.parameters()]
        >>> Gv = G.mv(v)                                   # list, shaped like the parameters
        >>> u = G.jvp(v)                                   # J v, shaped like the output
        >>> q = G.quadratic(u, u)                          # v^T G v in float64
        >>> bool(torch.isclose(q, sum((a * b).sum() for a, b in zip(v, Gv)).double()))
        True
        >>> bool(torch.allclose(G.to_dense() @ G.flatten(v), G @ G.flatten(v), atol=1e-6))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn_or_rule: Callable[[Tensor, Tensor], Tensor] | LossRule,
        params: ParamsArg,
        inputs: Any,
        targets: Any,
        *,
        update_buffers: bool = False,
        engine: str = "auto",
    ) -> None:
        rule = _as_rule(loss_fn_or_rule)
        selected = select_params(model, params)
        lin = linearize(model, selected, inputs, update_buffers=update_buffers, engine=engine)
        self._setup(lin, rule, targets, forwards=1)

    @classmethod
    def from_linearization(
        cls,
        lin: Linearization,
        rule: Callable[[Tensor, Tensor], Tensor] | LossRule,
        targets: Any,
    ) -> LocalGGN:
        """Build on an existing :class:`curvlab.func.Linearization` (no forward is run).

        Args:
            lin: The linearization (its ``output`` keeps the autograd graph).
            rule: Loss callable or :class:`~curvlab.func.losses.LossRule`.
            targets: Targets for the loss.

        Returns:
            The operator; ``counts["forward"]`` is 0.

        Raises:
            TypeError: if ``lin`` is not a ``Linearization`` or ``rule`` not a loss/rule.
            ValueError: if the targets do not fit the output.

        Example:
            >>> from curvlab.func import linearize
            >>> net = torch.nn.Linear(2, 1)
            >>> lin = linearize(net, dict(net.named_parameters()), torch.ones(4, 2))
            >>> G = LocalGGN.from_linearization(lin, torch.nn.MSELoss(), torch.zeros(4, 1))
            >>> G.to_dense()   # mean MSE: (2/N) sum_n x_n x_n^T with x_n = (1, 1, 1)
            tensor([[2., 2., 2.],
                    [2., 2., 2.],
                    [2., 2., 2.]])
        """
        if not isinstance(lin, Linearization):
            raise TypeError(
                "LocalGGN.from_linearization: lin must be a curvlab.func.Linearization, got "
                f"{type(lin).__name__}"
            )
        op = cls.__new__(cls)
        op._setup(lin, _as_rule(rule), targets, forwards=0)
        return op

    def _setup(self, lin: Linearization, rule: LossRule, targets: Any, forwards: int) -> None:
        # The linearization's differentiation leaves are detached copies of the parameters
        # (same shapes, dtypes and devices); Linearization has no public accessor for them yet.
        leaves: list[Tensor] = list(lin._leaves)
        if not leaves:
            raise ValueError("LocalGGN: the linearization has no parameters")
        for name, leaf in zip(lin.names, leaves, strict=True):
            if leaf.dtype != leaves[0].dtype or leaf.device != leaves[0].device:
                raise ValueError(
                    f"LocalGGN: parameter {name!r} has dtype {leaf.dtype} on {leaf.device}, but "
                    f"{lin.names[0]!r} has dtype {leaves[0].dtype} on {leaves[0].device}; one "
                    "flat parameter vector needs a common dtype and device"
                )
        shapes = [leaf.shape for leaf in leaves]
        super().__init__(
            (sum(leaf.numel() for leaf in leaves),) * 2,
            leaves[0].dtype,
            leaves[0].device,
            param_shapes=shapes,
            param_names=list(lin.names),
            symmetric=True,
        )
        self._lin = lin
        self._rule = rule
        self._targets = targets
        self._out = lin.output.detach()
        rule.check(self._out, targets)
        self._loss: Tensor | None = None
        self._grad_out: Tensor | None = None
        self.counts = {"forward": forwards, "backward": 0, "jvp": 0, "ggn_products": 0}

    # ------------------------------------------------------------------ point values

    @property
    def linearization(self) -> Linearization:
        """The underlying :class:`curvlab.func.Linearization`."""
        return self._lin

    @property
    def rule(self) -> LossRule:
        """The loss rule giving :math:`L`, :math:`\\nabla L` and :math:`H_L` in output space."""
        return self._rule

    @property
    def targets(self) -> Any:
        """The targets the loss is evaluated at."""
        return self._targets

    @property
    def output(self) -> Tensor:
        """The model output at the current point, detached."""
        return self._out

    @property
    def loss(self) -> Tensor:
        """The batch loss :math:`L` (0-d, detached; computed once)."""
        if self._loss is None:
            self._loss = self._rule.value(self._out, self._targets).detach()
        return self._loss

    @property
    def grad_output(self) -> Tensor:
        r""":math:`\partial L / \partial\,\mathrm{output}`, output-shaped (computed once)."""
        if self._grad_out is None:
            self._grad_out = self._rule.grad(self._out, self._targets)
        return self._grad_out

    # ------------------------------------------------------------------ primitives

    def jvp(self, v: Tangents) -> Tensor:
        """:math:`J v` for a parameter-form list (or ``{name: tensor}`` dict), output-shaped.

        Example:
            >>> net = torch.nn.Linear(2, 1)
            >>> G = LocalGGN(net, torch.nn.MSELoss(), None, torch.ones(3, 2), torch.zeros(3, 1))
            >>> G.jvp([torch.ones(1, 2), torch.zeros(1)])
            tensor([[2.],
                    [2.],
                    [2.]])
        """
        self.counts["jvp"] += 1
        return self._lin.jvp(v)

    def vjp(self, r: Tensor, retain_graph: bool = True) -> list[Tensor]:
        r""":math:`J^\top r` for an output-shaped ``r``, as a list in parameter order.

        ``retain_graph=False`` frees the forward's graph: no product can follow.

        Example:
            >>> net = torch.nn.Linear(2, 1)
            >>> G = LocalGGN(net, torch.nn.MSELoss(), None, torch.ones(3, 2), torch.zeros(3, 1))
            >>> [g.tolist() for g in G.vjp(torch.ones(3, 1))]
            [[[3.0, 3.0]], [3.0]]
        """
        self.counts["backward"] += 1
        return self._lin.vjp(r, retain_graph=retain_graph)

    def output_hvp(self, u: Tensor) -> Tensor:
        r""":math:`H_L u` for an output-shaped tangent ``u`` (no model pass).

        Example:
            >>> net = torch.nn.Linear(2, 1)
            >>> G = LocalGGN(net, torch.nn.MSELoss(reduction="sum"), None, torch.ones(3, 2),
            ...              torch.zeros(3, 1))
            >>> G.output_hvp(torch.ones(3, 1)).flatten().tolist()   # H_L = 2 I for summed MSE
            [2.0, 2.0, 2.0]
        """
        return self._rule.hessian_vp(self._out, self._targets, u)

    def mv(self, v: Tangents) -> list[Tensor]:
        r""":math:`G v = J^\top H_L J v` for a parameter-form ``v``; a list in parameter order.

        One tangent pass and one backward: ``vjp(output_hvp(jvp(v)))``.

        Example:
            >>> net = torch.nn.Linear(1, 1, bias=False)
            >>> G = LocalGGN(net, torch.nn.MSELoss(), None, torch.full((2, 1), 3.0),
            ...              torch.zeros(2, 1))
            >>> G.mv([torch.ones(1, 1)])     # (2/N) sum_n x_n^2 = 18
            [tensor([[18.]])]
        """
        u = self.jvp(v)
        self.counts["ggn_products"] += 1
        return self.vjp(self.output_hvp(u))

    def quadratic(self, u_out: Tensor, w_out: Tensor) -> Tensor:
        r""":math:`u^\top H_L w` for output tangents ``u = J a``, ``w = J b``: :math:`a^\top G b`.

        Computed as ``torch.sum(u_out * output_hvp(w_out), dtype=torch.float64)`` (a 0-d float64
        tensor); no model pass, so already computed tangents are reused.

        Example:
            >>> net = torch.nn.Linear(2, 1)
            >>> G = LocalGGN(net, torch.nn.MSELoss(), None, torch.ones(3, 2), torch.zeros(3, 1))
            >>> u = G.jvp([torch.ones(1, 2), torch.zeros(1)])
            >>> G.quadratic(u, u)    # (2/3) * 3 * 2^2
            tensor(8., dtype=torch.float64)
        """
        return torch.sum(u_out * self.output_hvp(w_out), dtype=torch.float64)

    def gradient_dot(self, u_out: Tensor) -> Tensor:
        r""":math:`\nabla_{\hat y} L^\top u` for an output tangent ``u = J a`` (= :math:`g^\top a`).

        ``torch.sum(grad_output * u_out, dtype=torch.float64)`` (0-d float64).

        Example:
            >>> net = torch.nn.Linear(2, 1, bias=False)
            >>> _ = torch.nn.init.zeros_(net.weight)
            >>> G = LocalGGN(net, torch.nn.MSELoss(), None, torch.ones(2, 2), torch.ones(2, 1))
            >>> G.gradient_dot(torch.ones(2, 1))   # dL/dy = (y - t) = -1 per example
            tensor(-2., dtype=torch.float64)
        """
        return torch.sum(self.grad_output * u_out, dtype=torch.float64)

    def gradient(self, retain_graph: bool = True) -> list[Tensor]:
        r"""The loss gradient :math:`J^\top \nabla_{\hat y} L`, a list in parameter order.

        Example:
            >>> net = torch.nn.Linear(2, 1)
            >>> G = LocalGGN(net, torch.nn.MSELoss(), None, torch.ones(3, 2), torch.zeros(3, 1))
            >>> loss = torch.nn.MSELoss()(net(torch.ones(3, 2)), torch.zeros(3, 1))
            >>> ref = torch.autograd.grad(loss, list(net.parameters()))
            >>> all(torch.allclose(a, b) for a, b in zip(G.gradient(), ref))
            True
        """
        return self.vjp(self.grad_output, retain_graph=retain_graph)

    # ------------------------------------------------------------------ dense

    def jacobian(self, chunk_size: int | None = None, *, method: str = "vjp") -> Tensor:
        """Explicit Jacobian ``(M, P)``: row ``i`` is the gradient of output entry ``i``.

        Output entries are in row-major order, parameters in flat order.

        Args:
            chunk_size: Rows (``"vjp"``) or columns (``"jvp"``) per batched pass (default 256).
            method: ``"vjp"``: batched backward over unit output cotangents (``M / chunk``
                backward passes, exact for any model); ``"jvp"``: ``vmap``-ed tangent passes
                over unit parameter tangents (``P / chunk`` passes; cheaper when ``P < M``).

        Returns:
            The Jacobian in the working precision.

        Raises:
            ValueError: on a bad ``chunk_size`` or ``method``.

        Example:
            >>> net = torch.nn.Linear(2, 1)
            >>> G = LocalGGN(net, torch.nn.MSELoss(), None, torch.ones(3, 2), torch.zeros(3, 1))
            >>> G.jacobian()
            tensor([[1., 1., 1.],
                    [1., 1., 1.],
                    [1., 1., 1.]])
        """
        chunk = _check_chunk(chunk_size)
        out = self._out
        m = out.numel()
        if method == "vjp":
            rows = []
            for start in range(0, m, chunk):
                stop = min(start + chunk, m)
                cot = torch.zeros(stop - start, m, dtype=out.dtype, device=out.device)
                cot[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
                grads = self._lin.vjp_batched(cot.reshape(stop - start, *out.shape))
                self.counts["backward"] += 1
                rows.append(torch.cat([g.reshape(stop - start, -1) for g in grads], dim=1))
            return torch.cat(rows)
        if method == "jvp":
            p = self._shape[0]
            cols = []
            for start in range(0, p, chunk):
                stop = min(start + chunk, p)
                tangents = [t.movedim(-1, 0) for t in unflatten(self._unit_columns(start, stop),
                                                                self._param_shapes)]
                jv = self._lin.jvp_batched(tangents)  # (k, *out.shape)
                self.counts["jvp"] += 1
                cols.append(jv.reshape(stop - start, m).T)
            return torch.cat(cols, dim=1)
        raise ValueError(f"LocalGGN.jacobian: method must be 'vjp' or 'jvp', got {method!r}")

    def to_dense(self, chunk_size: int | None = None, *, method: str = "vjp") -> Tensor:
        r"""The ``(P, P)`` GGN :math:`J^\top (H_L J)` from the explicit Jacobian (small models).

        :math:`H_L` is applied to every column of :math:`J` (``vmap`` of the rule's product),
        then one matrix product. Exact for BatchNorm in training mode. In the working
        precision (float64 for float64 parameters); cast the result for a float64 solve.

        Args:
            chunk_size: As in :meth:`jacobian` (Jacobian rows per batched backward).
            method: As in :meth:`jacobian`.

        Returns:
            The dense GGN, symmetric up to rounding.

        Raises:
            ValueError: on a bad ``chunk_size`` or ``method``.

        Example:
            >>> net = torch.nn.Linear(2, 1, bias=False)
            >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
            >>> LocalGGN(net, torch.nn.MSELoss(), None, x, torch.zeros(2, 1)).to_dense()
            tensor([[1., 0.],
                    [0., 4.]])
        """
        jac = self.jacobian(chunk_size, method=method)  # (M, P)
        out, targets, rule = self._out, self._targets, self._rule
        m = out.numel()
        cols = jac.T.reshape(-1, *out.shape)
        hj = torch.func.vmap(lambda v: rule.hessian_vp(out, targets, v))(cols)
        return jac.T @ hj.reshape(-1, m).T

    # ------------------------------------------------------------------ LinearOperator hook

    def _matmat(self, M: Tensor) -> Tensor:
        cols = []
        for k in range(M.shape[1]):
            cols.append(flatten(self.mv(unflatten(M[:, k], self._param_shapes))))
        return torch.stack(cols, dim=1)

    def _repr_extra(self) -> str:
        return f"engine={self._lin.engine!r}, rule={self._rule!r}, output={tuple(self._out.shape)}"
