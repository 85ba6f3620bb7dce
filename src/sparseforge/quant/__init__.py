"""Quantization that keeps zeros zero: weight-only round-to-nearest int8/int4 (:mod:`.rtn`)."""

from sparseforge.quant.rtn import (
    DEFAULT_GROUP_SIZE, SCHEMES, QuantizedTensor, dequantize, pack_int4, quantization_of, quantize_,
    quantize_weight, unpack_int4,
)

__all__ = [
    "DEFAULT_GROUP_SIZE", "SCHEMES", "QuantizedTensor", "dequantize", "pack_int4", "quantization_of",
    "quantize_", "quantize_weight", "unpack_int4",
]
