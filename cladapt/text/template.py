"""The base model's chat template: the one way a conversation becomes the text a model is given.

Training (``cladapt.train.chat``, which splits the same rendering into prompt and answer segments),
evaluation and serving all render through :func:`render`, so a prompt scored in evaluation is
byte-identical to the prompt the trainer learned from and the server answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: used only when a tokenizer has no chat template of its own (ChatML, as SmolLM2 uses)
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_TEMPLATE


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The text a model is given at inference: the conversation plus the assistant header."""
    ensure_chat_template(tokenizer)
    return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
