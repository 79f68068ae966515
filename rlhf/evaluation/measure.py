"""One model's numbers in `rlhf eval`: load it, sample its answers, and measure them (judges,
KL to the reference, length, EOS rate, repetition, reference overlaps, perplexity)."""

from __future__ import annotations

from typing import Sequence

import torch

from rlhf.config import EvalConfig
from rlhf.config_sections import ModelConfig
from rlhf.data.prompt_dataset import prompt_batch
from rlhf.data.records import PromptRecord
from rlhf.errors import UserError
from rlhf.evaluation.judges import Judge
from rlhf.evaluation.metrics import bleu, mean, repetition_rate, rouge_l
from rlhf.evaluation.policy import answer_kl, perplexity, sample_answers
from rlhf.rollout.engine import SamplingParams


def load_policy(cfg: ModelConfig, device: torch.device, eval_cfg: EvalConfig):
    from rlhf.kernels import accelerate
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, device).eval()
    accelerate(model, eval_cfg.kernels)
    return model, tokenizer


def measure_model(cfg: ModelConfig, reference: ModelConfig | None, records: Sequence[PromptRecord],
                  judges: Sequence[Judge], references: list[str] | None, pretrain: list[str], eval_cfg: EvalConfig,
                  device: torch.device) -> tuple[dict[str, float], dict[str, list[float]], list[str]]:
    """(metrics, each judge's per-answer scores, the answers) of the model at `cfg`."""
    model, tokenizer = load_policy(cfg, device, eval_cfg)
    prompts = prompt_batch(tokenizer, records, eval_cfg.max_prompt_length)
    params = SamplingParams(eval_cfg.max_new_tokens, eval_cfg.temperature, 0, eval_cfg.top_p)
    answers = sample_answers(model, tokenizer, prompts.ids, params, eval_cfg.seed, eval_cfg.batch_size,
                             eval_cfg.kernels.llama_decode_step)
    finished = answers.eos_found.tolist()
    scores = {judge.name: judge(records, answers.texts, finished) for judge in judges}
    metrics = {f"reward/{name}": mean(values) for name, values in scores.items()}
    metrics["length"] = float(answers.lengths.float().mean())
    metrics["eos_rate"] = float(answers.eos_found.float().mean())
    metrics["repetition"] = repetition_rate(answers.texts, eval_cfg.repetition_ngram)
    if references is not None:
        metrics["rouge_l"] = mean(rouge_l(answers.texts, references))
        metrics["bleu"] = bleu(answers.texts, references)
    if reference is not None:
        ref_model, _ = load_policy(reference, device, eval_cfg)
        if ref_model.config.vocab_size != model.config.vocab_size:
            raise UserError(f"reference.path={reference.path}: its vocabulary ({ref_model.config.vocab_size}) is not "
                            f"the policy's ({model.config.vocab_size}); the KL needs one tokenizer")
        metrics["kl"] = float(answer_kl(model, ref_model, answers.rollout, eval_cfg.temperature,
                                        eval_cfg.batch_size).mean())
        del ref_model
    if pretrain:
        metrics["perplexity"] = perplexity(model, tokenizer, pretrain, eval_cfg.pretrain_max_length,
                                           eval_cfg.batch_size)
    return metrics, scores, answers.texts
