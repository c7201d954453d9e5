"""The reward-model stage's arguments (``rm/run_reward.py``) and the reward server's
(``rm/serve_reward.py``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ppo.args.common import DataArgs, ParallelArgs, TrainingArgs, arg, check_ranges, require, validate_shared


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


@dataclass
class ServeRewardArgs:
    """``rm/serve_reward.py``: a trained reward model (and/or reward functions) behind the endpoint
    protocol of ``ppo/rewards/remote.py``."""

    model_name_or_path: str = arg("", "Trained reward model to serve (a score model saved by rm/run_reward.py, or a "
                                      "transformers folder of one); empty: reward functions alone.", path="path")
    tokenizer_name_or_path: str = arg("", "Tokenizer encoding the requests (default: the reward model's; needed "
                                          "for reward functions served without a reward model).", path="path")
    host: str = arg("127.0.0.1", "Address to bind; 127.0.0.1 serves this machine only, 0.0.0.0 every network "
                                 "(the protocol has no authentication).")
    port: int = arg(8000, "Port to bind; 0: a free port (the bound URL is printed).", ge=0, le=65535)
    device: str = arg("", "Paddle device of the reward model: cpu, gpu, gpu:N (empty: paddle's default).")
    cpu_gemm: str = arg("auto", "CPU kernels of the reward model: oneDNN's GEMM from paddle's wheel and the toolkit's "
                                "compiled kernels (auto, onednn) or paddle's own ops (paddle), as in training.", ("auto", "onednn", "paddle"))
    max_batch_size: int = arg(32, "Rows per reward-model forward; rows of concurrent requests are batched together.",
                              ge=1)
    max_wait_ms: float = arg(5.0, "Milliseconds a forward waits for more rows before it runs with fewer.", ge=0)
    max_request_bytes: int = arg(8_000_000, "Largest request body accepted; a larger one is answered 413.", ge=1)
    max_rows_per_request: int = arg(4096, "Most responses one request may hold; more are answered 413.", ge=1)
    max_length: int = arg(1024, "Tokens of prompt + response scored per row, the last ones kept (give the PPO run's "
                                "max_length to score as its in-process reward model does).", ge=1)
    chat_template: bool = arg(False, "Render each row as a user turn (the prompt) and an assistant turn (the "
                                     "response) with the tokenizer's chat template, for clients that send raw "
                                     "questions; off: the prompt text as sent (a PPO run's prompts carry theirs).")
    normalize_reward: bool = arg(False, "Normalise the reward model's score with the statistics saved with it "
                                        "(PPO's normalize_reward).")
    reward_model_weight: float = arg(1.0, "Weight of the reward model's score in the served score.")
    reward_functions: str = arg("", "Reward functions added to the served score, comma-separated NAME[:weight] "
                                    "(math_exact, format, overlong; your own through extra_modules).")
    reward_format_pattern: str = arg("", "Regular expression of the 'format' function (empty: its default).")
    reward_overlong_buffer: int = arg(16, "Tokens before max_new_tokens over which 'overlong' grows to -1.", ge=1)
    max_new_tokens: int = arg(512, "The clients' max_new_tokens, for the 'overlong' function (it counts the "
                                   "response's tokens in this tokenizer).", ge=1)
    extra_modules: str = arg("", "Comma-separated Python modules or .py files to import first (register your "
                                 "own reward functions).", path="modules")

    def validate(self) -> None:
        check_ranges(self)
        require(bool(self.model_name_or_path or self.reward_functions),
                "nothing to serve: give model_name_or_path (a trained reward model) and/or reward_functions")
        require(bool(self.model_name_or_path or self.tokenizer_name_or_path),
                "reward functions served without a reward model need tokenizer_name_or_path (their response ids)")
        require(bool(self.host.strip()), "'host' is empty: give an address such as 127.0.0.1")
        require(re.fullmatch(r"(cpu|gpu(:\d+)?|xpu(:\d+)?|)", self.device) is not None,
                f"'device' must be cpu, gpu or gpu:N (empty: paddle's default), got {self.device!r}")
