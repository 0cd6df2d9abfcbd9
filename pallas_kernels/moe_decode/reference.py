"""Plain-jnp reference of `moe_decode`: one token's MoE block (docs/SPEC.md §7) as the model runs it
op by op, from the references of the kernels it fuses (`pallas_kernels.matvec`, `.router`, `.moe`)."""

import jax
import jax.numpy as jnp

from pallas_kernels.matvec import reference as matvec
from pallas_kernels.moe.reference import swiglu
from pallas_kernels.router import reference as router_reference


def moe_decode(x, norm_weight, router, bias, gate_up, gate_up_scale, down, down_scale, index, *, eps, top_k,
               n_group, topk_group, scaling, rounding=None):
    """Arguments as `api.moe_decode` -> (out [1, K] x.dtype, ids [top_k] int32, weights [top_k]
    float32)."""
    first, mine = index[3], index[4]
    normed = matvec.rms_norm(x, norm_weight[index[0]], eps)                                # [1, K]
    logits = jnp.dot(normed.astype(jnp.float32), router[index[1]].astype(jnp.float32), precision="highest")
    bias = bias[index[2]] if rounding is None else bias[index[2]].astype(rounding).astype(jnp.float32)
    ids, weights = router_reference.select_experts(jax.nn.sigmoid(logits), bias, top_k=top_k, n_group=n_group,
                                                   topk_group=topk_group, scaling=scaling)
    pairs = jnp.concatenate([ids[0] + first, (gate_up[0].shape[0] + mine)[None]])          # the shared one last
    y = matvec.matvec(normed[None], gate_up, pairs, scale=gate_up_scale).astype(x.dtype)  # [P, 1, 2 I]
    y = matvec.matvec(swiglu(y), down, pairs, scale=down_scale).astype(x.dtype)[:, 0]    # [P, K]
    routed = jnp.sum(y[:top_k].astype(jnp.float32) * weights[0][:, None], axis=0).astype(x.dtype)
    return (routed + y[top_k])[None], ids[0], weights[0]
