"""General-domain texts for GeRe replay (methods.md §5): read from a file, or self-generated.

GeRe replays the first 1,000 SlimPajama documents, which cannot be shipped offline. cladapt's
offline default **[cladapt]** is *self-generated*: the base model itself writes ``N`` texts, by
sampling (temperature 0.8, top-p 0.95, seeded) answers to a fixed, varied list of
:data:`SEED_PROMPTS` (science, history, everyday life, code, maths, writing, ...; prompt ``i``
is ``SEED_PROMPTS[i % len]``, so ``N`` > 60 revisits prompts with different samples). Replaying
the base's own generations anchors the model on text it already models well, over many topics
and registers; a real pretraining sample (``--texts``) remains the better choice when one exists.
The texts are stored with the replay record, so the set is fixed once recorded.

Files of texts are read by :func:`cladapt.text.texts.load_texts`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cladapt.text.texts import texts_sha256

logger = logging.getLogger(__name__)

SAMPLING = {"temperature": 0.8, "top_p": 0.95}
DEFAULT_BATCH_SIZE = 16

SEED_PROMPTS: tuple[str, ...] = (
    "Explain how photosynthesis works.",
    "Describe the water cycle on Earth.",
    "Write a short history of the printing press.",
    "What causes the seasons on Earth?",
    "Explain the difference between weather and climate.",
    "Describe how a bill becomes a law in a democracy.",
    "Write a paragraph about the Roman Empire.",
    "Explain what a black hole is.",
    "Give some tips for a healthy breakfast.",
    "Describe a busy market in a large city.",
    "Write a short story about a lost dog finding its way home.",
    "Explain how vaccines train the immune system.",
    "What is the theory of evolution by natural selection?",
    "Describe the rules of football (soccer).",
    "Explain how a computer stores information.",
    "Write a Python function that checks whether a number is prime, and explain it.",
    "Explain what an algorithm is, with an example.",
    "Describe the life cycle of a butterfly.",
    "Write a letter thanking a teacher.",
    "What are the main causes of the First World War?",
    "Explain supply and demand in simple terms.",
    "Describe how bread is made.",
    "Explain the Pythagorean theorem and how to use it.",
    "Write a poem about the ocean.",
    "Describe the planets of the solar system.",
    "Explain how electricity reaches a home.",
    "What is the role of the heart in the human body?",
    "Describe a traditional festival from any culture.",
    "Explain how to solve a linear equation.",
    "Write a product description for a reusable water bottle.",
    "Summarize the plot of a famous novel of your choice.",
    "Explain the basics of how the internet works.",
    "Describe the geography of South America.",
    "What are the benefits of regular exercise?",
    "Explain what inflation is and why it matters.",
    "Describe how a volcano erupts.",
    "Write a short dialogue between a customer and a shop assistant.",
    "Explain the difference between a virus and a bacterium.",
    "Describe the invention of the telephone.",
    "Give advice to someone starting their first job.",
    "Explain what a noun, a verb and an adjective are.",
    "Describe the architecture of ancient Egypt.",
    "Explain why the sky is blue.",
    "Write a news report about a local charity event.",
    "What is machine learning? Explain it to a beginner.",
    "Describe how to plant and care for a tomato plant.",
    "Explain the importance of sleep.",
    "Describe the main features of a desert ecosystem.",
    "Write instructions for making a cup of tea.",
    "Explain what a fraction is and how to add two fractions.",
    "Describe the history of the Olympic Games.",
    "Explain how airplanes stay in the air.",
    "Write a review of a restaurant you imagine.",
    "What is democracy and how did it begin?",
    "Explain the greenhouse effect.",
    "Describe a day in the life of a farmer.",
    "Explain how money is used in an economy.",
    "Describe the structure of an atom.",
    "Write a short biography of a famous scientist.",
    "Explain recycling and why it helps the environment.",
    "Describe how rivers shape landscapes.",
    "Explain what a spreadsheet is used for.",
    "Write an email asking a colleague for help with a project.",
    "Describe the main religions of the world in a few sentences each.",
)


def self_generate(
    model: Any,
    tokenizer: Any,
    n: int,
    *,
    seed: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[dict[str, str]]:
    """``n`` texts sampled from the base model (adapters must be off) for the seed prompts.

    Each batch re-seeds torch with ``seed + batch index``, so the texts depend only on the
    model, ``n``, ``seed``, ``max_new_tokens`` and ``batch_size``.
    """
    from cladapt.text.generation import generate

    prompts = [SEED_PROMPTS[i % len(SEED_PROMPTS)] for i in range(n)]
    texts = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens=max_new_tokens,
                     batch_size=batch_size, sampling=SAMPLING, seed=seed)
    out = [{"text": t, "id": f"self-{i}", "source": f"self-generated:{prompts[i]}"} for i, t in enumerate(texts)]
    logger.info("self-generated %d general texts", n)
    return [t for t in out if t["text"]]


def generation_settings(n: int, seed: int, max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """What :func:`self_generate` depends on, for the record's metadata."""
    return {
        "n": n,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "prompts": len(SEED_PROMPTS),
        "prompts_sha256": texts_sha256(SEED_PROMPTS),
        **SAMPLING,
    }


def replay_corpus(
    model: Any, tokenizer: Any, *, texts: str | Path | None, n: int, max_tokens: int, seed: int = 0
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The general texts replay statistics are recorded on, and where they came from (kept in ``gere.json``).

    ``texts``: a file of the user's (``.jsonl``/``.json`` with ``text``, or ``.txt``), recorded with its
    sha256; None: ``n`` texts the base model writes from the seed prompts (:func:`self_generate`).
    """
    if texts is not None:
        from cladapt.registry.fsio import sha256_file
        from cladapt.text.texts import load_texts

        source = {"kind": "file", "path": str(Path(texts).resolve()), "file_sha256": sha256_file(Path(texts))[0]}
        return load_texts(texts), source
    rows = self_generate(model, tokenizer, n, seed=seed, max_new_tokens=max_tokens)
    return rows, {"kind": "self-generated", "generation": generation_settings(n, seed, max_tokens, DEFAULT_BATCH_SIZE)}
