"""Device meshes and PartitionSpecs for the parameter pytree, optimizer state and batches.

Mesh axes: "data" (pure data parallelism), "fsdp" (data parallelism with parameters and optimizer state sharded
over it, ZeRO-3 style) and "tensor" (Megatron-style: heads and the FFN hidden dimension split across devices).
Batches are split over ("data", "fsdp"). XLA inserts the collectives; the model code is unchanged.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax.config import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Per parameter name: which mesh axis each dimension is split over (the leading layer axis never is).
_RULES = {
    "embed": ("fsdp", "tensor"),  # [V, D]
    "lm_head": ("fsdp", "tensor"),  # [D, V]
    "final_norm": (None,),
    "attn_norm": (None, None),
    "ffn_norm": (None, None),
    "wq": (None, "fsdp", "tensor"),  # [L, D, N*H]: heads split over "tensor"
    "wk": (None, "fsdp", "tensor"),
    "wv": (None, "fsdp", "tensor"),
    "wo": (None, "tensor", "fsdp"),  # [L, N*H, D]
    "w_gate": (None, "fsdp", "tensor"),  # [L, D, F]: the hidden dimension split over "tensor"
    "w_up": (None, "fsdp", "tensor"),
    "w_down": (None, "tensor", "fsdp"),  # [L, F, D]
}


def parse_mesh(spec: str) -> dict[str, int]:
    """"data=2,fsdp=4,tensor=1" -> {"data": 2, "fsdp": 4, "tensor": 1} (missing axes are 1)."""
    sizes = dict.fromkeys(AXES, 1)
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in AXES or not value.isdigit() or int(value) < 1:
            raise ConfigError(f"train.mesh={spec!r}: expected comma-separated AXIS=N with AXIS in "
                              f"{', '.join(AXES)} and N >= 1, got {item!r}")
        sizes[name] = int(value)
    return sizes


def make_mesh(spec: str = "", devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec)
    n = int(np.prod(list(sizes.values())))
    if n > len(devices):
        raise ConfigError(f"train.mesh={spec!r} needs {n} devices but {len(devices)} are available")
    return Mesh(np.array(devices[:n]).reshape([sizes[a] for a in AXES]), AXES)


def _fit(spec: tuple, shape: tuple, mesh: Mesh) -> P:
    """Drops an axis from a dimension it does not divide (small test models on big meshes)."""
    out = [a if a is not None and dim % mesh.shape[a] == 0 else None for a, dim in zip(spec, shape)]
    return P(*[a if a is None or mesh.shape[a] > 1 else None for a in out])


def param_specs(params, mesh: Mesh):
    """PartitionSpecs with the structure of `params` (arrays or ShapeDtypeStructs)."""
    return {k: param_specs(v, mesh) if isinstance(v, dict) else _fit(_RULES[k], v.shape, mesh)
            for k, v in params.items()}


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def state_shardings(state, params_spec, mesh: Mesh):
    """NamedShardings for any pytree holding copies of the params (optimizer moments): a leaf whose path ends
    with a parameter's path and has its shape gets that parameter's spec; everything else is replicated."""
    by_path = {}
    for path, spec in jax.tree_util.tree_flatten_with_path(params_spec, is_leaf=lambda x: isinstance(x, P))[0]:
        by_path[_path_names(path)] = spec

    def pick(path, leaf):
        names = _path_names(path)
        for n in range(len(names)):
            spec = by_path.get(names[n:])
            if spec is not None and len(spec) <= len(getattr(leaf, "shape", ())):
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(pick, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_size_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Per-process numpy batch -> global jax.Arrays sharded over the batch axes (works on one or many hosts)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
