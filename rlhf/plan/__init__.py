"""Memory/batch planner: `rlhf plan STAGE --config FILE` estimates, before anything is loaded,
the memory each worker needs for the chosen strategy and batch sizes, and refuses (exit 3) a
config that cannot fit, with the changes that would make it fit.

The model is never loaded: its config is read and the model is instantiated on the meta device
to count parameters exactly; everything else is arithmetic. One module per job, each importing
only the ones below it:

- `cli`: the command's arguments, the table / JSON output and the refusal;
- `suggest`: single changes that make a plan fit, each re-estimated;
- `memory`: the plan's components (weights, gradients, optimizer states, activations, frozen
  models, KV cache) and `estimate`, which builds it;
- `strategy`: bytes per element under the strategy's precision, and what it shards or offloads;
- `devices`: the default device type, device memory and worker count;
- `shapes`: the model's sizes and exact parameter count;
- `units`: GiB, and how sizes and counts read as text.

Importing the package imports neither torch nor transformers: they are imported inside the
functions that need them.
"""

from rlhf.plan.cli import add_plan_parser, format_plan, plan_to_dict, refusal, run_plan
from rlhf.plan.devices import default_workers, detect_device_memory, detect_device_type
from rlhf.plan.memory import (
    GATHERED_LAYERS,
    LOGIT_BYTES,
    SAFETY_MARGIN,
    STAGES,
    Bytes,
    Component,
    Plan,
    activation_bytes,
    estimate,
    layer_activation_bytes,
)
from rlhf.plan.shapes import ModelShape, count_parameters, lora_params
from rlhf.plan.strategy import (
    Precision,
    Sharding,
    describe_strategy,
    model_bytes,
    precision,
    resolve_mixed_precision,
    sharding,
)
from rlhf.plan.suggest import LORA_RANK, MAX_WORKERS, SUGGESTERS, Suggestion, plan_suggestions, reestimate, suggestions
from rlhf.plan.units import GiB, size

__all__ = [
    "GATHERED_LAYERS", "GiB", "LOGIT_BYTES", "LORA_RANK", "MAX_WORKERS", "SAFETY_MARGIN", "STAGES", "SUGGESTERS",
    "Bytes", "Component", "ModelShape", "Plan", "Precision", "Sharding", "Suggestion",
    "activation_bytes", "add_plan_parser", "count_parameters", "default_workers", "describe_strategy",
    "detect_device_memory", "detect_device_type", "estimate", "format_plan", "layer_activation_bytes", "lora_params",
    "model_bytes", "plan_suggestions", "plan_to_dict", "precision", "reestimate", "refusal",
    "resolve_mixed_precision", "run_plan", "sharding", "size", "suggestions",
]
