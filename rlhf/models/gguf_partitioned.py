"""A GGUF file into a model partitioned by ZeRO-3 (built under zero.Init), one tensor at a time:
rank 0 dequantises a tensor, every rank gathers that one parameter, rank 0 writes it, and it is
partitioned again (`Placement.modify`: DeepSpeed's GatheredParameters). No rank holds more than
its partition plus one full tensor (two on rank 0: the dequantised value and the gathered
parameter), where transformers' own GGUF loading builds the model on the meta device and
dequantises the whole file on every rank.

The file is read as transformers reads it for the architectures of its GGUF name map
(`modeling_gguf_pytorch_utils`: the gguf package's reader and dequantiser, transformers'
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

_END = -1


def supports(gguf_path: str) -> bool:
    """Whether this file's architecture is read by transformers' GGUF name map (those it reads
    through its newer block-keeping loader instead are loaded whole by `from_pretrained`)."""
    from transformers.integrations.gguf.reader import read_gguf_metadata
    from transformers.integrations.gguf.utils import is_gguf_arch_supported

    metadata, _ = read_gguf_metadata(gguf_path)
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
    while True:
        if placement.rank == 0:
            name, value = next(tensors, (None, None))
            message = [_END] if name is None else [index[name]] if name in index else []
        else:
            message = []
        message = placement.from_main(message)
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


def _dequantised(model: torch.nn.Module, gguf_path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(model parameter name, value in the model's dtype) of each tensor of the file, one at a
    time, as transformers' GGUF loading converts them."""
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, load_gguf_checkpoint,
                                                          read_field)

    try:
        parsed = load_gguf_checkpoint(gguf_path, return_tensors=False)
        reader = GGUFReader(gguf_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.gguf_file: {gguf_path}: {str(exc).splitlines()[0]}") from None
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    names = get_gguf_hf_weights_map(model, processor)
    dtype = next(model.parameters()).dtype
    # Processors that merge several tensors into one (MoE experts) collect them here.
    parsed["tensors"] = {}
    for tensor in reader.tensors:
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters=parsed)
        if result.name not in names:
            continue
        array = result.weights
        if not (array.flags.writeable and array.flags.c_contiguous):  # a view of the mapped file
            array = np.copy(array)
        name, value = names[result.name], torch.from_numpy(array).to(dtype)
        del result, array  # only `value` stays alive while it is scattered, then not even that
        yield name, value
        del value
    for name, value in parsed.pop("tensors").items():
        yield name, torch.as_tensor(value).to(dtype)
