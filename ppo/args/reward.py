"""The reward-model stage's arguments (``rm/run_reward.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from ppo.args.common import DataArgs, ParallelArgs, TrainingArgs, arg, validate_shared


@dataclass
class RewardArgs(TrainingArgs, ParallelArgs, DataArgs):
    model_name_or_path: str = arg("", "Backbone to start from (a paddlenlp causal LM or a saved score model).",
                                  path="path")
    loss_type: str = arg("sequence-wise", "Preference loss on end scores or over the differing span.",
                         ("sequence-wise", "token-wise"))
    regularization: float = arg(0.0, "L2 coefficient on the scores.", ge=0)
    margin: float = arg(0.0, "Margin m in -log sigmoid(r_better - r_worse - m).", ge=0)
    score_bias: bool = arg(True, "Give the score head a bias.")
    normalize_score_during_training: bool = arg(False, "Normalise scores with the running statistics while training.")
    normalizer_type: str = arg("RunningMeanStd", "Score normaliser whose statistics are saved with the model.",
                               ("RunningMeanStd", "ExponentialMovingAverage", "none"))
    normalizer_momentum: float = arg(0.9, "Momentum of the ExponentialMovingAverage normaliser.", ge=0, lt=1)

    def validate(self) -> None:
        validate_shared(self)
