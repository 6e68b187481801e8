"""Every private torch API tcompile uses, in one place, so a torch upgrade breaks in one file.

Callers import the small functions below instead of reaching into ``torch.utils._pytree``,
``torch.fx`` codegen internals or ``torch.export`` helpers themselves. When torch renames one of
these, fix it here and nowhere else.
"""
from __future__ import annotations

import copy
import importlib
import json
import logging
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as _pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

logger = logging.getLogger(__name__)

TreeSpec = _pytree.TreeSpec


def tree_flatten(tree: Any) -> tuple[list[Any], TreeSpec]:
    """Flatten ``tree`` the way torch.export flattens inputs and outputs (same leaf order)."""
    return _pytree.tree_flatten(tree)


def tree_unflatten(leaves: list[Any], spec: TreeSpec) -> Any:
    """Rebuild the structure (including registered ``ModelOutput`` classes) from its leaves."""
    return _pytree.tree_unflatten(leaves, spec)


def tree_flatten_with_paths(tree: Any) -> tuple[list[tuple[str, Any]], TreeSpec]:
    """Flatten ``tree`` and give each leaf its key path as a string, e.g. ``['logits']``."""
    pairs, spec = _pytree.tree_flatten_with_path(tree)
    return [(_pytree.keystr(path), leaf) for path, leaf in pairs], spec


def leaf_paths(spec: TreeSpec) -> list[str]:
    """Key paths of the leaves of ``spec``, without needing real values for them.

    Placeholder tensors (not ints or strings) are used because ``ModelOutput.__post_init__``
    inspects its first field and treats a non-tensor iterable as a list of key/value pairs.
    """
    dummies = [torch.empty(0) for _ in range(spec.num_leaves)]
    pairs, _ = tree_flatten_with_paths(tree_unflatten(dummies, spec))
    return [path for path, _ in pairs]


def treespec_dumps(spec: TreeSpec) -> str:
    """Serialise a pytree spec to JSON text (registered HF ``ModelOutput`` classes included)."""
    return _pytree.treespec_dumps(spec)


def _serialized_type_names(node: Any) -> list[str]:
    """Every ``"type"`` string in a ``treespec_dumps`` JSON payload, depth first."""
    found: list[str] = []
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            found.append(node["type"])
        for child in node.get("children_spec", []):
            found.extend(_serialized_type_names(child))
    elif isinstance(node, list):
        for item in node:
            found.extend(_serialized_type_names(item))
    return found


def treespec_loads(text: str) -> TreeSpec:
    """Inverse of :func:`treespec_dumps`, importing the modules that define custom node types.

    A fresh process has not imported ``transformers.modeling_outputs`` yet, so its ``ModelOutput``
    classes are not registered with pytree and ``treespec_loads`` would fail; importing the
    module named in the payload registers them.
    """
    try:
        return _pytree.treespec_loads(text)
    except (KeyError, NotImplementedError, ValueError, TypeError):
        pass
    for name in _serialized_type_names(json.loads(text)):
        module_name = name.rpartition(".")[0]
        if module_name and module_name != "builtins":
            try:
                importlib.import_module(module_name)
            except ImportError:
                logger.debug("could not import %s while loading a tree spec", module_name)
    return _pytree.treespec_loads(text)


def graph_module_specs(module: torch.nn.Module) -> tuple[TreeSpec | None, TreeSpec | None]:
    """The ``(in_spec, out_spec)`` of a module from ``ExportedProgram.module()``, or Nones.

    Unlifted modules keep them in ``_in_spec``/``_out_spec``; a GraphModule rebuilt from such a
    graph still carries them in its ``_PyTreeCodeGen``.
    """
    in_spec = getattr(module, "_in_spec", None)
    out_spec = getattr(module, "_out_spec", None)
    graph = getattr(module, "graph", None)
    info = getattr(getattr(graph, "_codegen", None), "pytree_info", None)
    if info is not None:
        in_spec = in_spec if in_spec is not None else info.in_spec
        out_spec = out_spec if out_spec is not None else info.out_spec
    return in_spec, out_spec


def clone_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule with a deep-copied graph that shares parameters with ``gm``.

    Unlifted exported modules keep their pytree specs in ``_in_spec``/``_out_spec`` and their
    generated ``forward`` reads them, so they must travel with the graph.
    """
    new = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(new, attr, getattr(gm, attr))
    new.meta.update(getattr(gm, "meta", {}))
    return new


def fake_propagate(gm: torch.fx.GraphModule, flat_inputs: list[Any]) -> None:
    """Record ``meta['val']`` (a FakeTensor) on every node, without running real kernels."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in flat_inputs]
    with mode:
        FakeTensorProp(gm, mode=mode).propagate_dont_convert_inputs(*fake_inputs)


def append_graph_outputs(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> None:
    """Append ``nodes`` to the flat outputs of an unlifted exported module whose output is a tuple.

    Its generated ``forward`` unflattens the outputs with the module's ``_out_spec`` (and the
    graph's ``_PyTreeCodeGen``), so both specs grow with the new leaves.
    """
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves = list(out.args[0]) + list(nodes)
    _, old_spec = graph_module_specs(gm)
    if old_spec is not None and (old_spec.type is not tuple or any(not c.is_leaf() for c in old_spec.children())):
        raise ValueError("append_graph_outputs needs a module that returns a flat tuple of tensors")
    out.args = (tuple(leaves),)
    new_spec = tree_flatten(tuple(range(len(leaves))))[1]
    if hasattr(gm, "_out_spec"):
        gm._out_spec = new_spec
    codegen = getattr(gm.graph, "_codegen", None)
    info = getattr(codegen, "pytree_info", None)
    if info is not None:
        codegen.pytree_info = info._replace(out_spec=new_spec)
    gm.recompile()


def op_name(target: Any) -> str | None:
    """``namespace::name`` of an ``OpOverload``/``OpOverloadPacket`` graph target, else None."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return target.name() if isinstance(target, torch._ops.OpOverload) else f"{target._qualified_op_name}"
    return None


def aoti_compile_and_package(program: Any, package_path: str, options: dict | None = None) -> str:
    """AOTInductor: compile an ExportedProgram into a ``.pt2`` package (torch._inductor API)."""
    import torch._inductor
    return torch._inductor.aoti_compile_and_package(program, package_path=package_path,
                                                     inductor_configs=options or {})


def aoti_load_package(path: str) -> Any:
    """Load an AOTInductor ``.pt2`` package as a callable (torch._inductor API)."""
    import torch._inductor
    return torch._inductor.aoti_load_package(path)
