"""The rollout's end scores from the reward model and the reward functions, and DAPO's dynamic
sampling.

    end_score = reward_model_weight * RM score          (0 without a reward model; normalize_reward
                                                          applies to the RM score alone, before the weight)
              + sum_f weight_f * f(prompts, responses, response_ids, references)

The functions score the decoded batch once per data rank: the first tensor-parallel rank (of the
first pipeline stage) calls them, the remote endpoint included, and broadcasts the scores to the
other ranks of its data rank (``parallel.broadcast_from_first_rollout_rank``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import paddle

from ppo.distributed import parallel
from ppo.core.experience import Experience
from ppo.data.tokenizer_utils import decode_without_special
from ppo.rewards import build_reward_functions, combine, parse_reward_functions, run_options


class RewardScorer:
    """The run's reward functions (``reward_functions``, plus ``remote`` when ``reward_server_url``
    is set and the spec does not name it) and how their sum joins the reward model's score."""

    def __init__(self, args):
        spec = args.reward_functions
        if args.reward_server_url and "remote" not in [s.name for s in parse_reward_functions(spec)]:
            spec = f"{spec},remote" if spec.strip() else "remote"
        self.functions = build_reward_functions(spec, run_options(args))
        self.names = [type(f).NAME for f, _ in self.functions]
        self.rm_weight = float(args.reward_model_weight)
        self.context = {"max_new_tokens": args.max_new_tokens}

    @property
    def changes_scores(self) -> bool:
        return bool(self.functions) or self.rm_weight != 1.0

    def apply(self, exp: Experience, references, tokenizer, share: bool = True, with_pipeline: bool = True
              ) -> tuple[Experience, dict[str, np.ndarray]]:
        """``exp`` with ``end_scores`` = weighted RM score + weighted function sum, and each
        function's unweighted scores [B] float64 by name.

        ``references``: one per prompt of the batch (``B / len(references)`` consecutive rows per
        prompt), None entries allowed, or None for none at all.  ``share``: the rows are the same
        on every tensor-parallel rank (and pipeline stage, ``with_pipeline``): the first of them
        scores and broadcasts; else this rank scores its own rows.
        """
        if not self.changes_scores:
            return exp, {}
        B = exp.batch_size
        table = np.zeros([len(self.functions) + 1, B], dtype=np.float64)
        if not share or parallel.is_first_rollout_rank(with_pipeline):
            if self.functions:
                refs = [None] * B if references is None else \
                    [r for r in references for _ in range(B // max(len(references), 1))]
                prompts, responses, response_ids = decode_rows(exp, tokenizer)
                scores = combine(self.functions, prompts, responses, response_ids, refs,
                                 eos_token_id=tokenizer.eos_token_id, **self.context)
                table[:-1] = [scores.per_function[n] for n in self.names]
                table[-1] = scores.total
        if share:
            table = parallel.broadcast_from_first_rollout_rank(table, with_pipeline)
        rm = exp.end_scores.astype("float64").numpy()
        end_scores = paddle.to_tensor((self.rm_weight * rm + table[-1]).astype("float32"))
        return dataclasses.replace(exp, end_scores=end_scores), dict(zip(self.names, table[:-1]))


def decode_rows(exp: Experience, tokenizer) -> tuple[list[str], list[str], list[list[int]]]:
    """Decoded prompts and responses (special tokens skipped) and the response token ids (the
    generated EOS included, padding not) of every row of ``exp``."""
    P = exp.prompt_length
    seq, att = exp.sequences.numpy(), exp.attention_mask.numpy()
    prompt_ids = [[int(t) for t, m in zip(seq[b, :P], att[b, :P]) if m] for b in range(exp.batch_size)]
    ids = [[int(t) for t, m in zip(seq[b, P:], att[b, P:]) if m] for b in range(exp.batch_size)]
    texts = decode_without_special(tokenizer, prompt_ids + ids)
    return texts[:exp.batch_size], texts[exp.batch_size:], ids


def score_metrics(function_scores: dict[str, np.ndarray], reduce=float) -> dict[str, float]:
    """``reward_<name>``: each function's mean score; ``math_exact_accuracy``: its share of 1.0.
    ``reduce`` turns a local mean into the reported one (e.g. the mean over data ranks)."""
    out = {}
    for name, scores in function_scores.items():
        out[f"reward_{name}"] = reduce(float(np.mean(scores)))
        if name == "math_exact":
            out["math_exact_accuracy"] = reduce(float(np.mean(np.asarray(scores) == 1.0)))
    return out


# ---------------------------------------------------------------------------------------------
# DAPO dynamic sampling


def informative_groups(end_scores, n: int, tol: float = 1e-6) -> np.ndarray:
    """[G] bool per group of ``n`` consecutive rows of ``end_scores`` [G * n]: True when its
    responses did not all get the same score (within ``tol``), i.e. it carries a group advantage."""
    s = np.asarray(end_scores, dtype=np.float64).reshape(-1, n)
    return (s.max(axis=1) - s.min(axis=1)) > tol


def choose_groups(informative: np.ndarray, target: int) -> tuple[np.ndarray, int]:
    """Indices of ``target`` groups: the informative ones in order (at most ``target``), then, when
    they are too few, uninformative ones in order as filler; and how many are filler."""
    good, rest = np.flatnonzero(informative), np.flatnonzero(~informative)
    chosen = good[:target]
    filler = target - len(chosen)
    return np.concatenate([chosen, rest[:filler]]).astype(np.int64), filler


def group_rows(groups, n: int) -> np.ndarray:
    """Row indices of the groups ``groups`` (``n`` consecutive rows each), group order kept."""
    groups = np.asarray(groups, dtype=np.int64)
    return (groups[:, None] * n + np.arange(n)[None, :]).reshape(-1)


def dynamic_sampling(exp: Experience, scores: dict, roll_more, args, pad_token_id: int):
    """DAPO's dynamic sampling: drop the groups whose responses all got the same end score and
    roll out more prompts (``roll_more(try) -> (Experience, scores)``) until every data rank has
    ``per_device_prompt_batch_size`` groups or ``dynamic_sampling_max_tries`` extra rollouts were
    made; all ranks decide together, so every rank makes as many rollouts.  A batch still
    short is filled with dropped groups (their group advantage is 0: no policy gradient, only the
    KL / entropy terms), so the batch keeps its size.  Returns (experience, its function scores,
    the counts for the metrics)."""
    n, target = args.num_return_sequences, args.per_device_prompt_batch_size
    exps, all_scores = [exp], [scores]
    kept = int(informative_groups(exp.end_scores.numpy(), n).sum())
    tries = 0
    # one decision over every rank, not only the data ranks: no rank can stop rolling out while
    # another (even a tensor/pipeline peer whose scores differed) waits in a rollout's collective
    while tries < args.dynamic_sampling_max_tries and parallel.max_over_ranks(int(kept < target)):
        tries += 1
        more, more_scores = roll_more(tries)
        exps.append(more)
        all_scores.append(more_scores)
        kept += int(informative_groups(more.end_scores.numpy(), n).sum())
    informative = np.concatenate([informative_groups(e.end_scores.numpy(), n) for e in exps])
    groups, filler = choose_groups(informative, target)
    rows = group_rows(groups, n)
    scores = {k: np.concatenate([s[k] for s in all_scores])[rows] for k in scores}
    stats = {"dynamic_sampling_tries": float(tries), "dynamic_sampling_dropped_groups": float((~informative).sum()),
             "dynamic_sampling_filler_groups": float(filler)}
    return Experience.concat(exps, pad_token_id).select(rows), scores, stats
