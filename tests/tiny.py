"""Build a tiny random Llama-architecture model and tokenizer, offline, in a few seconds.

Used by the test suite (and benchmarks' smoke modes). Hidden 64, 2 layers, 4 query heads and
2 KV heads, so SVDs and full ``B @ A`` products are cheap (methods.md §0.3).
"""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "the a film movie was great terrible good bad fine delight boring plot actor story review "
    "positive negative neutral sports world business science technology company artist animal "
    "plant village album what is topic sentiment of following paragraph choose one from option "
    "answer yes no question text title sentence true false explain because"
).split()


def build_tiny(folder: Path, *, seed: int = 0, heads: int = 4) -> Path:
    """The tiny model in ``folder``; ``heads=1`` gives head_dim 64 (what vLLM's CPU attention kernels need)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from cladapt.text.template import FALLBACK_TEMPLATE

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 3
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    fast.chat_template = FALLBACK_TEMPLATE
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=min(2, heads),
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
