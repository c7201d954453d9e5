"""Data layer: raw datasets (registered by name), dataset specs, and tokenized datasets per stage.

Importing this package registers the built-in raw datasets: PKU-SafeRLHF (and its 30K/10K
subsets), alpaca, the tiny example, GSM8K, the generic prompt + reference schema, the
arithmetic task and the preference layouts of the DPO stage (``preference``).
"""

from ppo.data.base import (
    DatasetSpec,
    RawDataset,
    SampleListDataset,
    RawSample,
    describe_source,
    import_user_modules,
    load_records,
    parse_dataset_spec,
    require_fields,
    require_type,
)
from ppo.data import alpaca, arithmetic, gsm8k, preference, safe_rlhf, tiny  # noqa: F401  (registers the built-in names)
from ppo.data.datasets import (
    IGNORE_INDEX,
    PreferenceDataset,
    PromptOnlyDataset,
    PromptTemplate,
    SupervisedDataset,
    TokenizedDataset,
    TokenizedSubset,
    answer_mask,
    build_template,
    collate_preference,
    collate_prompts,
    collate_supervised,
    encode_answer,
    encode_prompt,
    load_datasets,
    mix_indices,
    pad_sequences,
)
from ppo.data.template import DEFAULT_FOLLOW_TEMPLATE, DEFAULT_TEMPLATE
from ppo.data.tokenizer_utils import ensure_pad_token

__all__ = [
    "DEFAULT_FOLLOW_TEMPLATE", "DEFAULT_TEMPLATE", "IGNORE_INDEX",
    "DatasetSpec", "RawDataset", "RawSample", "SampleListDataset", "describe_source", "import_user_modules", "load_records",
    "parse_dataset_spec", "require_fields", "require_type",
    "PreferenceDataset", "PromptOnlyDataset", "PromptTemplate", "SupervisedDataset", "TokenizedDataset",
    "TokenizedSubset", "answer_mask", "build_template", "collate_preference", "collate_prompts",
    "collate_supervised", "encode_answer", "encode_prompt", "load_datasets", "mix_indices", "pad_sequences",
    "ensure_pad_token",
]
