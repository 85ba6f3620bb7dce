"""The compressed checkpoint format (``.sfz``): a bitmask plus the packed nonzero values.

An ``.sfz`` file is a safetensors file (readable by any safetensors reader)
whose header metadata says ``format = "sparseforge-sfz"`` and holds, as JSON,
the format version, the zoo architecture (so :func:`load` rebuilds zoo models
from the file alone) and a description of every tensor. How a tensor is
stored (its *encoding*):

- Linear/Conv weights (``Linear``, ``Conv1d/2d/3d``) are stored in the
  value encoding chosen with ``values``:

  - ``"fp32"``: float32 values (bit-exact for float32 models);
  - ``"fp16"`` (default): float16 values (loading gives ``w.half()`` back in
    the weight's dtype); ``"bf16"``: bfloat16 values, the same way;
  - ``"int8"``: integer codes and float32 scales by the rule of
    :mod:`sparseforge.quant.rtn` (symmetric, per output channel, scales over
    the kept weights, zeros stay zero; a kept weight under half a step rounds to zero). A layer
    quantized with :func:`sparseforge.quant.quantize_` is stored with the
    codes recorded there (its bits and group size: int4 codes are packed two
    per byte), so loading gives exactly its fake-quantized weight; other
    layers get per-channel int8. ``"int4"`` is the same with per-channel
    int4 for layers not quantized before.

  A weight with zeros is stored as ``NAME#mask`` (uint8, ``np.packbits`` of
  ``weight != 0`` in row-major order, most significant bit first) and
  ``NAME#values`` (the nonzero values in row-major order), when that is
  smaller than storing every value (``encoding: "bitmask"``); otherwise as
  ``NAME#values`` holding every value (``encoding: "dense"``). Quantized
  weights add ``NAME#scale`` (float32, ``[out, n_groups]``).
- A :class:`~sparseforge.kernels.packed.PackedLinear` (what
  :func:`sparseforge.to_sparse` and ``load(..., packed=True)`` give) is
  stored as the Linear weight it packs, in the bitmask encoding with its
  own values (fp32, bf16 or per-channel int8, whatever ``values`` says):
  its mask words are the same bits as ``NAME#mask`` (one byte-wise bit
  reversal apart), its values the same stream, so saving and loading packed
  layers never builds a dense weight.
- Every other tensor (biases, norm parameters and buffers, embeddings) is
  stored as is, under its own name and in its own dtype (``encoding: "raw"``):
  they are small, and rounding a norm's statistics to fp16 buys little and
  can cost accuracy.

Per tensor the metadata holds its shape, dtype, encoding, value encoding,
number of nonzeros, zero pattern when recognised (``unstructured``,
``N:M``, ``channel``), quantization (bits, group size) and the SHA-256 of
the bytes of each stored part, so that a corrupted part is detected and
named; the raw metadata also holds ``header_sha256``, the SHA-256 of the
whole header (:func:`sparseforge.formats.header_digest`), so that
a flipped byte in the metadata is detected too (files written before it
still load). Writes are atomic (:func:`sparseforge.files.write_safetensors`). The entropy bound that the size benchmark
(``python -m sparseforge.bench size``) compares with is ``n H(density)``
bits for the mask plus the value bits of the nonzeros; with fp16 values
this format stays within 1.3x of it at 90% sparsity.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.files import write_safetensors
from sparseforge.formats import (
    FORMATS, FileFormat, check_options, open_checked, safetensors_metadata, seal_metadata, tensor_digest,
)
from sparseforge.io.checkpoint import arch_metadata, model_for
from sparseforge.kernels.dense import BF16Linear, Int8Linear
from sparseforge.kernels.packed import PackedLinear, PackedWeight
from sparseforge.kernels.sparse_linear import SparseLinear
from sparseforge.targets import set_submodule
from sparseforge.quant.rtn import (
    QUANT_ATTR, QuantizedTensor, dequantize, pack_int4, quantization_of, quantize_weight, unpack_int4,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "VALUES", "is_sfz", "load", "load_sfz", "pattern_of", "read_sfz", "save"]

FORMAT = "sparseforge-sfz"
FORMAT_VERSION = 1
VALUES = ("fp32", "fp16", "bf16", "int8", "int4")
_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FLOAT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}
_ENCODINGS = ("raw", "bitmask", "dense")  # every encoding any version wrote
# The raw metadata entries of files written before the header digest (see checkpoint.check_header).
_LEGACY_KEYS = frozenset({"format", "format_version", "sfz"})


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def pattern_of(w: torch.Tensor) -> str:
    """The zero pattern of a weight, when recognisable: ``dense``, ``channel``, ``N:M`` or ``unstructured``.

    ``channel``: the zeros are whole output channels. ``N:M`` (M in 4, 8,
    16, the first that fits): every M consecutive inputs of a row hold
    exactly N nonzeros, N <= M/2 (what N:M pruning leaves; "at most N" would
    also match random sparsity by chance). Otherwise ``unstructured``.

        >>> pattern_of(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 4.0]]))
        '2:4'
    """
    nz = w != 0
    if bool(nz.all()):
        return "dense"
    rows = nz.reshape(w.shape[0], -1)
    if bool((rows.all(dim=1) | ~rows.any(dim=1)).all()):
        return "channel"
    for m in (4, 8, 16):
        if rows.shape[1] % m == 0:
            counts = rows.reshape(rows.shape[0], -1, m).sum(dim=2)
            n = int(counts.max())
            if n <= m // 2 and bool((counts == n).all()):
                return f"{n}:{m}"
    return "unstructured"


def _layer_weights(model: nn.Module, embeddings: str = "quantized") -> dict[str, nn.Module]:
    """Linear/Conv modules by weight name, plus Embedding tables: those with recorded
    quantization codes (``embeddings="quantized"``, when saving: other tables are stored
    as they are) or all of them (``"all"``, when loading codes back)."""
    def wanted(m: nn.Module) -> bool:
        if isinstance(m, _LAYERS):
            return True
        return isinstance(m, nn.Embedding) and (embeddings == "all" or quantization_of(m) is not None)

    return {f"{name}.weight" if name else "weight": m for name, m in model.named_modules() if wanted(m)}


def _encode_weight(
    name: str, w: torch.Tensor, module: nn.Module, values: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Stored parts and metadata of one Linear/Conv weight."""
    w = w.detach().cpu().contiguous()
    nz = w != 0
    nnz = int(nz.sum())
    info: dict[str, Any] = {"shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch."), "nnz": nnz,
                            "pattern": pattern_of(w)}
    parts: dict[str, torch.Tensor] = {}
    if values in _FLOAT:
        flat = w.reshape(-1).to(_FLOAT[values])
        kept, dense_vals, vbits = flat[nz.reshape(-1)], flat, 32 if values == "fp32" else 16
        info["values"] = values
    else:
        qt = quantization_of(module)
        if qt is None:
            qt = quantize_weight(w, bits=8 if values == "int8" else 4, group_size=None, name=name)
        qt = QuantizedTensor(qt.q.cpu(), qt.scale.cpu(), qt.bits, qt.group_size, qt.shape, qt.method)
        # quantizing here can round small kept weights to 0: store what the codes hold
        nz = qt.q != 0
        info["nnz"] = nnz = int(nz.sum())
        info["pattern"] = pattern_of(qt.dequantize())
        codes = qt.q.reshape(-1)
        if qt.bits == 4:
            kept, dense_vals = pack_int4(codes[nz.reshape(-1)]), pack_int4(codes)
        else:
            kept, dense_vals = codes[nz.reshape(-1)], codes
        vbits = qt.bits
        parts[f"{name}#scale"] = qt.scale.to(torch.float32).contiguous()
        info["values"] = f"int{qt.bits}"
        info["quant"] = {"bits": qt.bits, "group_size": qt.group_size, "scheme": f"{qt.method}-symmetric"}
    n = w.numel()
    mask_bytes = (n + 7) // 8
    if mask_bytes + math.ceil(nnz * vbits / 8) < math.ceil(n * vbits / 8):
        packed = np.packbits(nz.reshape(-1).numpy())
        parts[f"{name}#mask"] = torch.from_numpy(packed)
        parts[f"{name}#values"] = kept.contiguous()
        info["encoding"] = "bitmask"
    else:
        parts[f"{name}#values"] = dense_vals.contiguous()
        info["encoding"] = "dense"
    return parts, info


# the buffers of a PackedLinear that together are its weight (its bias is stored as any bias)
_PACKED_BUFFERS = frozenset({"mask", "values", "row_ptr", "scales", "_extra_state"})


def _stand_in(module: nn.Module) -> tuple[nn.Linear, str | None]:
    """An nn.Linear holding the weight a module of :func:`sparseforge.to_sparse` runs, and the value encoding
    that stores it exactly: bf16 values (BF16Linear), its int8 codes and (bf16) scales (Int8Linear), or
    None, the file's ``values`` (CSR/BSR modules, whose weights are the layer's own)."""
    if isinstance(module, SparseLinear):
        return module.to_dense(), None
    stand_in = nn.Linear(module.in_features, module.out_features, bias=False)
    if isinstance(module, BF16Linear):
        stand_in.weight.data = module.weight.detach().to(torch.float32)
        return stand_in, "bf16"
    qt = QuantizedTensor(module.codes.detach(), module.scales.detach().to(torch.float32).reshape(-1, 1), 8, None,
                         (module.out_features, module.in_features), "rtn")
    stand_in.weight.data = qt.dequantize()
    setattr(stand_in, QUANT_ATTR, qt)
    return stand_in, "int8"


def _encode_packed(name: str, module: PackedLinear) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Stored parts and metadata of a packed layer's weight: the bitmask encoding of its own buffers."""
    p = module.packed
    stream, vals = p.to_bitmask()
    bits = torch.from_numpy(np.unpackbits(stream, count=p.out_features * p.in_features).astype(bool))
    info: dict[str, Any] = {"shape": [p.out_features, p.in_features], "dtype": "float32", "nnz": p.nnz,
                            "pattern": pattern_of(bits.reshape(p.out_features, p.in_features)),
                            "values": p.value_dtype, "encoding": "bitmask"}
    parts = {f"{name}#mask": torch.from_numpy(stream), f"{name}#values": vals.contiguous()}
    if p.scales is not None:
        parts[f"{name}#scale"] = p.scales.reshape(-1, 1).to(torch.float32).contiguous()
        info["quant"] = {"bits": 8, "group_size": None, "scheme": "rtn-symmetric"}
    if module.dense_above is not None:
        info["dense_above"] = module.dense_above
    return parts, info


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    values: str = "fp16",
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` to a compressed ``.sfz`` file (bitmask + packed values), atomically.

    Args:
        model: the model (finalize a Sparsifier first: masks are not needed,
            the zeros are the mask).
        path: destination file (``.sfz`` by convention; any name works).
        values: how Linear/Conv weight values are stored: ``"fp16"``
            (default), ``"fp32"`` (bit-exact), ``"int8"`` or ``"int4"``
            (codes + scales; layers quantized with
            :func:`sparseforge.quant.quantize_` keep their recorded codes).
            Other tensors are always stored as they are.
        arch, arch_kwargs: zoo architecture and its arguments (default:
            inferred for zoo models), so that :func:`load` can rebuild it.
        extra: JSON-serialisable metadata to store.

    Returns the path written. See the module docstring for the layout.
    """
    if values not in VALUES:
        raise SparseforgeError(f"values must be one of {', '.join(VALUES)}, got {values!r}")
    arch, arch_kwargs = arch_metadata(model, arch, arch_kwargs)
    layers = _layer_weights(model)
    packed = {f"{n}." if n else "": m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    dense_paths = {f"{n}." if n else "": _stand_in(m) for n, m in model.named_modules()
                   if isinstance(m, (BF16Linear, Int8Linear, SparseLinear))}
    emitted: set[str] = set()
    stored: dict[str, torch.Tensor] = {}
    tensors: dict[str, dict[str, Any]] = {}
    for name, t in model.state_dict().items():
        module = layers.get(name)
        prefix, _, key = name.rpartition(".")
        prefix = f"{prefix}." if prefix else ""
        if prefix in packed and key in _PACKED_BUFFERS:
            if key != "mask":
                continue  # stored with the mask, as one weight
            name = f"{prefix}weight"
            parts, info = _encode_packed(name, packed[prefix])
        elif prefix in dense_paths and key != "bias":
            if prefix in emitted:
                continue  # the module's other parts (codes and scales, CSR arrays): stored as its one weight
            emitted.add(prefix)
            name = f"{prefix}weight"
            stand_in, how = dense_paths[prefix]
            parts, info = _encode_weight(name, stand_in.weight.detach(), stand_in, how or values)
        elif not isinstance(t, torch.Tensor):
            owner = type(model.get_submodule(prefix[:-1])).__name__ if prefix else type(model).__name__
            raise SparseforgeError(f"sfz cannot store {name!r} (a {type(t).__name__} in the state of a {owner}): "
                                   "convert that module back to nn.Linear first")
        elif module is not None and t.is_floating_point() and t.dim() >= 2:
            parts, info = _encode_weight(name, t, module, values)
        else:
            t = t.detach().cpu().contiguous().clone()
            parts = {name: t}
            info = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "encoding": "raw"}
        info["sha256"] = {k: tensor_digest(v) for k, v in parts.items()}
        info["bytes"] = sum(_nbytes(v) for v in parts.values())
        stored |= parts
        tensors[name] = info
    header = {
        "format_version": FORMAT_VERSION,
        "arch": arch or None,
        "arch_kwargs": arch_kwargs,
        "compact": getattr(model, "sparseforge_compact", None) or {},
        "extra": extra or {},
        "tensors": tensors,
    }
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "sfz": json.dumps(header, separators=(",", ":"))}
    return write_safetensors(path, stored, seal_metadata(meta, stored))


def is_sfz(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a safetensors file whose metadata says it is an sfz file (any version; its tensors
    are not read, so a damaged file that still says so is one, for :func:`read_sfz` to name the damage)."""
    meta = safetensors_metadata(path)
    return meta is not None and meta.get("format") == FORMAT


def _decode(p: Path, name: str, info: dict[str, Any], parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, QuantizedTensor | None]:
    shape = tuple(info["shape"])
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
        raise SparseforgeError(f"{p} is corrupted: tensor {name!r} has an unknown dtype {info['dtype']!r}")
    n = math.prod(shape)
    enc, venc = info.get("encoding"), info.get("values")
    # No version wrote other names (a newer version was refused before): a changed byte made this one.
    if enc not in _ENCODINGS:
        raise SparseforgeError(f"{p} is corrupted: tensor {name!r} has an unknown encoding {enc!r}; "
                               "write the file again")
    if venc not in VALUES:
        raise SparseforgeError(f"{p} is corrupted: tensor {name!r} has unknown values {venc!r}; write the file again")
    vals = parts[f"{name}#values"]
    if enc == "bitmask":
        bits = np.unpackbits(parts[f"{name}#mask"].numpy(), count=n).astype(bool)
        mask = torch.from_numpy(bits)
        nnz = int(mask.sum())
        if nnz != info.get("nnz", nnz):
            raise SparseforgeError(f"{p} is corrupted: the mask of tensor {name!r} has {nnz} nonzeros, "
                                   f"its metadata says {info['nnz']}")
    else:
        mask, nnz = None, n
    qt = None
    if venc in _FLOAT:
        flat_vals = vals
    else:
        flat_vals = unpack_int4(vals, nnz) if venc == "int4" else vals
    if flat_vals.numel() != nnz:
        raise SparseforgeError(f"{p} is corrupted: tensor {name!r} stores {flat_vals.numel()} values for {nnz} nonzeros")
    if mask is None:
        full = flat_vals.reshape(shape)
    else:
        full = torch.zeros(n, dtype=flat_vals.dtype)
        full[mask] = flat_vals
        full = full.reshape(shape)
    if venc in _FLOAT:
        return full.to(dtype), None
    q = info["quant"]
    qt = QuantizedTensor(full.to(torch.int8), parts[f"{name}#scale"].to(torch.float32), int(q["bits"]),
                         q.get("group_size"), shape, str(q.get("scheme", "rtn-symmetric")).split("-")[0])
    return dequantize(qt.q, qt.scale, qt.group_size).to(dtype), qt


def read_sfz(
    path: str | os.PathLike[str], packed_parts: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, QuantizedTensor]]:
    """Read and verify an sfz file: returns (state dict, metadata, quantization per weight name).

    The metadata has ``format_version``, ``arch``, ``arch_kwargs``,
    ``compact``, ``extra``, ``tensors`` (per tensor: shape, dtype, encoding,
    values, nnz, pattern, quant, sha256, bytes) and ``file_bytes``.

    Raises :class:`SparseforgeError`, naming the tensor where there is one,
    when the file is missing, not an sfz file (a training checkpoint of
    ``sparseforge train`` is named as such), written by a newer format
    version, truncated, missing a tensor, its header does not match its
    digest, or a stored part does not match its checksum.
   
    With ``packed_parts`` (a dict), 2-D weights stored as a bitmask with
    values a packed layer can run on (fp32, fp16, bf16, per-channel int8)
    are not decoded: their parts and metadata go there, by name, instead.
    """
    p = Path(path)
    with open_checked(p, tag=FORMAT, what="an sfz file", legacy_keys=_LEGACY_KEYS,
                      max_version=FORMAT_VERSION) as (f, raw, version):
        try:
            header = json.loads(raw["sfz"])
            keys = set(f.keys())
            stored: dict[str, torch.Tensor] = {}
            for name, info in header["tensors"].items():
                for part, digest in info["sha256"].items():
                    if part not in keys:
                        raise SparseforgeError(
                            f"{p} is missing part {part!r} of tensor {name!r}: the file is incomplete; write it again"
                        )
                    t = f.get_tensor(part)
                    if tensor_digest(t) != digest:
                        raise SparseforgeError(
                            f"{p} is corrupted: tensor {name!r} (part {part!r}) does not match its checksum; "
                            "write the file again from the model"
                        )
                    stored[part] = t
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            if isinstance(e, SparseforgeError):
                raise
            raise SparseforgeError(f"{p} is corrupted: malformed sfz metadata ({type(e).__name__}: {e})") from None
    state: dict[str, torch.Tensor] = {}
    quant: dict[str, QuantizedTensor] = {}
    try:
        for name, info in header["tensors"].items():
            if info["encoding"] == "raw" and name in stored:
                state[name] = stored[name]
                continue
            parts = {k: stored[k] for k in info["sha256"]}
            if packed_parts is not None and _packable(info):
                packed_parts[name] = {"info": info, "parts": parts}
                continue
            state[name], qt = _decode(p, name, info, parts)
            if qt is not None:
                quant[name] = qt
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, RuntimeError) as e:
        # Only a file without a header digest (written before there was one) gets here with
        # metadata that does not describe its tensors: the digest catches every changed byte.
        if isinstance(e, SparseforgeError):
            raise
        raise SparseforgeError(f"{p} is corrupted: its sfz metadata does not describe its tensors "
                               f"({type(e).__name__}: {e}); write the file again") from None
    meta = {k: header.get(k) for k in ("arch", "arch_kwargs", "compact", "extra", "tensors")}
    meta |= {"format_version": version, "file_bytes": p.stat().st_size}
    meta["arch_kwargs"] = meta["arch_kwargs"] or {}
    meta["compact"] = meta["compact"] or {}
    meta["extra"] = meta["extra"] or {}
    return state, meta, quant


def _packable(info: dict[str, Any]) -> bool:
    quant = info.get("quant") or {}
    return (info.get("encoding") == "bitmask" and len(info.get("shape", ())) == 2
            and (info.get("values") in _FLOAT or (info.get("values") == "int8" and quant.get("group_size") is None)))


def _pack_layers(path: str | os.PathLike[str], model: nn.Module, packed_parts: dict[str, dict[str, Any]],
                 state: dict[str, torch.Tensor], quant: dict[str, QuantizedTensor]) -> dict[str, Any]:
    """Swap the Linear layers whose weights are in ``packed_parts`` for PackedLinear; decode the rest into ``state``."""
    done: list[str] = []
    for name, entry in packed_parts.items():
        info, parts = entry["info"], entry["parts"]
        prefix = name.removesuffix(".weight")
        module = model.get_submodule(prefix) if name.endswith(".weight") else None
        if not isinstance(module, nn.Linear) or [module.out_features, module.in_features] != info["shape"]:
            state[name], qt = _decode(Path(path), name, info, parts)  # a bitmask weight of another kind of layer
            if qt is not None:
                quant[name] = qt
            continue
        vals = parts[f"{name}#values"]
        if info["values"] == "fp16":
            vals = vals.to(torch.float32)  # exact; save with values="bf16" to run on the bf16 kernels
        scales = parts.get(f"{name}#scale")
        try:
            weight = PackedWeight.from_bitmask(parts[f"{name}#mask"], vals, scales, *info["shape"])
        except SparseforgeError as e:
            raise SparseforgeError(f"{path} is corrupted: tensor {name!r}: {e}") from None
        bias = state.get(f"{prefix}.bias")
        layer = PackedLinear(weight, bias, info.get("dense_above"))
        set_submodule(model, prefix, layer)
        state.update({f"{prefix}.{k}": v for k, v in layer.state_dict().items()})
        done.append(prefix)
    dense = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    return {"layers": done, "dense": dense}


def load(path: str | os.PathLike[str], model: nn.Module | None = None, *, packed: bool = False) -> nn.Module:
    """Load an sfz file into ``model``, or into a new zoo model built from its metadata; returns the model.

    fp32 values load bit-exactly, fp16 values as ``w.half()`` in the weight's
    dtype, int8/int4 codes as their dequantized values; quantized layers get
    their codes recorded again (``module.sparseforge_quant``) so that saving
    with ``values="int8"`` writes the same codes. Errors as :func:`read_sfz`,
    and when the tensors do not fit the model.

    With ``packed=True`` the Linear layers whose weights the file stores as
    a bitmask become :class:`~sparseforge.kernels.packed.PackedLinear` built
    from the stored mask and values (no dense weight is decoded): fp32 and
    bf16 values run as they are, per-channel int8 codes with their scales,
    fp16 values as fp32 (exact; save with ``values="bf16"`` for the bf16
    kernels). Linear layers stored densely (too few zeros for a bitmask to
    be smaller), or with int4 or grouped codes, stay ``nn.Linear``: one
    warning names them.

    Example:
        >>> import tempfile, os, torch, sparseforge as sf
        >>> from sparseforge.zoo import build_model
        >>> model = build_model("lenet300")
        >>> _ = sf.prune(model, sparsity=0.9)
        >>> path = os.path.join(tempfile.mkdtemp(), "m.sfz")
        >>> _ = sf.save(model, path, values="fp32")
        >>> loaded = sf.load(path)
        >>> all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
        True
    """
    return load_sfz(path, model, packed=packed)[0]


def load_sfz(path: str | os.PathLike[str], model: nn.Module | None = None, *,
             packed: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load`, also returning the file's metadata (as :func:`read_sfz`): (model, metadata).

    With ``packed=True`` the metadata also has ``packed``: the layers packed
    (``layers``) and the Linear layers left dense (``dense``).
    """
    packed_parts: dict[str, dict[str, Any]] | None = {} if packed else None
    state, meta, quant = read_sfz(path, packed_parts)
    model = model_for(path, meta, model)
    if packed_parts is not None:
        meta["packed"] = _pack_layers(path, model, packed_parts, state, quant)
        if meta["packed"]["dense"]:
            left = meta["packed"]["dense"]
            warnings.warn(
                f"{path}: {len(left)} Linear layer(s) stay dense (stored without a bitmask, or with int4 / "
                f"grouped codes): {', '.join(left[:6])}{' ...' if len(left) > 6 else ''}", UserWarning, stacklevel=2)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise SparseforgeError(f"{path} does not fit the model: {' '.join(first)}") from None
    for name, module in _layer_weights(model, embeddings="all").items():
        if name in quant:
            setattr(module, QUANT_ATTR, quant[name])
        elif hasattr(module, QUANT_ATTR):
            delattr(module, QUANT_ATTR)
    return model, meta


class SfzFormat(FileFormat):
    """The compressed format: Linear/Conv weights as a bitmask plus packed fp16/bf16/fp32/int8/int4 values, the
    rest as is, in a safetensors file; written for names ending in `.sfz` (`packed=True` loads into packed layers)."""

    name = "sfz"
    suffixes = (".sfz",)
    noun = "an sfz file"
    tag = FORMAT

    def detect(self, path: Path) -> bool:
        """:func:`is_sfz`: the file's metadata says ``format: sparseforge-sfz`` (whatever its name)."""
        return is_sfz(path)

    def save(self, model: nn.Module, path: str | os.PathLike[str], *, values: str = "fp16", arch: str | None = None,
             arch_kwargs: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
        """:func:`save`: ``values`` is ``fp16`` (default), ``fp32`` (exact), ``int8`` or ``int4``."""
        return save(model, path, values=values, arch=arch, arch_kwargs=arch_kwargs, extra=extra)

    def load(self, path: str | os.PathLike[str], model: nn.Module | None = None,
             **options: Any) -> tuple[nn.Module, dict[str, Any]]:
        """:func:`load_sfz`, given ``options`` unchanged (whatever options it takes)."""
        check_options(load_sfz, options, "the sfz reader (sparseforge.io.sfz.load_sfz)")
        return load_sfz(path, model, **options)


SFZ = FORMATS.register(SfzFormat())
"""The ``sfz`` entry of :data:`~sparseforge.formats.FORMATS`."""
