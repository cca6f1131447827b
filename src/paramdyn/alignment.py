"""Permutation alignment (weight matching, Git Re-Basin) with the permutation structure
derived from the model itself.

Two networks can compute the same function with their hidden units in a different order:
permuting the output channels of a layer, and the input channels of every layer that reads
them, changes no output. Before asking whether two trained networks found "the same
solution" (distance, interpolation), one network is permuted to line up with the other.
Ainsworth, Hayase & Srinivasa 2022 ("Git Re-Basin", weight matching) do this by
coordinate descent over the permutations, one linear assignment per permutation.

The *permutation spec* says which state_dict axes share a permutation. Hand-written specs
(one per architecture) are easy to get wrong on residual networks, where every block of a
stage writes into the same residual stream; here the spec is derived from the model:

- :func:`permutation_spec` traces the model with ``torch.fx`` (a forward pass on an example
  input gives every tensor's shape) and runs a union-find over *channel spaces*. Each
  Conv/Linear creates a new space for its output (weight axis 0, bias); its weight axis 1
  belongs to its input's space. BatchNorm (weight, bias, running stats) lives in its
  input's space and passes it through, as do elementwise and pooling ops, pad, dropout
  and Identity. ``add`` (a residual stream) unions its operands' spaces. Flattening a
  [C, H, W] map gives features in which each channel owns H*W contiguous entries (a Linear
  reading them is permuted in blocks of H*W columns). The model input's channels and the
  output classes are fixed: a space that meets them is never permuted, nor is
  ``num_batches_tracked``. Each remaining space is a *group*, named after the module
  that first created it. Ops are looked up in registries (:data:`MODULE_RULES`,
  :data:`FUNCTION_RULES`, :data:`METHOD_RULES`); an op not there raises
  :class:`AlignmentError` naming it, never a silently wrong spec.
- :func:`random_permutation`, :func:`apply_permutation` (parameters and BatchNorm running
  stats; never modifies its input) and :func:`inverse`. Convention: ``perm[i]`` is the old
  index of new unit ``i`` (``index_select``).
- :func:`weight_matching`: Ainsworth's coordinate descent. In a random group order each
  sweep, a group's permutation is the linear assignment
  (``scipy.optimize.linear_sum_assignment``) maximising the summed similarity
  sum_k A_k B_k^T of every *parameter* touching that group (the tensor's other axes
  permuted by the current permutations; 1-D tensors such as biases and BatchNorm
  weight/bias contribute an outer product, as in Ainsworth's code; running stats are not
  parameters and are left out, as there). Stops after the first sweep in which no group
  improves its objective. One change to Ainsworth's start (the identity): the first sweep
  runs input to output, each group matched on the terms whose other axes are already
  matched (noise from unmatched neighbours otherwise leaves the random-order descent
  stuck short of an exactly permuted copy on plain bottleneck ResNets; with this start a
  permuted copy is recovered in one sweep). Similarities are computed in float64: two
  independent ResNet-18s (11M parameters) match in 3 sweeps, 2-6 s on the shared 2-core
  CPU, 1.0-1.8x the bare products and assignments of the same sweeps (the rest: float64
  copies of both states, and permuting each tensor's other axis every time;
  ``benchmarks/bench_weight_matching.py``).
- :func:`align`: spec, matching and the permuted second state in one call.

Written by hand (no maintained library derives the spec from a traced model: the
Git Re-Basin reference code and its ports take hand-written specs); the assignment itself
is scipy's.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

Perms = dict[str, torch.Tensor]
StateDict = Mapping[str, torch.Tensor]


class AlignmentError(ValueError):
    """The model cannot be given a permutation spec, or a state/permutation does not fit it."""


@dataclass(frozen=True)
class PermutationSpec:
    """Which state_dict axes share a permutation.

    ``groups``: group name -> number of units. ``axes``: state_dict key -> for each axis of
    the tensor, its group (None: never permuted). ``blocks``: key -> for each axis, how many
    contiguous entries each unit owns along it (1, or H*W for a Linear reading a flattened
    [C, H, W] map). ``params``: the keys that are parameters (the rest are buffers)."""

    groups: dict[str, int]
    axes: dict[str, tuple[str | None, ...]]
    blocks: dict[str, tuple[int, ...]]
    params: frozenset[str]

    def members(self, group: str) -> set[tuple[str, int]]:
        """The (key, axis) pairs permuted by ``group``."""
        return {
            (key, axis)
            for key, groups in self.axes.items()
            for axis, g in enumerate(groups)
            if g == group
        }


# --- deriving the spec: channel spaces over the traced graph ----------------------------------


class _Feat(NamedTuple):
    """A tensor's channel axis (dim 1): its space, and how many contiguous entries along
    dim 1 each channel owns (1 for feature maps, H*W after flattening one)."""

    space: int
    block: int


class _Walk:
    """The union-find of channel spaces, filled node by node by the rules."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.creator: list[str] = []
        self.fixed: list[bool] = []
        self.feats: dict[fx.Node, _Feat] = {}
        self.module_out: dict[str, int] = {}  # a Conv/Linear's output space (shared modules)
        self.axes: dict[str, tuple[_Feat | None, ...]] = {}  # key -> per axis

    def new_space(self, size: int, creator: str, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.creator.append(creator)
        self.fixed.append(fixed)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            raise AlignmentError(
                f"{where}: joins channel spaces of {self.size[ra]} and {self.size[rb]} units"
            )
        lo, hi = min(ra, rb), max(ra, rb)  # the older space names the group
        self.parent[hi] = lo
        self.fixed[lo] = self.fixed[lo] or self.fixed[hi]
        return lo

    def feat(self, arg: Any, node: fx.Node) -> _Feat:
        if not isinstance(arg, fx.Node) or arg not in self.feats:
            raise AlignmentError(f"{_describe(node)}: its input {arg!r} is not a traced tensor")
        return self.feats[arg]

    def record(self, node: fx.Node, module: nn.Module, axes: dict[str, tuple[_Feat | None, ...]]):
        """Give the state_dict entries of ``module`` (called at ``node``) their axes."""
        prefix = f"{node.target}."
        for local in module.state_dict(keep_vars=True):
            if local not in axes:
                raise AlignmentError(
                    f"{_describe(node)}: has state {local!r} that its rule does not place"
                )
            key = prefix + local
            old = self.axes.get(key)
            if old is not None:  # a module called twice: its axes' spaces are one
                for f_old, f_new in zip(old, axes[local], strict=True):
                    if f_old is not None and f_new is not None:
                        self.union(f_old.space, f_new.space, _describe(node))
            else:
                self.axes[key] = axes[local]


def _describe(node: fx.Node) -> str:
    target = (
        node.target
        if isinstance(node.target, str)
        else getattr(node.target, "__name__", node.target)
    )
    return f"node {node.name!r} ({node.op} {target})"


def _shape(node: Any) -> torch.Size | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


# --- rules: (walk, node, module or None) -> the output's channel feature ---------------------

Rule = Callable[[_Walk, fx.Node, Any], _Feat]


def _through(w: _Walk, node: fx.Node, module: Any) -> _Feat:
    """Elementwise, pooling, padding, dropout, identity: the channel axis passes unchanged."""
    x = node.args[0]
    f, sin, sout = w.feat(x, node), _shape(x), _shape(node)
    if sout is None or len(sin) != len(sout) or sin[1] != sout[1]:
        raise AlignmentError(f"{_describe(node)}: changes the channel axis ({sin} -> {sout})")
    if module is not None and module.state_dict():
        raise AlignmentError(f"{_describe(node)}: a pass-through op with state")
    return f


def _add(w: _Walk, node: fx.Node, module: Any) -> _Feat:
    """``a + b``: tensors added share their channel space (a residual stream)."""
    tensors = [a for a in (*node.args, *node.kwargs.values()) if _shape(a) is not None]
    feats = [w.feat(a, node) for a in tensors]
    if any(_shape(a)[1:] != _shape(node)[1:] for a in tensors) or len({f.block for f in feats}) > 1:
        raise AlignmentError(f"{_describe(node)}: adds tensors of different layouts")
    space = feats[0].space
    for f in feats[1:]:
        space = w.union(space, f.space, _describe(node))
    return _Feat(space, feats[0].block)


def _mean(w: _Walk, node: fx.Node, module: Any) -> _Feat:
    """``x.mean(dims)`` over spatial axes only (a global average pool): the channel axis
    passes unchanged."""
    x = node.args[0]
    f, sin = w.feat(x, node), _shape(x)
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    dims = {d % len(sin) for d in ((dims,) if isinstance(dims, int) else tuple(dims or ()))}
    if f.block != 1 or len(sin) < 3 or not dims or dims & {0, 1}:
        raise AlignmentError(f"{_describe(node)}: a mean not over a feature map's spatial axes")
    return f


def _flatten_dims(node: fx.Node, module: Any) -> tuple[int, int]:
    if module is not None:
        return module.start_dim, module.end_dim
    start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
    end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
    return start, end


def _flatten(w: _Walk, node: fx.Node, module: Any) -> _Feat:
    """flatten(x, 1): each channel of a [N, C, H, W] map owns H*W contiguous features."""
    x = node.args[0]
    f, sin = w.feat(x, node), _shape(x)
    start, end = _flatten_dims(node, module)
    if len(sin) == 2 and start in (1, -1) and end in (1, -1):
        return f
    if start != 1 or end not in (-1, len(sin) - 1):
        raise AlignmentError(
            f"{_describe(node)}: only flatten(x, 1) of a feature map is supported "
            f"(got start_dim={start}, end_dim={end})"
        )
    return _Feat(f.space, f.block * int(np.prod(sin[2:], dtype=np.int64)))


def _layer(w: _Walk, node: fx.Node, module: nn.Module) -> _Feat:
    """Conv/Linear: a new space for the output (weight axis 0, bias); weight axis 1 reads
    the input's space, in blocks when the input is a flattened map."""
    x = node.args[0]
    f, sin = w.feat(x, node), _shape(x)
    if isinstance(module, nn.Linear):
        if len(sin) != 2:
            raise AlignmentError(f"{_describe(node)}: a Linear on a {len(sin)}-d tensor")
        out_size = module.out_features
    else:
        if module.groups != 1 or f.block != 1:
            raise AlignmentError(f"{_describe(node)}: grouped convolutions are not supported")
        out_size = module.out_channels
    name = str(node.target)
    if name not in w.module_out:
        w.module_out[name] = w.new_space(out_size, name)
    out = _Feat(w.module_out[name], 1)
    kernel = (None,) * (module.weight.dim() - 2)  # a conv's spatial axes: never permuted
    w.record(node, module, {"weight": (out, f, *kernel), "bias": (out,)})
    return out


def _batchnorm(w: _Walk, node: fx.Node, module: nn.Module) -> _Feat:
    """BatchNorm: its weight, bias and running stats live in the input's space."""
    f = w.feat(node.args[0], node)
    if f.block != 1:
        raise AlignmentError(f"{_describe(node)}: BatchNorm over flattened features")
    stat = (f,)
    w.record(
        node,
        module,
        {"weight": stat, "bias": stat, "running_mean": stat, "running_var": stat,
         "num_batches_tracked": ()},
    )  # fmt: skip
    return f


MODULE_RULES: dict[type, Rule] = {
    **{t: _layer for t in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)},
    **{t: _batchnorm for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)},
    **{
        t: _through
        for t in (
            nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU,
            nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity,
            nn.ZeroPad2d, nn.ConstantPad2d,
        )
    },
    nn.Flatten: _flatten,
}  # fmt: skip
"""Leaf module type -> rule. Containers (Sequential, blocks) are traced through."""

FUNCTION_RULES: dict[Any, Rule] = {
    **{
        f: _through
        for f in (
            F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.tanh,
            torch.sigmoid, F.elu, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
            F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.pad,
            F.dropout, F.dropout2d,
        )
    },
    operator.add: _add,
    torch.add: _add,
    torch.flatten: _flatten,
    torch.mean: _mean,
}  # fmt: skip
"""Function called in a forward -> rule."""

METHOD_RULES: dict[str, Rule] = {
    "relu": _through,
    "relu_": _through,
    "add": _add,
    "add_": _add,
    "flatten": _flatten,
    "mean": _mean,
    "contiguous": _through,
}
"""Tensor method called in a forward -> rule."""


def _rule(gm: fx.GraphModule, node: fx.Node) -> tuple[Rule, Any]:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        rule = MODULE_RULES.get(type(module))
        what = f"module {type(module).__name__} ({node.target})"
    elif node.op == "call_function":
        module, rule = None, FUNCTION_RULES.get(node.target)
        what = f"function {getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', node.target)}"
    elif node.op == "call_method":
        module, rule = None, METHOD_RULES.get(node.target)
        what = f"tensor method .{node.target}()"
    else:  # get_attr: a parameter or buffer used outside a module call
        module, rule, what = None, None, f"direct use of attribute {node.target!r}"
    if rule is None:
        raise AlignmentError(
            f"permutation_spec: unknown op {what} at node {node.name!r}; its effect on channels "
            "is unknown, so no spec is derived (add a rule to alignment.MODULE_RULES, "
            "FUNCTION_RULES or METHOD_RULES if the op permutes channels along with its input)"
        )
    return rule, module


class _Tracer(fx.Tracer):
    """fx's tracer, which also traces through containers built in the forward that are not
    installed as submodules (VGG's ``self.classifier[:-1]``)."""

    def call_module(self, m, forward, args, kwargs):
        try:
            self.path_of_module(m)
        except NameError:
            if self.is_leaf_module(m, ""):
                raise AlignmentError(
                    f"permutation_spec: the forward calls a {type(m).__name__} that is not "
                    "a submodule of the model"
                ) from None
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


def _traced(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """The traced graph, every node's shape filled in by one forward in eval mode under
    no_grad (the model's train/eval flags are restored; its running stats untouched)."""
    try:
        graph = _Tracer().trace(model)
    except AlignmentError:
        raise
    except Exception as e:  # data-dependent control flow and the like
        raise AlignmentError(f"permutation_spec: torch.fx cannot trace the model: {e}") from e
    gm = fx.GraphModule(model, graph)
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    finally:
        for m, flag in flags.items():
            m.training = flag
    return gm


def permutation_spec(model: nn.Module, example_input: torch.Tensor) -> PermutationSpec:
    """Derive the permutation spec of ``model`` from its traced forward on
    ``example_input`` (a batch, e.g. one sample [1, C, H, W]). Raises AlignmentError on an
    op it does not know."""
    gm = _traced(model, example_input)
    w = _Walk()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = _shape(node)
            if shape is not None:
                size = shape[1] if len(shape) > 1 else 1
                w.feats[node] = _Feat(w.new_space(size, "input", fixed=True), 1)
        elif node.op == "output":
            for arg in _flat_args(node.args):
                if arg in w.feats:
                    w.fixed[w.find(w.feats[arg].space)] = True
        else:
            rule, module = _rule(gm, node)
            w.feats[node] = rule(w, node, module)
    return _resolve(model, w)


def _flat_args(args: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


def _resolve(model: nn.Module, w: _Walk) -> PermutationSpec:
    state = model.state_dict(keep_vars=True)
    missing = [k for k in state if k not in w.axes]
    if missing:
        raise AlignmentError(
            f"permutation_spec: state_dict keys {missing[:5]} (of {len(missing)}) are not used "
            "by the traced forward; their permutation is undefined"
        )
    groups: dict[str, int] = {}
    for s in range(len(w.parent)):  # creation order: a group is named by its oldest space
        if w.find(s) == s and not w.fixed[s]:
            groups[w.creator[s]] = w.size[s]

    def group(f: _Feat | None) -> str | None:
        root = w.find(f.space) if f is not None else None
        return None if root is None or w.fixed[root] else w.creator[root]

    axes, blocks = {}, {}
    for key, tensor in state.items():
        feats = w.axes[key]
        if len(feats) != tensor.dim():
            raise AlignmentError(
                f"permutation_spec: {key} has {tensor.dim()} axes, not {len(feats)}"
            )
        axes[key] = tuple(group(f) for f in feats)
        blocks[key] = tuple(1 if f is None else f.block for f in feats)
        for g, b, n in zip(axes[key], blocks[key], tensor.shape, strict=True):
            if g is not None and groups[g] * b != n:
                raise AlignmentError(
                    f"permutation_spec: {key}: axis of {n} is not {groups[g]} x {b}"
                )
    params = frozenset(k for k, v in state.items() if isinstance(v, nn.Parameter))
    return PermutationSpec(groups, axes, blocks, params)


# --- applying permutations ---------------------------------------------------------------------


def random_permutation(spec: PermutationSpec, seed: int) -> Perms:
    """One uniformly random permutation per group (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return {g: torch.randperm(n, generator=gen) for g, n in spec.groups.items()}


def inverse(perms: Perms) -> Perms:
    """The inverse of each permutation: apply(inverse(p), apply(p, s)) == s."""
    return {g: torch.argsort(p) for g, p in perms.items()}


def _index(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Indices along an axis whose units own ``block`` contiguous entries each."""
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block)).reshape(-1)


def _check(spec: PermutationSpec, state: StateDict, perms: Perms | None = None) -> None:
    if set(state) != set(spec.axes):
        extra, missing = sorted(set(state) - set(spec.axes)), sorted(set(spec.axes) - set(state))
        raise AlignmentError(
            f"state_dict does not fit the spec: missing {missing[:5]}, unexpected {extra[:5]} "
            "(derive the spec from the model whose state this is)"
        )
    if perms is not None:
        bad = [g for g, n in spec.groups.items() if g not in perms or perms[g].shape != (n,)]
        if bad:
            raise AlignmentError(f"permutations missing or of the wrong size for groups {bad[:5]}")


def apply_permutation(spec: PermutationSpec, perms: Perms, state_dict: StateDict) -> dict:
    """A new state_dict: every axis of group g re-indexed by ``perms[g]`` (new unit i is old
    unit perms[g][i]); parameters and buffers alike. The input is never modified."""
    _check(spec, state_dict, perms)
    out = {}
    for key, tensor in state_dict.items():
        t = tensor
        for axis, (g, block) in enumerate(zip(spec.axes[key], spec.blocks[key], strict=True)):
            if g is not None:
                t = t.index_select(axis, _index(perms[g].to(t.device), block))
        out[key] = t.clone() if t is tensor else t
    return out


# --- weight matching ---------------------------------------------------------------------------


class _Term(NamedTuple):
    """One parameter's contribution to a group's similarity: A (n x m, fixed) and B with the
    group's axis first and its other grouped axes (position, group) still to permute."""

    a: torch.Tensor
    b: torch.Tensor
    others: tuple[tuple[int, str], ...]


def _split(t: torch.Tensor, blocks: tuple[int, ...]) -> tuple[torch.Tensor, list[int]]:
    """``t`` with each blocked axis split into (units, block); the units' positions."""
    shape, pos = [], []
    for n, b in zip(t.shape, blocks, strict=True):
        pos.append(len(shape))
        shape += [n // b, b] if b > 1 else [n]
    return t.reshape(shape), pos


def _terms(spec: PermutationSpec, a: StateDict, b: StateDict, dtype) -> dict[str, list[_Term]]:
    terms: dict[str, list[_Term]] = {g: [] for g in spec.groups}
    for key, groups in spec.axes.items():  # state order: the same sums in every process
        if key not in spec.params or all(g is None for g in groups):
            continue
        ta, pos = _split(a[key].detach().to("cpu", dtype), spec.blocks[key])  # scipy's side
        tb, _ = _split(b[key].detach().to("cpu", dtype), spec.blocks[key])
        for axis, g in enumerate(groups):
            if g is None:
                continue
            p = pos[axis]
            others = tuple(
                (q + 1 if q < p else q, og)
                for q, og in zip(pos, groups, strict=True)
                if og is not None and q != p
            )
            n = spec.groups[g]
            terms[g].append(
                _Term(ta.movedim(p, 0).reshape(n, -1), tb.movedim(p, 0).contiguous(), others)
            )
    return terms


def _similarity(terms: list[_Term], perms: Perms, n: int, dtype) -> np.ndarray:
    """sum over the group's terms of A_k (B_k, other axes permuted)^T: n x n."""
    sim = torch.zeros(n, n, dtype=dtype)
    for term in terms:
        t = term.b
        for q, g in term.others:
            t = t.index_select(q, perms[g])
        sim.addmm_(term.a, t.reshape(n, -1).T)
    return sim.numpy()


def _assign(sim: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(linear_sum_assignment(sim, maximize=True)[1]).long()


def _forward_start(spec: PermutationSpec, terms: dict[str, list[_Term]], names: list[str]) -> Perms:
    """The first sweep, input to output (groups in creation order): each group matched on
    the terms whose other axes are fixed or already matched in this sweep. Each group's
    creating layer reads an earlier group, so every group has such a term; a term of a
    not yet matched neighbour would only add noise (an exactly permuted copy is recovered
    in this one sweep; random-order sweeps from the identity can stall short of it)."""
    perms = {g: torch.arange(n) for g, n in spec.groups.items()}
    done = set(spec.groups) - set(names)
    for g in names:
        known = [t for t in terms[g] if all(o in done for _, o in t.others)] or terms[g]
        perms[g] = _assign(_similarity(known, perms, spec.groups[g], torch.float64))
        done.add(g)
    return perms


def weight_matching(
    spec: PermutationSpec,
    state_a: StateDict,
    state_b: StateDict,
    max_iter: int = 100,
    seed: int = 0,
    stats: dict | None = None,
) -> Perms:
    """Permutations ``perms`` such that ``apply_permutation(spec, perms, state_b)`` is aligned
    to ``state_a`` (Ainsworth et al. 2022, weight matching; see the module docstring): one
    forward sweep (:func:`_forward_start`), then sweeps in a random group order (``seed``)
    until one improves no group, at most ``max_iter`` sweeps in all. ``stats``, when given,
    receives ``sweeps``: the sweeps run, the forward one and the last (unimproving) one
    included."""
    _check(spec, state_a)
    _check(spec, state_b)
    terms = _terms(spec, state_a, state_b, torch.float64)
    names = [g for g, n in spec.groups.items() if n > 1 and terms[g]]
    perms = _forward_start(spec, terms, names)
    rng = np.random.default_rng(seed)
    sweep = 1
    for sweep in range(2, max_iter + 1):  # noqa: B007 (reported in stats)
        improved = False
        for i in rng.permutation(len(names)):
            g = names[i]
            sim = _similarity(terms[g], perms, spec.groups[g], torch.float64)
            cols = _assign(sim)
            rows = np.arange(len(cols))
            new, old = sim[rows, cols.numpy()].sum(), sim[rows, perms[g].numpy()].sum()
            if new > old + 1e-12 * abs(old):
                perms[g], improved = cols, True
        if not improved:
            break
    if stats is not None:
        stats["sweeps"] = sweep
    return perms


def align(
    model: nn.Module, example_input: torch.Tensor, state_a: StateDict, state_b: StateDict
) -> tuple[dict, Perms]:
    """``state_b`` permuted to line up with ``state_a`` (both states of ``model``'s
    architecture), and the permutations used."""
    spec = permutation_spec(model, example_input)
    perms = weight_matching(spec, state_a, state_b)
    return apply_permutation(spec, perms, state_b), perms
