r"""Which layers K-FAC can approximate, and which parameters it cannot.

K-FAC (Martens & Grosse 2015) and KFC (Grosse & Martens 2016) approximate the curvature block of
one ``nn.Linear`` or ``nn.Conv2d`` layer by a Kronecker product. :func:`find_layers` walks a model
and returns a :class:`LayerTable`: the supported layers (:class:`KFACLayer`) and the selected
parameters owned by modules K-FAC does not support (BatchNorm, LayerNorm, Embedding, conv with
non-zero padding modes, ...), which callers must treat some other way (warned about by default,
``strict=True`` raises).

Grouped convolutions (``groups = g > 1``, depthwise included) are registered, with
``find_layers(..., grouped_conv=True)``, as ``g`` layers named ``"<module>[j]"``, one per group:
group ``j`` owns output channels ``j·out/g … (j+1)·out/g - 1`` (rows of the weight and bias) and
sees only its input channels, so the layer's block is block-diagonal over groups with one
Kronecker product per group (cross-group correlations dropped). A group layer's
:meth:`KFACLayer.to_matrix` / :meth:`KFACLayer.from_matrix` work on its rows (``out_slice``)
only, so callers must write results into ``param[out_slice]``; by default
(``grouped_conv=False``) grouped convolutions are reported as unsupported instead.

Vec convention. A layer's parameters in *homogeneous matrix form* are
``V = [W.reshape(out, -1) | b]`` of shape ``(out_dim, in_dim)`` where ``in_dim`` counts the
bias column (``in_features + 1`` for a Linear layer with bias; ``C_in * kh * kw (+1)`` for a
convolution). With the row-major vec used by curvlab, ``vec(V) = g ⊗ ā`` for one rank-one
gradient ``g āᵀ``, so the layer's Kronecker block is ``G ⊗ A``; the papers (column-major vec)
write the same matrix as ``A ⊗ G``. For a layer with bias, curvlab's flat order lists all weight
entries and then the bias, i.e. a fixed permutation of the rows of ``vec(V)``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from curvlab.func.params import ParamsArg, select_params

__all__ = ["KFACLayer", "LayerTable", "find_layers"]

LayerKind = Literal["linear", "conv2d", "embedding", "attention-in"]
_KIND_TYPES = {"linear": nn.Linear, "conv2d": nn.Conv2d, "embedding": nn.Embedding,
               "attention-in": nn.MultiheadAttention}


@dataclass(frozen=True)
class KFACLayer:
    """One layer K-FAC approximates by a Kronecker product.

    Attributes:
        name: Qualified module name (as in ``model.named_modules()``).
        module: The ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding`` or (for its input
            projections) ``nn.MultiheadAttention`` module.
        weight: Qualified name of its weight parameter (e.g. ``"0.weight"``).
        bias: Qualified name of its bias parameter, or ``None`` if the layer has no bias or the
            bias is not among the selected parameters.
        kind: ``"linear"``, ``"conv2d"``, ``"embedding"`` (a linear map of one-hot inputs:
            ``V = Wᵀ`` of shape ``(embedding_dim, num_embeddings)``, ``A`` diagonal) or
            ``"attention-in"`` (rows ``j·E … (j+1)·E − 1`` of ``in_proj_weight``: the query,
            key or value projection, ``group = 0, 1, 2``).
        group: For a grouped convolution, the group index ``j`` (the layer is that group's
            rows); for ``"attention-in"`` the projection; ``None`` otherwise.

    Properties ``in_dim`` (rows/columns of ``A``, including the homogeneous ones column when
    ``bias`` is set) and ``out_dim`` (rows/columns of ``G``; ``out/g`` for a group).

    Example:
        >>> layer = find_layers(nn.Sequential(nn.Linear(3, 2))).layers[0]
        >>> (layer.name, layer.weight, layer.bias, layer.in_dim, layer.out_dim)
        ('0', '0.weight', '0.bias', 4, 2)
    """

    name: str
    module: nn.Module = field(repr=False)
    weight: str
    bias: str | None
    kind: LayerKind
    group: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KIND_TYPES:
            raise ValueError(f"KFACLayer {self.name!r}: kind must be one of "
                             f"{sorted(_KIND_TYPES)}, got {self.kind!r}")
        expected = _KIND_TYPES[self.kind]
        if not isinstance(self.module, expected):
            raise TypeError(f"KFACLayer {self.name!r}: kind {self.kind!r} needs an "
                            f"{expected.__name__}, got {type(self.module).__name__}")
        groups = self.groups
        if self.kind == "conv2d":
            reason = _conv_unsupported_reason(self.module)
            if reason:
                raise NotImplementedError(f"KFACLayer {self.name!r}: {reason}")
        if self.kind == "embedding" and self.bias is not None:
            raise ValueError(f"KFACLayer {self.name!r}: an embedding has no bias")
        if groups > 1 and self.group is None:
            raise NotImplementedError(
                f"KFACLayer {self.name!r}: grouped convolution (groups={groups}) needs one "
                "KFACLayer per group (group=j); find_layers registers them"
            )
        if self.group is not None and not (groups > 1 and 0 <= self.group < groups):
            raise ValueError(f"KFACLayer {self.name!r}: group={self.group} but the module has "
                             f"groups={groups}")

    @property
    def groups(self) -> int:
        """Row groups of the weight: conv groups, 3 for attention (q, k, v), else 1."""
        if self.kind == "attention-in":
            return 3
        return int(getattr(self.module, "groups", 1))

    @property
    def weight_param(self) -> Tensor:
        """The weight tensor."""
        if self.kind == "attention-in":
            return self.module.in_proj_weight
        return self.module.weight

    @property
    def bias_param(self) -> Tensor | None:
        """The bias tensor if registered (``bias`` is not ``None``), else ``None``."""
        if self.bias is None:
            return None
        return self.module.in_proj_bias if self.kind == "attention-in" else self.module.bias

    @property
    def in_dim(self) -> int:
        """Dimension of the input factor ``A``: fan-in (+1 for the bias column)."""
        if self.kind == "embedding":
            return int(self.module.num_embeddings)
        w = self.weight_param
        return int(w[0].numel()) + (1 if self.bias is not None else 0)

    @property
    def out_dim(self) -> int:
        """Dimension of the output factor ``G``: output units / channels (of the group)."""
        if self.kind == "embedding":
            return int(self.module.embedding_dim)
        return int(self.weight_param.shape[0]) // self.groups

    @property
    def out_slice(self) -> slice:
        """Rows of the weight/bias (output channels) this layer owns (all unless grouped)."""
        if self.group is None:
            return slice(None)
        return slice(self.group * self.out_dim, (self.group + 1) * self.out_dim)

    @property
    def in_channel_slice(self) -> slice:
        """Input channels this layer sees (all unless grouped)."""
        if self.group is None:
            return slice(None)
        c = int(self.weight_param.shape[1])
        return slice(self.group * c, (self.group + 1) * c)

    @property
    def param_names(self) -> list[str]:
        """Registered parameter names, weight first."""
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def to_matrix(self, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """Homogeneous matrix form ``[W.reshape(out, -1) | b]`` (leading batch dims allowed).

        ``weight`` has shape ``(*batch, *W.shape)`` (the whole parameter); ``bias``
        ``(*batch, out)`` and is required exactly when the layer registers a bias. For a group
        of a grouped convolution only that group's rows are returned.

        Example:
            >>> layer = find_layers(nn.Sequential(nn.Linear(2, 1))).layers[0]
            >>> layer.to_matrix(torch.ones(1, 2), torch.zeros(1))
            tensor([[1., 1., 0.]])
        """
        wshape = self.weight_param.shape
        nb = weight.dim() - len(wshape)
        if nb < 0 or tuple(weight.shape[nb:]) != tuple(wshape):
            raise ValueError(f"layer {self.name!r}: weight must have shape (*batch, "
                             f"{tuple(wshape)}), got {tuple(weight.shape)}")
        if self.kind == "embedding":
            if bias is not None:
                raise ValueError(f"layer {self.name!r} has no registered bias, got one")
            return weight.mT
        m = weight.reshape(*weight.shape[:nb], wshape[0], -1)[..., self.out_slice, :]
        if self.bias is None:
            if bias is not None:
                raise ValueError(f"layer {self.name!r} has no registered bias, got one")
            return m
        if bias is None or tuple(bias.shape) != (*weight.shape[:nb], wshape[0]):
            raise ValueError(f"layer {self.name!r}: bias of shape "
                             f"{(*weight.shape[:nb], wshape[0])} required")
        return torch.cat([m, bias[..., self.out_slice].unsqueeze(-1)], dim=-1)

    def from_matrix(self, m: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`to_matrix`: ``(weight, bias or None)`` (leading batch dims allowed).

        For a group of a grouped convolution, the group's rows (``weight[out_slice]``) only.

        Example:
            >>> layer = find_layers(nn.Sequential(nn.Linear(2, 1))).layers[0]
            >>> [t.shape for t in layer.from_matrix(torch.zeros(1, 3))]
            [torch.Size([1, 2]), torch.Size([1])]
        """
        wshape = (self.out_dim, *self.weight_param.shape[1:])
        if tuple(m.shape[-2:]) != (self.out_dim, self.in_dim):
            raise ValueError(f"layer {self.name!r}: matrix must end in shape "
                             f"{(self.out_dim, self.in_dim)}, got {tuple(m.shape)}")
        batch = m.shape[:-2]
        if self.kind == "embedding":
            return m.mT, None
        if self.bias is None:
            return m.reshape(*batch, *wshape), None
        return m[..., :-1].reshape(*batch, *wshape), m[..., -1]


def _unsupported_reason(mod: nn.Module, names: dict[str, str], grouped_conv: bool) -> str:
    """Why ``mod`` (owning the selected parameters ``names``) gets no block, or ``""``."""
    kind = type(mod).__name__
    if isinstance(mod, nn.Linear | nn.Conv2d | nn.Embedding):
        reason = ""
        if isinstance(mod, nn.Conv2d):
            reason = _conv_unsupported_reason(mod)
            if not reason and mod.groups > 1 and not grouped_conv:
                reason = (f"grouped convolution (groups={mod.groups}) registered only with "
                          "find_layers(..., grouped_conv=True) (one block per group)")
        if isinstance(mod, nn.Embedding) and mod.max_norm is not None:
            reason = "max_norm renormalizes the weight inside the forward"
        if not reason and "weight" not in names:
            reason = "bias selected without its weight"
        return f"{kind}: {reason}" if reason else ""
    if isinstance(mod, nn.MultiheadAttention):
        if not mod._qkv_same_embed_dim or mod.bias_k is not None or mod.add_zero_attn:
            return (f"{kind}: only the packed in_proj_weight without bias_k/bias_v or "
                    "add_zero_attn is supported")
        if "in_proj_weight" not in names:
            return f"{kind}: in_proj_bias selected without in_proj_weight"
        return ""
    return f"{kind}: no Kronecker-factored rule for this module type"


def _layers_of(mod_name: str, mod: nn.Module, names: dict[str, str]) -> list[KFACLayer]:
    if isinstance(mod, nn.MultiheadAttention):
        return [KFACLayer(f"{mod_name}[{'qkv'[j]}]", mod, names["in_proj_weight"],
                          names.get("in_proj_bias"), "attention-in", j) for j in range(3)]
    if isinstance(mod, nn.Embedding):
        return [KFACLayer(mod_name, mod, names["weight"], None, "embedding")]
    kind: LayerKind = "linear" if isinstance(mod, nn.Linear) else "conv2d"
    groups = int(getattr(mod, "groups", 1))
    return [KFACLayer(mod_name if j is None else f"{mod_name}[{j}]", mod, names["weight"],
                      names.get("bias"), kind, j)
            for j in (range(groups) if groups > 1 else [None])]


def _conv_unsupported_reason(mod: nn.Conv2d) -> str:
    if mod.padding_mode != "zeros":
        return f"padding_mode={mod.padding_mode!r} is not supported (only 'zeros')"
    if isinstance(mod.padding, str) and mod.padding not in ("valid", "same"):
        return f"padding={mod.padding!r} is not supported"
    return ""


@dataclass
class LayerTable:
    """Result of :func:`find_layers`.

    Attributes:
        layers: Supported layers in module order.
        unsupported: ``{module_name: [selected parameter names it owns]}`` for every module
            holding selected parameters that K-FAC cannot approximate.
        reasons: ``{module_name: why it is unsupported}``.

    ``str(table)`` is a registration table (one row per module).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     table = find_layers(net)
        >>> [l.name for l in table.layers], table.unsupported
        (['0', '2'], {'1': ['1.weight', '1.bias']})
    """

    layers: list[KFACLayer]
    unsupported: dict[str, list[str]]
    reasons: dict[str, str] = field(default_factory=dict)
    #: Normalization layers registered for unit-wise blocks
    #: (:class:`curvlab.kfac.unitwise.NormLayer`, by :func:`curvlab.kfac.register_layers`).
    norm: list = field(default_factory=list)

    @property
    def param_names(self) -> list[str]:
        """All parameter names registered with a supported layer (each once)."""
        return list(dict.fromkeys(n for layer in self.layers for n in layer.param_names))

    def __getitem__(self, name: str | int | slice):
        """A layer by name, or by position/slice like ``self.layers``."""
        if isinstance(name, int | slice):
            return self.layers[name]
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no registered K-FAC layer named {name!r}")

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __str__(self) -> str:
        rows = [("module", "type", "status", "A dim", "G dim", "parameters")]
        for layer in self.layers:
            kind = layer.kind if layer.group is None else f"{layer.kind} group {layer.group}"
            rows.append((layer.name or "<root>", type(layer.module).__name__,
                         f"K-FAC {kind}", str(layer.in_dim), str(layer.out_dim),
                         ", ".join(layer.param_names)))
        for name, params in self.unsupported.items():
            rows.append((name or "<root>", self.reasons.get(name, "?").split(":")[0],
                         "UNSUPPORTED", "-", "-", ", ".join(params)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def find_layers(
    model: nn.Module, params: ParamsArg = None, *, strict: bool = False,
    grouped_conv: bool = False,
) -> LayerTable:
    """Register the K-FAC layers of ``model`` among the selected parameters.

    A ``nn.Linear`` or ``nn.Conv2d`` (zero padding; a grouped conv as one layer per group), an
    ``nn.Embedding`` (diagonal input factor: token frequencies) and the input projections of an
    ``nn.MultiheadAttention`` (one layer each for the query, key and value rows of
    ``in_proj_weight``; its ``out_proj`` is a Linear layer) are registered when the weight is
    selected; the bias is registered when selected too. A tensor used by two different modules
    (tied weights) makes both unsupported; one module called several times is fine
    (K-FAC-expand, :mod:`curvlab.kfac.capture`). A
    selected bias whose weight is not selected, and every selected parameter owned by any other
    module, is *unsupported*.

    Args:
        model: The network.
        params: Parameter selection as in :func:`curvlab.func.select_params` (default: all
            parameters with ``requires_grad=True``).
        strict: Raise instead of warning when some selected parameters are unsupported.
        grouped_conv: Register a grouped ``nn.Conv2d`` as one layer per group (callers then
            handle row slices, see the module docstring); if ``False`` it is unsupported.

    Returns:
        A :class:`LayerTable`.

    Raises:
        ValueError: with ``strict=True`` if any selected parameter is unsupported (the
            modules and parameters are named), or if no layer is supported at all.

    Example:
        >>> print(find_layers(nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))))
        module  type    status        A dim  G dim  parameters
        ------  ------  ------------  -----  -----  ----------------
        0       Linear  K-FAC linear  4      2      0.weight, 0.bias
        2       Linear  K-FAC linear  3      1      2.weight, 2.bias
    """
    selected = select_params(model, params)
    by_id = {id(p): n for n, p in selected.items()}
    layers: list[KFACLayer] = []
    unsupported: dict[str, list[str]] = {}
    reasons: dict[str, str] = {}
    claimed: set[str] = set()
    owners: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules():
        for _, p in mod.named_parameters(recurse=False):
            if id(p) in by_id:
                owners.setdefault(id(p), []).append(mod_name)
    for mod_name, mod in model.named_modules():
        own = [(pn, p) for pn, p in mod.named_parameters(recurse=False) if id(p) in by_id]
        if not own:
            continue
        names = {pn: by_id[id(p)] for pn, p in own}
        tied = {pn: [m for m in owners[id(p)] if m != mod_name] for pn, p in own
                if len(owners[id(p)]) > 1}
        reason = _unsupported_reason(mod, names, grouped_conv)
        if tied and not reason:
            reason = (f"{type(mod).__name__}: parameters tied with other modules ("
                      + "; ".join(f"{names[pn]} also in {', '.join(ms)}"
                                  for pn, ms in tied.items())
                      + "); K-FAC-expand covers one module called several times, not one "
                      "tensor used by different modules")
        if not reason:
            for layer in _layers_of(mod_name, mod, names):
                layers.append(layer)
                claimed.update(layer.param_names)
            continue
        unsupported[mod_name] = [names[pn] for pn, _ in own]
        reasons[mod_name] = reason
    # parameters registered on no module (should not happen) are reported as well
    leftover = [n for n in selected if n not in claimed
                and not any(n in v for v in unsupported.values())]
    if leftover:
        unsupported["<unknown>"] = leftover
        reasons["<unknown>"] = "parameters not found on any module"
    table = LayerTable(layers, unsupported, reasons)
    if unsupported:
        detail = "; ".join(f"{m or '<root>'} ({reasons[m]}): {', '.join(ps)}"
                           for m, ps in unsupported.items())
        if strict:
            raise ValueError(f"K-FAC does not support these modules/parameters: {detail}")
        warnings.warn(f"K-FAC does not support these modules/parameters, they get no "
                      f"Kronecker block: {detail}", stacklevel=2)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no nn.Linear/nn.Conv2d layer with a selected "
                         "weight; K-FAC has nothing to approximate")
    return table
