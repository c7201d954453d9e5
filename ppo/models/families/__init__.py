"""Model families behind one interface (``base.ModelFamily``); one file per family.

Importing this package registers every built-in family.  To add one: write ``<name>.py`` with a
``ModelFamily`` subclass decorated with ``@register`` and import it below.
"""

from ppo.models.families import ernie4_5, llama, mistral, qwen2, qwen3  # noqa: F401  (registers the families)
from ppo.models.families.base import (
    DecoderLayout,
    LayerWeights,
    ModelFamily,
    PipelineParts,
    Projection,
    family_named,
    family_of,
    family_of_model,
    register,
    supported,
)

DEMO_FAMILY = "llama"  # the family the built-in tiny example and the test fixtures build
