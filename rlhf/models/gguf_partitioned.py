"""A GGUF file into a model partitioned by ZeRO-3 (built under zero.Init), one tensor at a time:
rank 0 dequantises a tensor, every rank gathers that one parameter, rank 0 writes it, and it is
partitioned again (`Placement.modify`: DeepSpeed's GatheredParameters). Besides its partition a
rank holds one full tensor at a time (two on rank 0: the dequantised value and the gathered
parameter), where transformers' own GGUF loading builds the model on the meta device and
dequantises the whole file on every rank.

The tensors are converted as transformers converts them for the architectures of its GGUF name
map (`modeling_gguf_pytorch_utils`: the gguf package's dequantiser, transformers'
per-architecture tensor processor and name map), so the weights are those of
`from_pretrained(gguf_file=...)`. Only rank 0 opens the tensor data; it tells the other ranks
which parameter comes next (`Placement.from_main`), since the file's order is not the model's.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from rlhf.errors import UserError
from rlhf.models.loading import Placement

_END, _FAILED = -1, -2


def supports(gguf_path: str) -> bool:
    """Whether this file's architecture is read by transformers' GGUF name map (those it reads
    through its newer block-keeping loader instead are loaded whole by `from_pretrained`)."""
    from transformers.integrations.gguf.reader import read_gguf_metadata
    from transformers.integrations.gguf.utils import is_gguf_arch_supported

    try:
        metadata, _ = read_gguf_metadata(gguf_path)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"model.gguf_file: {gguf_path}: {str(exc).splitlines()[0]}") from None
    return not is_gguf_arch_supported(metadata["general.architecture"])


def load_gguf_partitioned(model: torch.nn.Module, gguf_path: str, placement: Placement) -> set[str]:
    """Fill the partitioned `model` from `gguf_path`; the names of the parameters the file does
    not hold (a new scalar head), each parameter once."""
    names: list[str] = []
    params: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        names.append(name)
        params.append(param)
    index = {name: i for i, name in enumerate(names)}
    filled: set[int] = set()
    value = None
    tensors = _dequantised(model, gguf_path) if placement.rank == 0 else iter(())
    error: Exception | None = None
    while True:
        message: list[int] = []
        if placement.rank == 0:
            try:
                name, value = next(tensors, (None, None))
                message = [_END] if name is None else [index[name]] if name in index else []
            except Exception as exc:  # noqa: BLE001 - the other ranks are told before it is raised
                error, message = exc, [_FAILED]
        message = placement.from_main(message)
        if message == [_FAILED]:
            if error is not None:
                raise error
            raise UserError(f"model.gguf_file: {gguf_path}: reading it failed on rank 0 (its message says why)")
        if message == [_END]:
            break
        if not message:  # a tensor of the file that the model does not have
            continue
        param = params[message[0]]
        with torch.no_grad(), placement.modify([param]):
            if placement.rank == 0:
                param.data.copy_(value.reshape(param.data.shape))
        filled.add(id(param))
        value = None
    first: dict[int, str] = {}
    for name, param in zip(names, params):
        first.setdefault(id(param), name)
    return {name for key, name in first.items() if key not in filled}


DEQUANTIZE_ROWS_BYTES = 16 << 20
"""fp32 bytes dequantised at a time: the gguf package's numpy dequantiser holds a few
temporaries the size of its output, which for a whole embedding were several hundred MB."""

_TYPED = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
          "I32": np.int32, "I64": np.int64}
"""ggml types stored as plain numbers (the others are blocks of bytes), as the gguf reader maps them."""


def _dequantised(model: torch.nn.Module, gguf_path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(model parameter name, value in the model's dtype) of each tensor of the file, one at a
    time, as transformers' GGUF loading converts them (`load_gguf_checkpoint`: the gguf
    package's dequantiser, the architecture's tensor processor, the GGUF name map). The table of
    tensors is read without the metadata's vocabulary, and each tensor's bytes are mapped only
    while it is converted: its pages leave the resident set with it."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape
    from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    try:
        metadata, _ = read_gguf_metadata(gguf_path)
        header = GgufHeader.from_file(gguf_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.gguf_file: {gguf_path}: {str(exc).splitlines()[0]}") from None
    # The processors read the model's config under transformers' names, as parsed from this file.
    processor = TENSOR_PROCESSORS.get(metadata["general.architecture"], TensorProcessor)(config=model.config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    dtype = next(model.parameters()).dtype
    # Processors that merge several tensors into one (MoE experts) collect them here.
    parsed: dict = {"config": model.config.to_dict(), "tensors": {}}
    for info in header.tensors:
        qtype = GGMLQuantizationType(info.ggml_type)
        raw = np.memmap(gguf_path, dtype=np.uint8, mode="r", offset=header.data_start + info.offset,
                        shape=(info.nbytes,))
        typed = _TYPED.get(qtype.name)
        data = raw.view(typed).reshape(info.shape) if typed else raw.reshape(quant_shape_to_byte_shape(info.shape, qtype))
        result = processor.process(weights=_dequantize_by_rows(data, qtype, info.shape), name=info.name,
                                   tensor_key_mapping=names, parsed_parameters=parsed)
        del data, raw
        if result.name not in names:
            continue
        array = result.weights
        if not (array.flags.writeable and array.flags.c_contiguous):  # still a view of the mapped file
            array = np.copy(array)
        name, value = names[result.name], torch.from_numpy(array).to(dtype)
        del result, array  # only `value` stays alive while it is scattered, then not even that
        yield name, value
        del value
    for name, value in parsed.pop("tensors").items():
        yield name, torch.as_tensor(value).to(dtype)


def _dequantize_by_rows(data: np.ndarray, qtype, shape: tuple[int, ...]) -> np.ndarray:
    """`gguf.dequantize(data, qtype)` (fp32, `shape`), computed a slice of rows at a time into
    its output (ggml blocks never span two rows, so the values are the same)."""
    from gguf import dequantize

    if data.ndim < 2 or data.dtype != np.uint8:
        return dequantize(data, qtype)
    out = np.empty(shape, dtype=np.float32)
    rows = max(1, DEQUANTIZE_ROWS_BYTES // max(1, 4 * int(np.prod(shape[1:]))))
    for start in range(0, shape[0], rows):
        out[start:start + rows] = dequantize(data[start:start + rows], qtype)
    return out
