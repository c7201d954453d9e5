from ppo.models.loading import check_max_length, check_model_path, load_causal_lm, load_tokenizer
from ppo.models.normalizer import NORMALIZER_TYPES, Normalizer
from ppo.models.score_model import (
    LlamaModelForScore,
    ScoreOutput,
    last_token_index,
    load_score_model,
    position_ids_from_mask,
)
