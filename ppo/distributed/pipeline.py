"""Pipeline-parallel actor and critic, and the export of their weights to the rollout models.

Under ``pipeline_parallel_degree > 1`` the actor and the critic train as fleet ``PipelineLayer``s
(the model family's paddlenlp pipeline stages: embedding, decoder layers, final norm, then the LM
head or the score head) driven by fleet's 1F1B schedule (``PipelineParallel.forward_backward_pipeline``).  The
PPO losses run inside the last stage (:class:`PipeLoss`).  Every micro-batch of one pass has the
same sequence length: the rows of one update come from one rollout, padded to its longest row.

Rollout does not run on the pipeline: it runs on ordinary (non-pipeline) copies of the actor and
critic, either tensor parallel like the training model (``eval_mode tensor_parallel``) or whole on
every rank (``eval_mode single``).  :func:`export_weights` refreshes those copies from the training
model before every rollout: each stage's parameters are broadcast over the pipeline group, and for
``single`` the tensor-parallel shards are gathered and merged first.  The copies therefore hold
exactly the training model's current weights.
"""

from __future__ import annotations

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn as nn

from ppo.distributed import parallel
from ppo.core.errors import UserError
from ppo.models import cpu_gemm
from ppo.models.families import ModelFamily, family_of, family_of_model
from ppo.models.lora import split_adapters
from ppo.models.score_model import position_ids_from_mask


def _pipeline_classes(family: ModelFamily):
    """Built on first use: importing paddlenlp's pipeline module needs fleet's hybrid group."""
    from paddle.distributed import fleet
    from paddle.distributed.fleet.meta_parallel import LayerDesc, PipelineLayer
    from paddlenlp.transformers.model_utils import PipelinePretrainedModel
    from paddlenlp.transformers.refined_recompute import get_skip_recompute_ops

    parts = family.pipeline_parts()
    prefix = family.prefix

    def stages(pipe, config, head: type, head_prefix: str, skip_ops: bool):
        """Lay out ``pipe``'s stages (embedding, decoder layers, final norm, ``head``) as the single
        model names them, then initialise fleet's ``PipelineLayer`` over them."""
        pipe.config = config
        hcg = fleet.get_hybrid_communicate_group()
        config.tensor_parallel_degree = max(hcg.get_model_parallel_world_size(), 1)
        config.tensor_parallel_rank = max(hcg.get_model_parallel_rank(), 0)
        pipe.add_sequential_layer(LayerDesc(parts.embedding, config=config), prefix)
        # as paddlenlp's own pipelines build them: without layerwise_recompute no granularity
        # of recompute / critic_recompute would ever recompute these layers
        skipped = config.no_recompute_layers or []
        for i in range(config.num_hidden_layers):
            extra = dict(skip_recompute_ops=get_skip_recompute_ops(config, i)) if skip_ops else {}
            pipe.add_sequential_layer(LayerDesc(parts.decoder_layer, config=config,
                                                layerwise_recompute=i not in skipped, **extra), f"{prefix}.layers.{i}")
        pipe.add_sequential_layer(LayerDesc(parts.norm, config=config), prefix)
        pipe.add_sequential_layer(LayerDesc(head, config=config), head_prefix)
        PipelineLayer.__init__(
            pipe, layers=pipe.get_sequential_layers(), loss_fn=PipeLoss(), topology=hcg.topology(),
            seg_method=f"layer:{parts.decoder_layer_name}"
            if config.num_hidden_layers % hcg.get_pipe_parallel_world_size() == 0 else "uniform")

    if parts.causal_lm is not None:
        class PolicyPipe(parts.causal_lm):
            """The family's paddlenlp pipeline with the PPO actor loss in the last stage."""

            single_class_name = family.causal_lm_class.__name__

            def get_loss_fn(self, config):
                return PipeLoss()
    else:
        causal_lm = family.causal_lm_class

        class PolicyPipe(PipelinePretrainedModel, PipelineLayer):
            """The family's causal LM as pipeline stages (its own layers; an untied LM head), the PPO
            actor loss in the last stage.  Parameter names map to the causal LM's."""

            single_class_name = causal_lm.__name__
            config_class = causal_lm.config_class
            _get_tensor_parallel_mappings = causal_lm._get_tensor_parallel_mappings
            _init_weights = causal_lm._init_weights

            def __init__(self, config):
                stages(self, config, parts.lm_head, "lm_head", skip_ops=True)

    class ScoreHeadPipe(nn.Layer):
        def __init__(self, config):
            super().__init__()
            self.score_head = nn.Linear(config.hidden_size, config.score_dim,
                                        bias_attr=None if config.score_bias else False)

        def forward(self, args):
            hidden = args[0] if isinstance(args, tuple) else args
            return self.score_head(hidden.astype(self.score_head.weight.dtype))

    score_model = family.score_model_class

    class ScorePipe(PipelinePretrainedModel, PipelineLayer):
        """The critic (the family's score model) as pipeline stages, the value loss in the last one.

        Parameter names map to the score model's (``<prefix>.*``, ``score_head.*``)."""

        single_class_name = score_model.__name__
        config_class = score_model.config_class
        _get_tensor_parallel_mappings = score_model._get_tensor_parallel_mappings
        _init_weights = score_model._init_weights

        def __init__(self, config):
            stages(self, config, ScoreHeadPipe, "", skip_ops=False)

    return PolicyPipe, ScorePipe


class PipeLoss(nn.Layer):
    """The last stage's loss.  The trainer sets ``compute(output, labels) -> (loss, stats)`` before
    a pass; the stats of every micro-batch are kept in ``stats``.

    The pipeline divides every micro-batch loss by its accumulate_steps; ``compute`` returns the
    micro-batch's share of the step's loss (already weighted), so that division is undone here.
    """

    def __init__(self):
        super().__init__()
        self.compute = None
        self.accumulate_steps = 1
        self.stats: list[dict] = []

    def forward(self, output, labels):
        loss, stats = self.compute(output, labels)
        self.stats.append(stats)
        return loss * self.accumulate_steps


def check_pipeline_config(config, what: str, path: str) -> None:
    """UserError (one line naming ``what`` = ``path``) when ``config``'s model cannot train as pipeline stages."""
    pp = parallel.context().pp_degree
    reason = family_of(config, what, path).pipeline_unsupported(config)
    if reason is not None:
        raise UserError(f"'{what}' = '{path}' {reason}")
    if config.num_hidden_layers < pp:
        raise UserError(f"'{what}' = '{path}' has {config.num_hidden_layers} layers, fewer than "
                        f"pipeline_parallel_degree = {pp}")


def policy_pipe(model):
    """The pipeline-parallel twin of the causal LM ``model`` (this rank's stage, its weights)."""
    PolicyPipe, _ = _pipeline_classes(family_of_model(model))
    return _build(PolicyPipe, model)


def score_pipe(model):
    """The pipeline-parallel twin of the score model ``model`` (this rank's stage, its weights)."""
    _, ScorePipe = _pipeline_classes(family_of_model(model))
    return _build(ScorePipe, model)


def _build(cls, model):
    import copy

    config = copy.deepcopy(model.config)
    pipe = cpu_gemm.install(cls(config))  # (its matmuls through oneDNN where that path is active)
    state = model.state_dict()
    pipe.set_state_dict(dict(state))  # (it renames the keys of the dict it is given)
    mine = pipe.state_dict()
    for name, value in mine.items():  # every parameter of this stage came from the model
        if name not in state or tuple(state[name].shape) != tuple(value.shape):
            raise RuntimeError(f"pipeline stage parameter {name} has no counterpart in the model")
    return pipe


# ---------------------------------------------------------------------------------------------
# the pipeline's full (merged) weights


def _stage_keys(pipe) -> list[list[str]]:
    """Parameter names (single-model names) of every pipeline stage, in stage order (cached)."""
    cached = getattr(pipe, "_ppo_stage_keys", None)
    if cached is None:
        ctx = parallel.context()
        mine = sorted(pipe.state_dict().keys())
        cached = []
        dist.all_gather_object(cached, mine, group=ctx.hcg.get_pipe_parallel_group())
        pipe._ppo_stage_keys = cached
    return cached


def _tp_merge_actions(pipe) -> dict:
    """{name: merge function of the tensor-parallel shards} (paddlenlp's own split rules)."""
    return tensor_parallel_actions(pipe, is_split=False)


def tensor_parallel_actions(model, is_split: bool) -> dict:
    """{name: split (``is_split``) or merge function} of the tensor-parallel parameters of ``model``:
    paddlenlp's rules for the model's weights, and for LoRA adapters the rule of their layer's
    weight (a fused projection's B splits like the fused weight's columns); {} without tensor parallel."""
    if parallel.context().tp_degree <= 1:
        return {}
    actions = dict(type(model)._get_tensor_parallel_mappings(model.config, is_split=is_split))
    for adapter, weight in split_adapters(model):
        action = _action_for(weight, actions)
        if action is None:
            raise RuntimeError(f"tensor parallel: no split rule for {weight}, whose adapter {adapter} is split")
        actions[adapter] = action
    return actions


def _action_for(name: str, actions: dict):
    """paddlenlp names its split rules without the base-model prefix (``layers.0.mlp...``)."""
    if name in actions:
        return actions[name]
    return next((a for key, a in actions.items() if name.endswith("." + key)), None)


def _merged_over_tp(name, value, actions):
    """The whole tensor of this rank's shard ``value`` (gathered over the tensor-parallel group)."""
    action = _action_for(name, actions)
    if action is None:
        return value
    shards = []
    dist.all_gather(shards, value, group=parallel.context().hcg.get_model_parallel_group())
    return paddle.to_tensor(action([s.numpy() for s in shards]))


def iter_full_state(pipe, merge_tensor_parallel: bool):
    """Yield (name, tensor) for every parameter of the whole model, on every rank of the pipeline
    group: this rank's shard of it (``merge_tensor_parallel=False``) or the merged tensor."""
    ctx = parallel.context()
    group = ctx.hcg.get_pipe_parallel_group()
    local = pipe.state_dict()
    actions = _tp_merge_actions(pipe) if merge_tensor_parallel else {}
    cache = getattr(pipe, "_ppo_full_shapes", None)
    if cache is None:
        cache = pipe._ppo_full_shapes = {}
    shapes = cache.setdefault(merge_tensor_parallel, {})
    for stage, names in enumerate(_stage_keys(pipe)):
        src = group.ranks[stage]
        for name in names:
            value = _merged_over_tp(name, local[name], actions) if stage == ctx.pp_rank else None
            if name not in shapes:  # first export: the owner announces shape and dtype
                box = [[tuple(value.shape), str(value.dtype).split(".")[-1]] if value is not None else None]
                dist.broadcast_object_list(box, src=src, group=group)
                shapes[name] = box[0]
            if value is None:
                shape, dtype = shapes[name]
                value = paddle.empty(list(shape), dtype=dtype)
            dist.broadcast(value, src=src, group=group)
            yield name, value


@paddle.no_grad()
def export_weights(pipe, target, merge_tensor_parallel: bool) -> None:
    """Copy the pipeline model's current weights into the non-pipeline ``target`` (in place)."""
    _copy_into(target, iter_full_state(pipe, merge_tensor_parallel))


@paddle.no_grad()
def export_tensor_parallel(model, target) -> None:
    """Merge a tensor-parallel (non-pipeline) model's shards into the whole ``target`` (TP -> single)."""
    actions = _tp_merge_actions(model)
    _copy_into(target, ((name, _merged_over_tp(name, value, actions)) for name, value in model.state_dict().items()))


def _copy_into(target, named_values) -> None:
    """Every (name, tensor) into ``target``'s parameter of that name, which must all be covered."""
    params = target.state_dict()
    missing = set(params)
    for name, value in named_values:
        dest = params.get(name)
        if dest is None:
            raise RuntimeError(f"weight export: the rollout model has no parameter {name}")
        if tuple(dest.shape) != tuple(value.shape):
            raise RuntimeError(f"weight export: {name} is {tuple(value.shape)} in training, "
                               f"{tuple(dest.shape)} in the rollout model")
        paddle.assign(value.astype(dest.dtype), output=dest)
        missing.discard(name)
    if missing:
        raise RuntimeError(f"weight export: rollout-model parameters not in the training model: {sorted(missing)}")


def tensor_parallel_state(model, names=None) -> dict:
    """{name: numpy} of the whole (merged over tensor parallel) parameters of the non-pipeline
    ``model`` (those in ``names``, default all); every rank of the tensor-parallel group calls it
    and receives the same arrays."""
    actions = _tp_merge_actions(model)
    return {name: _merged_over_tp(name, value, actions).numpy() for name, value in model.state_dict().items()
            if names is None or name in names}


def merged_state_dict(pipe) -> dict | None:
    """The whole pipeline model's weights (merged over tensor parallel too) as numpy arrays on the
    global main rank (None elsewhere); call on every rank."""
    ctx = parallel.context()
    out = {}
    if ctx.data_rank == 0:  # the first pipeline(s) gather; every data replica holds the same weights
        for name, value in iter_full_state(pipe, merge_tensor_parallel=True):
            if ctx.is_main:
                out[name] = value.numpy()
    return out if ctx.is_main else None


# -- one training pass of fleet's 1F1B schedule ---------------------------------------------------


def pipeline_pass(train_model, optimizer, inputs, labels, compute, keys, accumulate_steps: int, precision) -> list[dict]:
    """One forward/backward pass of fleet's pipeline schedule over ``accumulate_steps`` micro-batches;
    the last stage runs ``compute(output, labels) -> (loss, stats)``.  Returns every micro-batch's
    stats (``keys``), on every stage (broadcast from the last)."""
    loss_layer = parallel.unwrap(train_model)._loss_fn[0]
    loss_layer.compute, loss_layer.stats = compute, []
    loss_layer.accumulate_steps = accumulate_steps
    data = train_model._prepare_training([inputs, labels], optimizer, None)
    with precision.autocast():
        train_model.forward_backward_pipeline(data, precision.scaler)
    n = accumulate_steps
    flat = [s[k] for s in loss_layer.stats for k in keys] if loss_layer.stats else [0.0] * (n * len(keys))
    flat = parallel.broadcast_from_last_stage(flat)
    return [dict(zip(keys, flat[i * len(keys):(i + 1) * len(keys)])) for i in range(n)]


def pipeline_inputs(ids, mask):
    """(ids, mask, positions) as paddlenlp's pipeline stages read them: a bool mask, so the int64
    third tensor is taken as the position ids on every device type."""
    return (ids, mask.astype("bool"), position_ids_from_mask(mask))


def row_weights(row_counts: list[int], weights: list[float]):
    """``[rows, 1]`` float32: each micro-batch's weight on its rows (the pipeline slices every label
    tensor as ``[micro-batch rows, :]``)."""
    return paddle.to_tensor(np.concatenate([np.full([n, 1], w, dtype=np.float32)
                                            for n, w in zip(row_counts, weights)]))
