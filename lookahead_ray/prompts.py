"""The one prompt renderer, shared by training and evaluation.

LookAhead Tuning rests on the inference prompt being the training prompt minus the preview, so both go
through :func:`prompt_messages` (system turn + ``prompt_template`` on the last user turn) and
:func:`render_prompt` (the tokenizer's chat template with the assistant generation header). A system prompt
of ``None`` or ``""`` adds no system turn. Pure module: the tokenizer is passed in.
"""

from __future__ import annotations

from typing import Any

INSTRUCTION_SLOT = "{instruction}"
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
"""The Llama-2-chat template as its tokenizer_config.json ships it, minus the role-alternation checks (for
checkpoints saved without one: ``model.chat_template``)."""


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


SENTINEL = "\ue000lookahead-prompt\ue001"
"""Private-use characters around a name: no real prompt contains it (a row that does is rendered in full)."""


class PromptRenderer:
    """:func:`render_prompt` for many prompts, with a fast path for the common shape (an optional system turn
    and one user turn): the chat template is rendered once per (system prompt, whitespace at the content's
    two ends) around :data:`SENTINEL`, and each prompt is that text with its content spliced in. A Jinja
    render per row was the largest cost of `prepare` (measured in benchmarks/preview_throughput.py).

    A template may transform the content (strip it, merge the system turn into it); splicing is exact when it
    treats the content as opaque apart from its ends, which the whitespace key covers. Anything else is caught:
    the first fast prompt of every batch is rendered in full as well, and on any difference the fast path is
    switched off for good (``fast_path_disabled`` says why) and the batch is rendered in full.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.fast_path_disabled: str | None = None
        self._frames: dict[tuple[str | None, str, str], tuple[str, str] | None] = {}

    def render_many(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        """The rendered prompt of each message list (as :func:`render_prompt`)."""
        rendered = [None if self.fast_path_disabled else self._fast(m) for m in conversations]
        checked = next((i for i, text in enumerate(rendered) if text is not None), None)
        if checked is not None:
            full = render_prompt(self.tokenizer, conversations[checked])
            if full != rendered[checked]:
                self.fast_path_disabled = (f"the chat template's text for a prompt differs from the spliced one "
                                           f"(full {full[:80]!r} vs fast {rendered[checked][:80]!r})")
                rendered = [None] * len(conversations)
        return [text if text is not None else render_prompt(self.tokenizer, m)
                for text, m in zip(rendered, conversations, strict=True)]

    def _fast(self, messages: list[dict[str, str]]) -> str | None:
        roles = [m.get("role") for m in messages]
        if roles not in (["user"], ["system", "user"]) or any(set(m) != {"role", "content"} for m in messages):
            return None
        content = messages[-1]["content"]
        if not isinstance(content, str) or not content.strip() or SENTINEL in content:
            return None
        core = content.strip()
        lead, trail = content[:len(content) - len(content.lstrip())], content[len(content.rstrip()):]
        system = messages[0]["content"] if len(messages) == 2 else None
        key = (system, lead, trail)
        if key not in self._frames:
            self._frames[key] = self._frame(messages[:-1], lead, trail)
        frame = self._frames[key]
        return None if frame is None else frame[0] + core + frame[1]

    def _frame(self, head: list[dict[str, str]], lead: str, trail: str) -> tuple[str, str] | None:
        text = render_prompt(self.tokenizer, [*head, {"role": "user", "content": lead + SENTINEL + trail}])
        if text.count(SENTINEL) != 1:  # the template repeats or drops the content: no splicing
            return None
        before, _, after = text.partition(SENTINEL)
        return before, after
