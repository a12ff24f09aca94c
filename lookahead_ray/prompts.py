"""The one prompt renderer, shared by training and evaluation.

LookAhead Tuning rests on the inference prompt being the training prompt minus the preview, so both go
through :func:`prompt_messages` (system turn + ``prompt_template`` on the last user turn) and
:func:`render_prompt` (the tokenizer's chat template with the assistant generation header). A system prompt
of ``None`` or ``""`` adds no system turn. Pure module: the tokenizer is passed in.
"""

from __future__ import annotations

from typing import Any

INSTRUCTION_SLOT = "{instruction}"


def prompt_messages(conversation: list[dict[str, str]], system_prompt: str | None = None,
                    prompt_template: str = INSTRUCTION_SLOT) -> list[dict[str, str]]:
    """Chat messages for a conversation that ends with the user turn to be answered.

    ``prompt_template`` wraps the last turn's content (e.g. ``"Summarize this dialog:\\n{instruction}"``);
    the input list and its dicts are not modified.
    """
    messages = [dict(m) for m in conversation]
    if messages:
        last = messages[-1]
        last["content"] = prompt_template.replace(INSTRUCTION_SLOT, last["content"])
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def user_prompt_messages(instruction: str, system_prompt: str | None = None,
                         prompt_template: str = INSTRUCTION_SLOT) -> list[dict[str, str]]:
    """:func:`prompt_messages` for a single user turn."""
    return prompt_messages([{"role": "user", "content": instruction}], system_prompt, prompt_template)


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The chat-template text of ``messages`` followed by the assistant generation header."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
