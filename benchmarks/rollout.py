"""Rollout new-tokens/s at batch 1, 8 and 32: our decode engine against plain `model.generate`.

    python benchmarks/rollout.py --model tiny|smollm2 [--repeats 3] [--new-tokens 48]

Both sample from softmax(logits) (temperature 1, no top-k/top-p), stop a row at EOS and
are given the same chat-formatted prompts. A new token is a response token up to and
including EOS; what `generate` computes after a row's EOS is not counted. Each cell is the
median of `repeats` timed calls after one warm-up call on the same prompts.
"""

from __future__ import annotations

import argparse
import time

import common

common.add_project_to_path()

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402

from rlhf.data.records import Message  # noqa: E402
from rlhf.data.template import prompt_text  # noqa: E402
from rlhf.rollout.decode import DecodeEngine  # noqa: E402
from rlhf.rollout.engine import SamplingParams, finish_rollout, left_pad  # noqa: E402


def plain_generate(model, tokenizer, prompts, new_tokens: int) -> int:
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    rollout = finish_rollout(ids, mask, out[:, ids.shape[1]:], tokenizer.eos_token_id, tokenizer.pad_token_id)
    return int(rollout.response_mask.sum())


def measure(call, repeats: int) -> tuple[float, float]:
    """(median seconds, median new tokens) of `repeats` calls after a warm-up call."""
    call()
    seconds, tokens = [], []
    for repeat in range(repeats):
        torch.manual_seed(repeat)
        started = time.perf_counter()
        tokens.append(call())
        seconds.append(time.perf_counter() - started)
    return common.median(seconds), common.median(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=sorted(common.SCALES))
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=None)
    args = parser.parse_args()
    scale = common.SCALES[args.model]
    new_tokens = args.new_tokens or scale.ppo_new_tokens
    directory = common.model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    records = common.make_records("prompt", 32, scale)
    encoded = [tokenizer(prompt_text(tokenizer, [Message("user", r["prompt"])]), add_special_tokens=False)["input_ids"]
               for r in records]
    engine = DecodeEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, batch_size=32)
    params = SamplingParams(max_new_tokens=new_tokens)

    rows = []
    with torch.no_grad():
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = encoded[:batch]
            ours_s, ours_tokens = measure(lambda: int(engine.generate(prompts, params).response_mask.sum()), args.repeats)
            peer_s, peer_tokens = measure(lambda: plain_generate(model, tokenizer, prompts, new_tokens), args.repeats)
            ours, peer = ours_tokens / ours_s, peer_tokens / peer_s
            rows.append({"model": args.model, "batch": batch, "new_tokens": new_tokens,
                         "ours_tokens_per_s": ours, "generate_tokens_per_s": peer, "ratio": common.ratio(ours, peer),
                         "ours_seconds": ours_s, "generate_seconds": peer_s,
                         "ours_mean_length": ours_tokens / batch, "generate_mean_length": peer_tokens / batch})
    common.emit(f"rollout_{args.model}", rows, ["model", "batch", "ours_tokens_per_s", "generate_tokens_per_s", "ratio",
                                                "ours_mean_length", "generate_mean_length"],
                {"repeats": args.repeats})


if __name__ == "__main__":
    main()
