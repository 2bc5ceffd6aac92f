"""Pytree helpers over optree, addressed by path ("layers.3.wq").

One library flattens and unflattens every tree in this project: optree. It sorts dict keys
while `torch.utils._pytree` keeps insertion order, so a leaf list made by one and rebuilt by the
other lands on the wrong keys. Compare trees by path, never by leaf position across libraries.
torch.compile traces these optree calls without graph breaks.

Custom node types (LoRA's `LoraWeight`) are registered with `register_node`, in optree under this
project's namespace (every helper here flattens in it) and in `torch.utils._pytree`, so
torch.func and dynamo see through them as well.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch

PyTree = Any
NAMESPACE = "llamax"  # optree keeps custom node registrations per namespace


def register_node(cls: type, flatten: Callable[[Any], tuple[list, Any]],
                  unflatten: Callable[[Any, list], Any]) -> None:
    """Make `cls` a pytree node: `flatten(obj) -> (children, aux)`, `unflatten(aux, children)`.
    `aux` is static data (hashable); children are subtrees."""
    optree.register_pytree_node(cls, flatten, unflatten, namespace=NAMESPACE)
    import torch.utils._pytree as torch_pytree
    if cls in torch_pytree.SUPPORTED_NODES:
        return
    torch_pytree.register_pytree_node(
        cls, lambda obj: flatten(obj), lambda children, aux: unflatten(aux, list(children)),
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")


def flatten(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> tuple[list[Any], Any]:
    """(leaves, treespec); `unflatten(treespec, leaves)` rebuilds the tree."""
    return optree.tree_flatten(tree, is_leaf=is_leaf, namespace=NAMESPACE)


def unflatten(spec: Any, leaves: list[Any]) -> PyTree:
    return optree.tree_unflatten(spec, leaves)


def path_str(path: tuple) -> str:
    """("layers", 3, "wq") -> "layers.3.wq"."""
    return ".".join(str(part) for part in path)


def tree_map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree,
             is_leaf: Callable[[Any], bool] | None = None) -> PyTree:
    return optree.tree_map(fn, tree, *rest, is_leaf=is_leaf, namespace=NAMESPACE)


def map_with_path(fn: Callable[..., Any], tree: PyTree, *rest: PyTree,
                  is_leaf: Callable[[Any], bool] | None = None) -> PyTree:
    """`fn(path, leaf, *other_leaves)` on every leaf; `path` is the dotted string."""
    return optree.tree_map_with_path(lambda p, *xs: fn(path_str(p), *xs), tree, *rest,
                                     is_leaf=is_leaf, namespace=NAMESPACE)


def leaves(tree: PyTree) -> list[Any]:
    return optree.tree_leaves(tree, namespace=NAMESPACE)


def flatten_by_path(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """{"layers.0.wq": leaf, ...}: a flat view whose keys survive any change of tree library."""
    paths, values, _ = optree.tree_flatten_with_path(tree, is_leaf=is_leaf, namespace=NAMESPACE)
    return {path_str(p): v for p, v in zip(paths, values)}


def unflatten_like(target: PyTree, flat: dict[str, Any],
                   is_leaf: Callable[[Any], bool] | None = None) -> PyTree:
    """The tree of `target`'s structure whose leaves are `flat[path]` (the inverse of
    `flatten_by_path`, matched by path, never by position)."""
    paths, _, spec = optree.tree_flatten_with_path(target, is_leaf=is_leaf, namespace=NAMESPACE)
    return optree.tree_unflatten(spec, [flat[path_str(p)] for p in paths])


def is_axes(x: Any) -> bool:
    """Leaves of a logical-axes tree are tuples of names (tuples are also optree nodes)."""
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def max_abs_diff(a: PyTree, b: PyTree) -> tuple[float, str]:
    """Largest |a - b| over all leaves and the path where it occurs.

    Raises ValueError naming the first path present in one tree only, or whose shapes differ.
    Leaves may be DTensors; they are gathered to full tensors before comparing.
    """
    fa, fb = flatten_by_path(a), flatten_by_path(b)
    if fa.keys() != fb.keys():
        only = sorted(fa.keys() ^ fb.keys())
        raise ValueError(f"trees differ in structure; path {only[0]!r} is in one tree only")
    worst, where = 0.0, ""
    for path, x in fa.items():
        x, y = _full(x), _full(fb[path])
        if x.shape != y.shape:
            raise ValueError(f"{path}: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
        diff = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        if diff > worst or not where:
            worst, where = diff, path
    return worst, where


def full_tensor(x: Any) -> Any:
    """The whole tensor of a DTensor (a collective: every rank must call it); anything else as
    it is. Duck-typed, so this module does not import torch.distributed."""
    full = getattr(x, "full_tensor", None)
    return full() if full is not None else x


def gather(tree: PyTree) -> PyTree:
    """Whole tensors of a (sharded) tree; a collective: every rank calls it."""
    return tree_map(full_tensor, tree)


def _full(x: Any) -> torch.Tensor:
    return torch.as_tensor(full_tensor(x)).detach()
