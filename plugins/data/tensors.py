"""What a tensor header promises about its bytes, checked on both sides of the wire.

A tensor payload is viewed in place: the client hands out
``as_strided(buffer, shape, strides)``, which reads wherever the strides
point. So the description must fit the bytes before anything is viewed.
The plane checks it at admission (against the declared size) and at the
release of a quarantined payload (against the bytes actually stored); the
client checks it again against the bytes it received, because a reader must
not trust its server with its own memory.

Strides are offsets from the first byte of the payload, as ``as_strided``
applies them. A negative stride is allowed only where it stays inside the
payload, which from the first byte means only on a dimension of length 0 or
1: a reversed view would need a base offset, which :class:`TensorInfo` does
not carry. So the check is on the reach, the lowest and highest byte any
element touches, negative strides included; it refuses one that starts
before byte 0 or ends past the payload's size.
"""

from __future__ import annotations

import math

import numpy as np

from planes.data.v1 import data_service_pb2 as pb

__all__ = ["MAX_DIMENSIONS", "MAX_DTYPE_CHARS", "TensorLayoutError", "check_layout", "element_type"]

#: Longer dtype strings are refused unparsed; a type name (even a small structured one) is far shorter.
MAX_DTYPE_CHARS = 256
#: NumPy 1's limit on dimensions (NumPy 2 allows 64); a header within it is viewable by either.
MAX_DIMENSIONS = 32
#: An array's byte size must fit a signed 64-bit index.
_MAX_ARRAY_BYTES = (1 << 63) - 1


class TensorLayoutError(ValueError):
    """A tensor description that its bytes cannot back; the message names the field and the numbers."""


def element_type(name: str) -> np.dtype:
    """The NumPy dtype named ``name``, if it is a fixed-size element type."""
    if len(name) > MAX_DTYPE_CHARS:
        raise TensorLayoutError(f"tensor dtype is {len(name)} characters long, over the {MAX_DTYPE_CHARS} a "
                                "type name may have")
    try:
        dtype = np.dtype(name)
    except Exception:  # TypeError, ValueError or SyntaxError, depending on how the string is malformed
        raise TensorLayoutError(f"tensor dtype {name[:32]!r} is not a NumPy/Arrow type name") from None
    if dtype.hasobject or dtype.itemsize == 0:
        raise TensorLayoutError(f"tensor dtype {name[:32]!r} has no fixed-size bytes to view")
    if dtype.shape:  # a sub-array type would add dimensions the shape and strides do not describe
        raise TensorLayoutError(f"tensor dtype {name[:32]!r} is a sub-array type; its dimensions belong in "
                                "the shape")
    return dtype


def check_layout(tensor: pb.TensorInfo, size: int, *, what: str = "the payload's") -> np.dtype:
    """The tensor's dtype, once its shape and strides are known to stay within ``size`` bytes.

    ``what`` says whose size it is, for the message: the declared, the stored
    or the received bytes.
    """
    dtype = element_type(tensor.dtype)
    shape, strides = tuple(tensor.shape), tuple(tensor.strides)
    if len(shape) > MAX_DIMENSIONS:
        raise TensorLayoutError(f"tensor shape has {len(shape)} dimensions, over the {MAX_DIMENSIONS} allowed")
    if any(d < 0 for d in shape):
        raise TensorLayoutError(f"tensor shape {shape} has a negative dimension")
    count = math.prod(shape)
    if count * dtype.itemsize > _MAX_ARRAY_BYTES:
        raise TensorLayoutError(f"tensor shape {shape} of {tensor.dtype} spans {count * dtype.itemsize} bytes, "
                                "more than an array can index")
    if not strides:
        if count * dtype.itemsize != size:
            raise TensorLayoutError(f"a C-contiguous {tensor.dtype} tensor of shape {shape} is "
                                    f"{count * dtype.itemsize} bytes, not {what} {size}")
        return dtype
    if len(strides) != len(shape):
        raise TensorLayoutError(f"tensor strides ({len(strides)}) and shape ({len(shape)}) differ in length")
    if count == 0:
        return dtype  # no element, so no byte is touched
    low = sum((d - 1) * s for d, s in zip(shape, strides) if s < 0)
    high = sum((d - 1) * s for d, s in zip(shape, strides) if s > 0) + dtype.itemsize
    if low < 0:
        raise TensorLayoutError(f"tensor strides {strides} with shape {shape} reach {-low} bytes before the "
                                "payload's first byte")
    if high > size:
        raise TensorLayoutError(f"tensor strides {strides} with shape {shape} of {tensor.dtype} reach {high} "
                                f"bytes, past {what} {size}")
    return dtype
