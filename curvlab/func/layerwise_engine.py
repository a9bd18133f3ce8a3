"""Layer-wise linearization engine: a ``torch.fx`` trace replayed with per-node tangent rules.

The primal pass runs every node once, recording for modules with a rule
(:mod:`curvlab.func.tangent_rules`) what their tangent step needs; each :meth:`jvp` then walks
the recorded tape. Modules without a rule and untabulated functions are differentiated by
``torch.func.jvp`` on that node alone (:mod:`curvlab.func.function_rules`).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from curvlab.func.function_rules import (
    all_none,
    float_output_jvp,
    function_tangent,
    has_float_tensor,
)
from curvlab.func.linearization import Linearization
from curvlab.func.params import cloned_buffers
from curvlab.func.rng import replay_rng, rng_state, tensor_leaves
from curvlab.func.tangent_rules import MODULE_RULES, Tangent, module_rule

__all__ = ["LayerwiseLinearization", "trace"]


_TRACE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Tracer(fx.Tracer):
    """Keeps modules with a tangent rule as leaves of the graph."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in MODULE_RULES:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule | None:
    """``torch.fx`` graph of ``model`` (cached per model and train/eval mode), ``None`` if it
    cannot be traced (warned once per model)."""
    key = model.training
    cached = _TRACE_CACHE.get(model)
    if cached is not None and key in cached:
        return cached[key]
    try:
        graph = _Tracer().trace(model)
        gm: fx.GraphModule | None = fx.GraphModule(model, graph)
    except Exception as err:  # any tracing failure -> functional engine, said once per model
        gm = None
        warnings.warn(
            f"curvlab.linearize: torch.fx cannot trace {type(model).__name__} "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); "
            "using the functional engine (one extra forward per Jacobian product). Pass "
            "engine='functional' to choose it explicitly and silence this warning.",
            stacklevel=3,
        )
    _TRACE_CACHE.setdefault(model, {})[key] = gm
    return gm


@dataclass
class _TapeEntry:
    node: fx.Node
    kind: str  # "module", "generic_module", "function"
    target: Any
    ctx: Any = None
    param_keys: dict[str, str | None] = field(default_factory=dict)  # local -> selected name


class LayerwiseLinearization(Linearization):
    """Layer-wise engine: the traced graph replayed node by node with tangent rules."""

    engine = "layerwise"

    def __init__(
        self,
        gm: fx.GraphModule,
        params: dict[str, Tensor],
        inputs: Any,
        update_buffers: bool,
    ) -> None:
        names = list(params)
        leaves = [p.detach().requires_grad_(True) for p in params.values()]
        super().__init__(names, leaves)
        self._gm = gm
        self._update = update_buffers
        id_to_name = {id(p): n for n, p in params.items()}
        self._alias = {id(p): leaf for p, leaf in zip(params.values(), leaves, strict=True)}
        self._id_to_name = id_to_name
        self._tape: list[_TapeEntry] = []
        self._getattr_tangent: dict[fx.Node, str] = {}
        self._output_node: fx.Node | None = None
        with torch.enable_grad():
            self.output = self._forward(inputs)

    # primal pass ---------------------------------------------------------------------------
    def _module_params(self, mod: nn.Module, recurse: bool) -> tuple[dict, dict]:
        values, keys = {}, {}
        for local, p in mod.named_parameters(recurse=recurse):
            alias = self._alias.get(id(p))
            values[local] = p if alias is None else alias
            keys[local] = self._id_to_name.get(id(p))
        return values, keys

    def _forward(self, inputs: Any) -> Tensor:
        env: dict[fx.Node, Any] = {}
        placeholders = 0

        def load(a):
            return fx.node.map_arg(a, lambda n: env[n])

        for node in self._gm.graph.nodes:
            if node.op == "placeholder":
                if placeholders == 0:
                    env[node] = inputs
                elif node.args:
                    env[node] = node.args[0]
                else:
                    raise ValueError(
                        f"model.forward takes more than one required input ({node.target!r}); "
                        "curvlab passes a single `inputs` object (use a tuple/dict input)"
                    )
                placeholders += 1
            elif node.op == "get_attr":
                obj = self._gm
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                if isinstance(obj, Tensor) and id(obj) in self._alias:
                    self._getattr_tangent[node] = self._id_to_name[id(obj)]
                    obj = self._alias[id(obj)]
                env[node] = obj
            elif node.op == "call_module":
                mod = self._gm.get_submodule(node.target)
                args, kwargs = load(node.args), load(node.kwargs)
                rule = module_rule(mod)
                if rule is not None and len(args) == 1 and not kwargs:
                    values, keys = self._module_params(mod, recurse=False)
                    out, ctx = rule.primal(mod, args[0], values, self._update)
                    self._tape.append(_TapeEntry(node, "module", (mod, rule), ctx, keys))
                else:
                    out, ctx, keys = self._generic_module_primal(mod, args, kwargs)
                    self._tape.append(_TapeEntry(node, "generic_module", mod, ctx, keys))
                env[node] = out
            elif node.op in ("call_function", "call_method"):
                args, kwargs = load(node.args), load(node.kwargs)
                if node.op == "call_method":
                    fn = getattr(type(args[0]), node.target, None)
                    if fn is None:
                        fn = getattr(args[0], node.target).__func__
                else:
                    fn = node.target
                out = fn(*args, **kwargs)
                ctx = (args, kwargs, out) if has_float_tensor(out) else None
                self._tape.append(_TapeEntry(node, "function", fn, ctx))
                env[node] = out
            elif node.op == "output":
                out = env[node.args[0]] if isinstance(node.args[0], fx.Node) else None
                if not isinstance(out, Tensor):
                    raise TypeError(
                        "linearize: the model must return a single tensor, got "
                        f"{type(load(node.args[0])).__name__}"
                    )
                self._output_node = node.args[0]
                return out
        raise RuntimeError("traced graph has no output node")  # pragma: no cover

    def _generic_module_primal(self, mod, args, kwargs):
        values, keys = self._module_params(mod, recurse=True)
        buffers = dict(mod.named_buffers()) if self._update else cloned_buffers(mod)
        out = torch.func.functional_call(mod, (values, buffers), tuple(args), dict(kwargs))
        ctx = (
            {k: v.detach() for k, v in values.items()},
            [a.detach() if isinstance(a, Tensor) else a for a in args],
            kwargs,
            rng_state(tensor_leaves(args)),
        )
        return out, ctx, keys

    # tangent pass --------------------------------------------------------------------------
    def _jvp(self, tangents: dict[str, Tensor]) -> Tensor | None:
        tenv: dict[fx.Node, Tangent] = {}
        for node, name in self._getattr_tangent.items():
            tenv[node] = tangents.get(name)

        def tload(a):
            # tangents of graph values; constants (numbers, flags) carry no tangent
            return fx.node.map_aggregate(
                a, lambda n: tenv.get(n) if isinstance(n, fx.Node) else None
            )

        for entry in self._tape:
            node = entry.node
            if entry.kind == "module":
                mod, rule = entry.target
                tx = tenv.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
                tp = {k: (tangents.get(n) if n else None) for k, n in entry.param_keys.items()}
                if tx is None and all(t is None for t in tp.values()):
                    continue
                tenv[node] = rule.tangent(mod, entry.ctx, tx, tp)
            elif entry.kind == "generic_module":
                tenv[node] = self._generic_module_tangent(entry, tload(node.args), tangents)
            else:
                if entry.ctx is None:
                    continue
                targs = tload(node.args)
                tkwargs = tload(node.kwargs)
                if all_none(targs) and all_none(tkwargs):
                    continue
                tenv[node] = function_tangent(entry.target, node, entry.ctx, targs, tkwargs)
        return tenv.get(self._output_node)

    def _generic_module_tangent(self, entry, targs, tangents):
        mod = entry.target
        values, args, kwargs, rng = entry.ctx
        tvals = {
            k: tangents.get(n) for k, n in entry.param_keys.items() if n and n in tangents
        }
        if not tvals and all_none(targs):
            return None
        # integer/boolean tensors (token ids, masks) are constants without tangents
        tensor_pos = [
            i for i, a in enumerate(args) if isinstance(a, Tensor) and a.is_floating_point()
        ]
        buffers = cloned_buffers(mod)

        def f(pvals, *targ_values):
            full = list(args)
            for i, v in zip(tensor_pos, targ_values, strict=True):
                full[i] = v
            return torch.func.functional_call(mod, ({**values, **pvals}, buffers), tuple(full),
                                              dict(kwargs))

        primal_p = {k: values[k] for k in tvals}
        primals = (primal_p, *[args[i] for i in tensor_pos])
        tans = (
            tvals,
            *[
                targs[i] if targs[i] is not None else torch.zeros_like(args[i])
                for i in tensor_pos
            ],
        )
        with replay_rng(rng):
            return float_output_jvp(f, primals, tans)
