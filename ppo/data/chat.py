"""The tokenizer's own chat template, for ``prompt_template chat``.

The template (jinja, transformers' convention: ``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token``) comes from the model folder's ``tokenizer_config.json`` (``chat_template``: a string,
or a list of named templates, of which ``default``) or else from ``chat_template.jinja`` (where
transformers 4.5x / 5.x save it; paddlenlp does not read that file).  It is rendered here, with
jinja's sandbox and transformers' whitespace options, so both file layouts behave alike.
"""

from __future__ import annotations

import os

from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ppo.core.errors import UserError
from ppo.storage.files import read_json, read_text

CHAT = "chat"  # the prompt_template value that selects the tokenizer's template


def load_chat_template(path: str, what: str = "model_name_or_path") -> str:
    """The jinja source of the chat template of the model folder ``path``; UserError (one line) when
    it has none."""
    source, origin = None, ""
    config_file = os.path.join(path or "", "tokenizer_config.json")
    if os.path.isfile(config_file):
        source, origin = read_json(config_file, "tokenizer config").get("chat_template"), config_file
    if isinstance(source, list):  # [{"name": ..., "template": ...}]
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    jinja_file = os.path.join(path or "", "chat_template.jinja")
    if not source and os.path.lexists(jinja_file):  # a folder of that name: read_text says so
        source, origin = read_text(jinja_file, "chat template"), jinja_file
        if not source.strip():
            raise UserError(f"chat template '{jinja_file}' is empty (truncated?); expected a jinja template")
    if isinstance(source, str) and source.strip():
        try:
            ImmutableSandboxedEnvironment().parse(source)
        except TemplateSyntaxError as e:
            raise UserError(f"chat template of '{origin}' is not a valid jinja template: {e.message} (line "
                            f"{e.lineno}); the file is damaged or not a template") from None
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"prompt_template 'chat' uses the tokenizer's chat template, but '{what}' = '{path}' has none "
                        "(no chat_template in tokenizer_config.json, no chat_template.jinja); give a prompt_template "
                        "with an {input} placeholder instead")
    return source


class ChatRenderer:
    """Renders a list of ``{"role", "content"}`` messages with a chat template's jinja source."""

    def __init__(self, source: str):
        def raise_exception(message):
            raise UserError(f"the chat template refused the conversation: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source)

    def render(self, messages: list[dict], add_generation_prompt: bool, tokenizer) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "")
