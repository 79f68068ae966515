"""Rollout new-tokens/s at batch 1, 8 and 32: our decode engine against plain `model.generate`.

    python benchmarks/rollout.py --model tiny|smollm2 [--repeats 4] [--new-tokens 48]

Both sample from softmax(logits) (temperature 1, no top-k/top-p), stop a row at EOS and
are given the same chat-formatted prompts. Ours decodes the model as our stages prepare it
(`load_causal_lm`, then `rlhf.kernels.accelerate` with the default kernels: on CPUs where it
applies, linear layers through oneDNN); `generate` runs the plain `from_pretrained` model. The
process tunes host memory as our stages do (rlhf/kernels/host_memory.py), for both sides.
A new token is a response token up to and including EOS; what `generate` computes after a
row's EOS is not counted. Each cell is the median of `repeats` timed calls after one warm-up
call on the same prompts, the two sides alternating in ABBA order; the ratio is the median of
the repeats' ratios.
"""

from __future__ import annotations

import argparse
import itertools
import time

import common

common.add_project_to_path()

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402

from rlhf.data.records import Message  # noqa: E402
from rlhf.config_sections import KernelsConfig, ModelConfig  # noqa: E402
from rlhf.data.template import prompt_text  # noqa: E402
from rlhf.kernels import accelerate, configure_process  # noqa: E402
from rlhf.models.loading import load_causal_lm  # noqa: E402
from rlhf.rollout.decode import DecodeEngine  # noqa: E402
from rlhf.rollout.engine import SamplingParams, finish_rollout, left_pad  # noqa: E402


def plain_generate(model, tokenizer, prompts, new_tokens: int) -> int:
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    rollout = finish_rollout(ids, mask, out[:, ids.shape[1]:], tokenizer.eos_token_id, tokenizer.pad_token_id)
    return int(rollout.response_mask.sum())


def timed(call):
    """`call` timed, returning (seconds, new tokens); its i-th run is seeded with i, so both
    sides sample with the same seeds, in whichever order they run."""
    calls = itertools.count()

    def run() -> tuple[float, int]:
        torch.manual_seed(next(calls))
        started = time.perf_counter()
        tokens = call()
        return time.perf_counter() - started, tokens

    return run


def measure(ours, peer, repeats: int) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
    """(seconds, new tokens) of `repeats` calls of each side after one warm-up call each, in ABBA order."""
    ours(), peer()
    return common.alternate(repeats, timed(ours), timed(peer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=sorted(common.SCALES))
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=None)
    args = parser.parse_args()
    scale = common.SCALES[args.model]
    configure_process(KernelsConfig())
    new_tokens = args.new_tokens or scale.ppo_new_tokens
    directory = common.model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    records = common.make_records("prompt", 32, scale)
    encoded = [tokenizer(prompt_text(tokenizer, [Message("user", r["prompt"])]), add_special_tokens=False)["input_ids"]
               for r in records]
    ours_model = load_causal_lm(ModelConfig(path=str(directory)), torch.device("cpu"), dtype=torch.float32).eval()
    accelerate(ours_model, KernelsConfig())
    engine = DecodeEngine(ours_model, tokenizer.eos_token_id, tokenizer.pad_token_id, batch_size=32)
    params = SamplingParams(max_new_tokens=new_tokens)

    rows = []
    with torch.no_grad():
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = encoded[:batch]
            ours_runs, peer_runs = measure(lambda: int(engine.generate(prompts, params).response_mask.sum()),
                                           lambda: plain_generate(model, tokenizer, prompts, new_tokens), args.repeats)
            ours_rates = [tokens / seconds for seconds, tokens in ours_runs]
            peer_rates = [tokens / seconds for seconds, tokens in peer_runs]
            ours_tokens = common.median([t for _, t in ours_runs])
            peer_tokens = common.median([t for _, t in peer_runs])
            rows.append({"model": args.model, "batch": batch, "new_tokens": new_tokens,
                         "ours_tokens_per_s": common.median(ours_rates),
                         "generate_tokens_per_s": common.median(peer_rates),
                         "ratio": common.paired_ratio(ours_rates, peer_rates),
                         "ours_seconds": common.median([s for s, _ in ours_runs]),
                         "generate_seconds": common.median([s for s, _ in peer_runs]),
                         "ours_mean_length": ours_tokens / batch, "generate_mean_length": peer_tokens / batch})
    common.emit(f"rollout_{args.model}", rows, ["model", "batch", "ours_tokens_per_s", "generate_tokens_per_s", "ratio",
                                                "ours_mean_length", "generate_mean_length"],
                {"repeats": args.repeats})


if __name__ == "__main__":
    main()
