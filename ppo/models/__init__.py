from ppo.models.families import ModelFamily, family_named, family_of, family_of_model
from ppo.models.loading import (check_max_length, check_model_path, check_weights_present, freeze, load_causal_lm,
                                load_score_model, load_tokenizer)
from ppo.models.normalizer import NORMALIZER_TYPES, Normalizer
from ppo.models.score_model import ScoreModel, ScoreOutput, last_token_index, position_ids_from_mask
