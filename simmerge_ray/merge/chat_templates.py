"""Chat templates a config may name (`chat_template: chatml`), as mergekit accepts them.

Each named template renders a conversation as mergekit's template of that name does (tested
against it); the texts are our own. `auto` picks the template most of the input models' tokenizers
carry. Anything else must be the Jinja text of a template. mergekit's `exaone` renders with the
indentation of its template file's lines (transformers strips only the block tags' whitespace);
ours writes the same spaces and newlines, so conversations render identically.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from simmerge_ray.errors import ConfigError

_EACH = "{%- for message in messages -%}"
NAMES: dict[str, str] = {
    "chatml": _EACH + "{{ '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' }}"
                      "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}",
    "llama3": _EACH + "{{ (bos_token if loop.first else '') ~ '<|start_header_id|>' ~ message['role'] ~ "
                      "'<|end_header_id|>\\n\\n' ~ (message['content'] | trim) ~ '<|eot_id|>\\n' }}{%- endfor -%}"
                      "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
                      "{%- endif -%}",
    "mistral": "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none -%}"
               "{%- set turns = messages[1:] if system is not none else messages -%}{{ bos_token }}"
               "{%- for message in turns -%}"
               "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
               "{{ raise_exception('After the optional system message, conversation roles must alternate "
               "user/assistant/user/assistant/...') }}{%- endif -%}"
               "{%- if message['role'] == 'user' -%}"
               "{{ ' [INST] ' ~ (system ~ '\\n\\n' if loop.first and system is not none else '') ~ message['content']"
               " ~ ' [/INST]' }}"
               "{%- elif message['role'] == 'assistant' -%}{{ ' ' ~ message['content'] ~ eos_token }}"
               "{%- else -%}{{ raise_exception('Only user and assistant roles are supported, with the exception "
               "of an initial optional system message!') }}{%- endif -%}{%- endfor -%}",
    "exaone": _EACH + "{%- if loop.first and message['role'] != 'system' -%}"
                      "{{ '        [|system|][|endofturn|]\\n\\n' }}{%- endif -%}"
                      "{{ '    [|' ~ message['role'] ~ '|]' ~ message['content'] ~ '\\n        ' }}"
                      "{{ '\\n\\n' if message['role'] == 'user' else '[|endofturn|]\\n\\n' }}{%- endfor -%}"
                      "{%- if add_generation_prompt -%}{{ '    [|assistant|]\\n' }}{%- endif -%}",
    "alpaca": "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
              "{{ (systems | last).content | trim if systems else '' }}{{ '\\n\\n' }}"
              "{%- set heads = {'user': '### Instruction:', 'assistant': '### Response:', "
              "'user_context': '### Input:'} -%}"
              + _EACH + "{%- if message['role'] in heads -%}{{ heads[message['role']] ~ '\\n' ~ "
              "(message['content'] | trim) ~ ('' if loop.last else '\\n\\n') }}{%- endif -%}{%- endfor -%}"
              "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{ '### Response:\\n' }}"
              "{%- endif -%}",
}


def check_template(value: Any, where: str) -> None:
    """A name of NAMES, "auto", or a Jinja text (mergekit's test: at least 20 characters with a `{`)."""
    if not isinstance(value, str) or not (value in NAMES or value == "auto" or (len(value) >= 20 and "{" in value)):
        raise ConfigError(f"{where}: expected 'auto', one of {', '.join(sorted(NAMES))}, or the Jinja text of a "
                          f"template, got {value!r}")


def resolve_template(value: str, model_templates: list[str | None]) -> str | None:
    """The template text to write: a named one's text, the most common of the models' own for
    "auto" (None when none has one), else the text itself."""
    if value == "auto":
        found = [t.strip() for t in model_templates if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return NAMES.get(value, value)
