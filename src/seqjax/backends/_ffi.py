"""``jax.ffi.ffi_call`` for seqjax's kernels, with an error a user can act on when a transformation cannot pass."""
from __future__ import annotations

import functools

import jax

__all__ = ["HIGHER_ORDER_FIX", "ffi_call"]

HIGHER_ORDER_FIX = ("pass kernel='xla' (XLA's loop with seqjax's custom VJP is differentiable again: grad of grad, "
                    "jax.hessian), or kernel='xla', backward='autodiff' for forward mode as well")


def ffi_call(target: str, result_shape_dtypes, **kwargs):
    """`jax.ffi.ffi_call`, whose call raises a seqjax TypeError where JAX would differentiate the kernel itself.

    seqjax's kernels are differentiable once, in reverse mode, through their
    `jax.custom_vjp`; differentiating that again (grad of grad, `jax.hessian`)
    reaches the FFI call, which JAX cannot differentiate.
    """
    call = jax.ffi.ffi_call(target, result_shape_dtypes, **kwargs)

    @functools.wraps(call)
    def checked(*args, **attrs):
        try:
            return call(*args, **attrs)
        except ValueError as e:
            if "cannot be differentiated" not in str(e):
                raise
            raise TypeError(f"seqjax.scan: the native kernel {target!r} is differentiable once, in reverse mode "
                            f"(jax.grad, jax.vjp); a second derivative (grad of grad, jax.hessian) or forward mode "
                            f"reached it: {HIGHER_ORDER_FIX}") from None
    return checked
