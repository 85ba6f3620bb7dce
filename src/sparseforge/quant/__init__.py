"""Quantization that keeps zeros zero: weight-only round-to-nearest int8/int4 (:mod:`.rtn`),
GPTQ with calibration data (:mod:`.gptq`), dynamic int8 for CPU inference (:mod:`.dynamic`), LSQ quantization-aware training (:mod:`.qat`)."""

from sparseforge.quant.rtn import (
    DEFAULT_GROUP_SIZE, SCHEMES, QuantizedTensor, QuantScheme, dequantize, pack_int4, quantization_of, quantize_,
    quantize_weight, rounded_to_zero, unpack_int4,
)
from sparseforge.quant.gptq import GPTQReport, gptq_
from sparseforge.quant.dynamic import dynamic_int8_available, quantize_dynamic_int8
from sparseforge.quant.qat import lsq_fake_quantize, lsq_init_step, qat_convert, qat_prepare

__all__ = [
    "DEFAULT_GROUP_SIZE", "SCHEMES", "QuantScheme", "QuantizedTensor", "dequantize", "pack_int4", "quantization_of",
    "quantize_", "quantize_weight", "rounded_to_zero", "unpack_int4",
    "GPTQReport", "gptq_",
    "dynamic_int8_available", "quantize_dynamic_int8", "lsq_fake_quantize", "lsq_init_step", "qat_convert",
    "qat_prepare",
]
