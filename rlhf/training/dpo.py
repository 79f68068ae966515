"""DPO training pieces: preference micro-batches that say where each answer token is predicted,
the answers' log-probs from one forward pass, the frozen reference (live, or precomputed once),
a step and the held-out evaluation (with, when the task has a rule, the gold reward of answers
sampled from the policy).

A micro-batch is a set of prompts, each with its K ranked answers, in either layout of the RM
stage (rlhf/data/rank_dataset.py): one row per answer, or one row [prompt, answer 1, ...,
answer K] per prompt with the block mask of rlhf/models/shared_prefix.py. Every answer is
forwarded once per step and all C(K,2) untied pairs of its prompt are formed from those K
log-probs by index. In the shared row, answer k's first token is predicted at the prompt's
last position (one set of logits serves all K answers: the prompt alone is what each
[prompt, answer k] row sees there) and its later tokens at its own earlier positions, whose
attention reaches only the prompt and that answer, with positions restarting after the
prompt: the log-probs are those of K separate rows.
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from rlhf.algorithms import dpo_loss, per_prompt_mean
from rlhf.config import DPOConfig, DPOLossConfig
from rlhf.data.builders import load_records
from rlhf.data.order import EpochOrder
from rlhf.data.prompt_dataset import PromptBatch, prompt_batch
from rlhf.data.rank_dataset import RankBatch, RankExample, collate_rank, collate_rank_shared
from rlhf.data.records import PromptRecord, RankRecord
from rlhf.errors import UserError
from rlhf.kernels import accelerate
from rlhf.models.engines import reshard_frozen, unwrap_engine
from rlhf.models.kept_logits import forward_keeping
from rlhf.models.loading import disable_dropout, load_causal_lm
from rlhf.models.positions import position_ids_from_mask
from rlhf.models.reward import transformers_model
from rlhf.models.shared_prefix import shared_prefix_attention_mask
from rlhf.rollout.decode import DecodeEngine, SampleSeeds
from rlhf.rollout.engine import Collective, SamplingParams


@dataclass
class PreferenceBatch:
    rank: RankBatch
    """The sequences in either layout, and the pairs: `pair_index` (pairs, 2) (preferred,
    other) answers numbered over the micro-batch, `pair_group` (pairs,) their prompt."""
    token_source: torch.Tensor
    """(tokens,) flat index (row * seq + column) of the position whose logits predict each
    answer token; prompt tokens are never predicted."""
    token_target: torch.Tensor
    """(tokens,) the answer token predicted there."""
    token_answer: torch.Tensor
    """(tokens,) which answer of the micro-batch the token belongs to."""
    answer_tokens: torch.Tensor
    """(answers,) number of tokens of each answer (its EOS included)."""
    answer_ids: torch.Tensor
    """(answers,) each answer's index in its whole split (train or eval), e.g. into the table
    of precomputed reference log-probs."""
    prompts_with_pairs: int
    """Prompts of the micro-batch that have at least one untied pair (each weighs the same)."""

    def to(self, device: torch.device) -> "PreferenceBatch":
        return PreferenceBatch(self.rank.to(device), self.token_source.to(device), self.token_target.to(device),
                               self.token_answer.to(device), self.answer_tokens.to(device), self.answer_ids.to(device),
                               self.prompts_with_pairs)

    @property
    def num_pairs(self) -> int:
        return int(self.rank.pair_index.shape[0])


def _token_map(examples: Sequence[RankExample], width: int, shared: bool) -> tuple[list[int], list[int], list[int]]:
    """(source position, target token, answer) of every answer token, in either layout."""
    sources, targets, answers = [], [], []
    answer = 0
    for row, example in enumerate(examples):
        prompt = example.prompt_length
        column = prompt  # shared layout: where the next answer starts in this row
        for sequence in example.sequences:
            tokens = sequence[prompt:]
            if not shared:
                row_start = answer * width
                sources += [row_start + prompt - 1 + j for j in range(len(tokens))]
            else:
                row_start = row * width
                sources += [row_start + (prompt - 1 if j == 0 else column + j - 1) for j in range(len(tokens))]
                column += len(tokens)
            targets += tokens
            answers += [answer] * len(tokens)
            answer += 1
    return sources, targets, answers


class PreferenceBatches:
    """Micro-batches of prompts with their K answers, reshuffled per epoch from a seed and
    randomly addressable (`batch(epoch, index)`, as `RankBatches`), so a step's data depends
    only on (step, rank). `share_prompt` as in `RankBatches`."""

    def __init__(self, examples: Sequence[RankExample], micro_batch_size: int, pad_token_id: int, seed: int,
                 shuffle: bool = True, share_prompt: bool = False, max_shared_length: int | None = None):
        self.examples = list(examples)
        self.micro_batch_size, self.pad_token_id = micro_batch_size, pad_token_id
        self.share_prompt, self.max_shared_length = share_prompt, max_shared_length
        self.seed, self.shuffle = seed, shuffle
        self._order = EpochOrder(len(self.examples), seed, shuffle)
        self.answer_offset = [0]
        for example in self.examples:
            self.answer_offset.append(self.answer_offset[-1] + len(example.sequences))

    @property
    def num_answers(self) -> int:
        return self.answer_offset[-1]

    def __len__(self) -> int:
        return (len(self.examples) + self.micro_batch_size - 1) // self.micro_batch_size

    def in_order(self) -> "PreferenceBatches":
        """The same micro-batches over the examples in their stored order."""
        return PreferenceBatches(self.examples, self.micro_batch_size, self.pad_token_id, self.seed, False,
                                 self.share_prompt, self.max_shared_length)

    def batch(self, epoch: int, index: int) -> PreferenceBatch:
        chunk = self._order(epoch)[index * self.micro_batch_size: (index + 1) * self.micro_batch_size]
        examples = [self.examples[i] for i in chunk]
        shared = self.share_prompt and (self.max_shared_length is None
                                        or max(e.shared_length() for e in examples) <= self.max_shared_length)
        rank = collate_rank_shared(examples, self.pad_token_id) if shared else collate_rank(examples, self.pad_token_id)
        sources, targets, answers = _token_map(examples, rank.input_ids.shape[1], shared)
        lengths = [len(s) - e.prompt_length for e in examples for s in e.sequences]
        ids = [self.answer_offset[i] + k for i in chunk for k in range(len(self.examples[i].sequences))]
        long = dict(dtype=torch.long)
        return PreferenceBatch(rank, torch.tensor(sources, **long), torch.tensor(targets, **long),
                               torch.tensor(answers, **long), torch.tensor(lengths, **long), torch.tensor(ids, **long),
                               len(set(rank.pair_group.tolist())))

    def epoch(self, epoch: int) -> Iterator[PreferenceBatch]:
        for index in range(len(self)):
            yield self.batch(epoch, index)


def answer_logps(module: torch.nn.Module, batch: PreferenceBatch) -> torch.Tensor:
    """(answers,) summed log-prob of each answer's tokens given its prompt, float32, from one
    forward pass over the micro-batch. Only the positions that predict an answer token reach
    the output layer (`forward_keeping`); the shared prompt's last position is computed once
    and read by all K answers."""
    rank = batch.rank
    rows, width = rank.input_ids.shape
    keep = torch.zeros(rows * width, dtype=torch.bool, device=rank.input_ids.device)
    keep[batch.token_source] = True
    if rank.shares_prompts:
        inner = transformers_model(module)
        mask = shared_prefix_attention_mask(rank.segment_ids, inner.config._attn_implementation, inner.dtype)
        positions = rank.position_ids
    else:
        mask, positions = rank.attention_mask, position_ids_from_mask(rank.attention_mask)
    logits = forward_keeping(module, keep.view(rows, width), input_ids=rank.input_ids, attention_mask=mask,
                             position_ids=positions, use_cache=False).logits  # (kept positions, vocab), row-major
    logits = logits.float()
    kept_row = keep.long().cumsum(0) - 1  # flat position -> row of `logits`
    at = kept_row[batch.token_source]
    # log softmax(z)[y] = z_y - logsumexp(z): one logsumexp per kept position, shared by the answers reading it.
    token_logps = logits[at, batch.token_target] - torch.logsumexp(logits, dim=-1)[at]
    return token_logps.new_zeros(batch.answer_tokens.shape[0]).index_add(0, batch.token_answer, token_logps)


def reference_loader(cfg: DPOConfig, world) -> Callable[[], torch.nn.Module]:
    """Loads the frozen reference (`reference.path`, default the SFT model `model.path`) with
    the policy's model settings, no LoRA, no gradient checkpointing, dropout off; placed and
    frozen as the strategy (`world`) places scored models: sharded under ZeRO-3 and FSDP2,
    where its forwards are collectives that every worker runs as many of."""

    def load() -> torch.nn.Module:
        settings = dataclasses.replace(cfg.model, gradient_checkpointing=False)
        model = load_causal_lm(settings, world.device, cfg.reference.path or cfg.model.path,
                               placement=world.placement())
        disable_dropout(model)
        model = world.freeze(model)
        model.eval()  # a DeepSpeed engine's eval() returns None: not chained
        model.requires_grad_(False)
        accelerate(unwrap_engine(model), cfg.kernels)  # once the weights are on their device
        return model

    return load


class ReferenceLogps:
    """The frozen reference's summed answer log-probs, for `Run.begin(state=...)`.

    Live: the reference model is loaded on first use and forwards each micro-batch beside the
    policy. Precomputed: on first use the reference scores every answer of every split once
    (each worker a share of the micro-batches, joined over the workers), is freed, and each
    micro-batch then reads its answers' numbers by `answer_ids`. The tables go into
    checkpoints, so a resumed run finds them and never loads the reference."""

    def __init__(self, load: Callable[[], torch.nn.Module], precompute: bool, splits: dict[str, PreferenceBatches],
                 world):
        self.load, self.precompute, self.splits, self.world = load, precompute, splits, world
        self.model: torch.nn.Module | None = None
        self.tables: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, split: str, batch: PreferenceBatch) -> torch.Tensor:
        """(answers,) reference log-probs of the micro-batch's answers."""
        if not self.precompute:
            model = self._model()
            logps = answer_logps(model, batch)
            reshard_frozen(model)
            return logps
        if not self.tables:
            self.tables = {name: self._table(batches) for name, batches in self.splits.items()}
            self.model = None  # no reference in memory during training
            gc.collect()
        return self.tables[split].to(batch.answer_ids.device)[batch.answer_ids]

    def _model(self) -> torch.nn.Module:
        if self.model is None:
            self.model = self.load()
        return self.model

    def _table(self, batches: PreferenceBatches) -> torch.Tensor:
        """Every answer's log-prob, (answers,) float32 on the CPU, the same on every worker.
        Every worker runs as many forwards (a sharded reference's forward is a collective): one
        whose share is a micro-batch short scores a batch again and keeps nothing of it."""
        model, world = self._model(), self.world
        table = torch.zeros(batches.num_answers, dtype=torch.float32)
        ordered = batches.in_order()
        count = len(ordered)
        for turn in range(-(-count // world.world_size)):
            index = world.rank + turn * world.world_size
            batch = ordered.batch(0, min(index, count - 1)).to(world.device)
            logps = answer_logps(model, batch)
            reshard_frozen(model)
            if index < count:
                table[batch.answer_ids.cpu()] = logps.cpu()
        # Each answer was scored by exactly one worker, the others hold 0 there: the sum is exact.
        return torch.stack(world.all_gather(table)).sum(0) if world.world_size > 1 else table

    def state_dict(self) -> dict:
        return {name: table.clone() for name, table in self.tables.items()}

    def load_state_dict(self, state: dict) -> None:
        if self.precompute and state:
            self.tables = {name: torch.as_tensor(table, dtype=torch.float32) for name, table in state.items()}


def preference_loss(module: torch.nn.Module, batch: PreferenceBatch, ref_logps: torch.Tensor,
                    cfg: DPOLossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(sum over the micro-batch's prompts of each prompt's mean pair loss, per-pair stats).
    Sequence log-probs are sums over answer tokens, per-token means for IPO."""
    summed = policy = answer_logps(module, batch)
    if cfg.loss_type == "ipo":
        tokens = batch.answer_tokens.clamp_min(1).to(policy.dtype)
        policy, ref_logps = policy / tokens, ref_logps / tokens
    chosen, rejected = batch.rank.pair_index[:, 0], batch.rank.pair_index[:, 1]
    per_pair, stats = dpo_loss(policy[chosen], policy[rejected], ref_logps[chosen], ref_logps[rejected], cfg.beta,
                               cfg.label_smoothing, cfg.loss_type)
    means, has_pairs = per_prompt_mean(per_pair, batch.rank.pair_group, batch.rank.num_prompts)
    # Whatever the loss reads, the reported log-probs are the answers' summed ones.
    stats.update(chosen_logps=summed[chosen].detach(), rejected_logps=summed[rejected].detach())
    return means[has_pairs].sum(), stats


PAIR_STATS = ("accuracy", "margin", "chosen_logps", "rejected_logps", "reward_chosen", "reward_rejected")
"""Reported as means over the pairs (the loss is a mean over prompts)."""


def _add_stats(sums: dict[str, float], stats: dict[str, torch.Tensor]) -> None:
    for name in PAIR_STATS:
        sums[name] = sums.get(name, 0.0) + float(stats[name].sum())


def _means(totals: dict[str, float], prompts: float, pairs: float) -> dict[str, float]:
    return {"loss": totals["loss"] / max(prompts, 1), **{k: totals.get(k, 0.0) / max(pairs, 1) for k in PAIR_STATS}}


def dpo_step(trained, batches: list[PreferenceBatch], reference: ReferenceLogps, cfg: DPOLossConfig,
             strategy) -> dict[str, float]:
    """One optimizer step over this worker's micro-batches, every prompt of the global batch
    weighing the same; the step's metrics over all workers."""
    counts = strategy.all_reduce({"prompts": sum(b.prompts_with_pairs for b in batches),
                                  "pairs": sum(b.num_pairs for b in batches)}, op="sum")
    sums: dict[str, float] = {"loss": 0.0}
    for batch in batches:
        ref_logps = reference("train", batch)
        loss, stats = preference_loss(trained.module, batch, ref_logps, cfg)
        strategy.backward(trained, loss / max(counts["prompts"], 1))
        sums["loss"] += float(loss.detach())
        _add_stats(sums, stats)
    lr = trained.lr
    grad_norm = strategy.step(trained)
    totals = strategy.all_reduce(sums, op="sum")
    row = {f"dpo/{k}": v for k, v in _means(totals, counts["prompts"], counts["pairs"]).items()}
    return {**row, "dpo/lr": lr, "dpo/grad_norm": grad_norm, "dpo/pairs": counts["pairs"]}


class DPOEvaluation:
    """Held-out metrics (the training metrics' names under eval/), for `Run.begin(evaluate=...)`.
    Every worker evaluates the whole set, as the other stages do (sharded engines need every
    worker in every forward pass), so all of them get the same numbers."""

    def __init__(self, trained, batches: PreferenceBatches, reference: ReferenceLogps, cfg: DPOLossConfig,
                 device: torch.device, gold: "SampledGold | None" = None):
        self.trained, self.batches, self.reference, self.cfg, self.device = trained, batches, reference, cfg, device
        self.gold = gold

    @torch.no_grad()
    def __call__(self, step: int) -> dict[str, float]:
        module = self.trained.module
        was_training = module.training
        module.eval()
        sums: dict[str, float] = {"loss": 0.0}
        prompts = pairs = 0
        for batch in self.batches.epoch(0):
            batch = batch.to(self.device)
            loss, stats = preference_loss(module, batch, self.reference("eval", batch), self.cfg)
            sums["loss"] += float(loss)
            prompts, pairs = prompts + batch.prompts_with_pairs, pairs + batch.num_pairs
            _add_stats(sums, stats)
        metrics = {**{f"eval/{k}": v for k, v in _means(sums, prompts, pairs).items()}, "eval/pairs": float(pairs)}
        if self.gold is not None:
            metrics.update(self.gold(module, world=self.trained.strategy))
        module.train(was_training)
        return metrics


def sampled_gold(cfg: DPOConfig, gold_reward: Callable[[str, str], float] | None, tokenizer,
                 held_out: Sequence[RankRecord]) -> "SampledGold | None":
    """The `SampledGold` that `cfg.eval` asks for (None without a gold rule): the first
    `eval.max_prompts` prompts of `eval.prompts`, or else of the held-out ranked answers, each
    sampled `eval.samples_per_prompt` times."""
    if gold_reward is None:
        return None
    if cfg.eval.prompts.given:
        records, _ = load_records("prompt", cfg.eval.prompts, cfg.data.on_error)
    else:
        records = [PromptRecord(r.prompt) for r in held_out]
    if not records:
        raise UserError("eval.gold_reward is set but there are no prompts to sample: set eval.prompts.path or "
                        "hold out ranked answers (data.eval or data.eval_fraction)")
    prompts = prompt_batch(tokenizer, records[: cfg.eval.max_prompts], cfg.data.max_prompt_length)
    return SampledGold(prompts.repeated(cfg.eval.samples_per_prompt),
                       SamplingParams(cfg.eval.max_new_tokens, cfg.eval.temperature), gold_reward, tokenizer,
                       seed=cfg.seed + 1, llama_step=cfg.kernels.llama_decode_step)


class SampledGold:
    """The mean gold reward (a rule's score) of answers sampled from the policy for held-out
    prompts, with their mean length and EOS rate. The samples depend on the seed alone (the
    decode engine's per-sample streams; the process RNG is left as it was), so every
    evaluation, and the SFT model at step 0, answers with the same random numbers."""

    def __init__(self, prompts: PromptBatch, params: SamplingParams, gold_reward: Callable[[str, str], float],
                 tokenizer, seed: int, batch_size: int = 64, llama_step: bool = True):
        self.prompts, self.params, self.gold_reward, self.tokenizer = prompts, params, gold_reward, tokenizer
        self.seed, self.batch_size, self.llama_step = seed, batch_size, llama_step

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module, world: Collective | None = None) -> dict[str, float]:
        """`world`, the run's strategy, keeps the ranks' forwards in step when `module` is
        sharded (ZeRO-3, FSDP2); a model of one process needs none."""
        model = getattr(module, "module", module)  # engines wrap the HF model as .module
        tokenizer = self.tokenizer
        engine = DecodeEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, self.batch_size, self.llama_step,
                              world=world)
        ids = self.prompts.ids
        rollout = engine.generate(ids, self.params, seeds=SampleSeeds(self.seed, range(len(ids))))
        lengths = rollout.response_mask.sum(-1)
        texts = [tokenizer.decode(row[: int(n)].tolist(), skip_special_tokens=True).strip()
                 for row, n in zip(rollout.responses, lengths)]
        golds = [float(self.gold_reward(p, t)) for p, t in zip(self.prompts.texts, texts)]
        return {"eval/gold_reward": sum(golds) / len(golds), "eval/response_length": float(lengths.float().mean()),
                "eval/eos_rate": float(rollout.eos_found.float().mean())}
