"""PPO's data: the prompt batches of every iteration, the eval prompts, the optional ptx feed,
and the counts derived from the batch arguments (checked once, here)."""

from __future__ import annotations

from dataclasses import dataclass

from ppo.core.batching import GlobalBatchSampler, total_steps
from ppo.data import PromptOnlyDataset, SupervisedDataset, build_template, import_user_modules
from ppo.core.errors import UserError
from ppo.stages.ppo.steps import PtxFeed


@dataclass
class PPOData:
    prompts: object                 # PromptOnlyDataset of the training prompts
    eval_prompts: object | None     # PromptOnlyDataset of the eval prompts (None: no evaluation)
    prompt_sampler: GlobalBatchSampler  # one prompt batch per PPO iteration, per data rank
    ptx: PtxFeed | None             # supervised batches mixed into actor steps (ptx_datasets)
    total_steps: int                # PPO iterations of the run
    steps_per_update: int           # optimizer steps per pass over one rollout batch


def load_ppo_data(args, ctx, tokenizer, split_ranks: int, merge_for_rollout: bool) -> PPOData:
    if args.extra_modules:
        import_user_modules([m for m in args.extra_modules.split(",") if m])
    template = build_template(args)
    # prompts leave room for the response inside max_length
    prompt_limit = max(1, args.max_length - args.max_new_tokens)
    prompts = PromptOnlyDataset(args.train_datasets, tokenizer, prompt_limit, seed=args.seed, template=template)
    eval_prompts = None
    if args.eval_datasets:
        eval_prompts = PromptOnlyDataset(args.eval_datasets, tokenizer, prompt_limit, seed=args.seed,
                                         template=template)
    elif args.eval_split_ratio > 0:
        prompts, eval_prompts = prompts.split(args.eval_split_ratio, seed=args.seed)
    sampler = GlobalBatchSampler(len(prompts), args.per_device_prompt_batch_size, 1, ctx.data_world, ctx.data_rank,
                                 seed=args.seed, what=f"train_datasets '{args.train_datasets}'",
                                 drop_last=args.dataloader_drop_last)
    ptx = None
    if args.ptx_datasets:
        ptx_data = SupervisedDataset(args.ptx_datasets, tokenizer, args.max_length, seed=args.seed, template=template)
        ptx_sampler = GlobalBatchSampler(len(ptx_data), args.per_device_train_batch_size, 1, ctx.data_world,
                                         ctx.data_rank, seed=args.seed + 1, what=f"ptx_datasets '{args.ptx_datasets}'")
        ptx = PtxFeed(ptx_data, ptx_sampler, ctx.data_world)
    rollout_batch = args.per_device_prompt_batch_size * args.num_return_sequences
    group = args.per_device_train_batch_size * args.gradient_accumulation_steps
    if args.per_device_prompt_batch_size % split_ranks != 0:
        raise UserError(f"per_device_prompt_batch_size = {args.per_device_prompt_batch_size} must be divisible by "
                        f"the {split_ranks} ranks that share its rollout (pipeline_parallel_degree"
                        f"{' x tensor_parallel_degree' if merge_for_rollout else ''})")
    if rollout_batch % group != 0:
        raise UserError(f"per_device_prompt_batch_size x num_return_sequences = {rollout_batch} must be divisible "
                        f"by per_device_train_batch_size x gradient_accumulation_steps = {group}")
    return PPOData(prompts=prompts, eval_prompts=eval_prompts, prompt_sampler=sampler, ptx=ptx,
                   total_steps=total_steps(args, sampler.steps_per_epoch), steps_per_update=rollout_batch // group)
