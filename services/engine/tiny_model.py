"""Build a tiny HF-format model locally: ``pope model init --out DIR``.

No network: the tokenizer is a byte-level BPE trained with ``tokenizers`` on a small
math corpus generated here, and the model is a randomly initialised Qwen3 (the
architecture of the POPE paper's base model) with a few layers. The directory holds
``config.json``, ``model.safetensors``, the tokenizer files and a ChatML chat template,
so ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load it
exactly as they load a hub model; everything downstream runs its real loading code.

The weights are random, so the model writes gibberish until it is trained; the
``seed`` makes a given directory reproducible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

# Special tokens of the ChatML format Qwen models use.
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of the tiny model; defaults run a forward pass in well under a millisecond per token."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    max_positions: int = 4096
    seed: int = 0


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    """Math-flavoured text so the BPE learns digits, LaTeX and answer phrasing."""
    rng = random.Random(seed)
    words = [
        "Find",
        "Compute",
        "Let",
        "the",
        "value",
        "of",
        "sum",
        "product",
        "number",
        "integer",
        "Solve",
        "for",
        "such",
        "that",
        "answer",
        "is",
        "Therefore",
        "so",
        "We",
        "have",
        "Since",
        "partial",
        "solution",
        "continue",
        "problem",
        "Study",
        "final",
        "put",
        "in",
    ]
    latex = ["\\boxed{", "\\frac{", "\\sqrt{", "\\cdot", "\\le", "\\ge", "\\pi", "^2", "_n", "}", "$"]
    out = []
    for _ in range(lines):
        parts = []
        for _ in range(rng.randint(4, 14)):
            r = rng.random()
            if r < 0.45:
                parts.append(rng.choice(words))
            elif r < 0.75:
                parts.append(str(rng.randint(0, 999)))
            elif r < 0.9:
                parts.append(rng.choice(latex))
            else:
                parts.append(rng.choice("+-*/=()<>,."))
        out.append(" ".join(parts))
    return out


def build_tokenizer(vocab_size: int, seed: int, corpus: list[str] | None = None):  # type: ignore[no-untyped-def]
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else _corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    out: Path, spec: TinyModelSpec | None = None, corpus: list[str] | None = None, init_std: float = 0.2
) -> Path:
    """Write the tokenizer (BPE trained on ``corpus``, default a math-flavoured one) and a
    random Qwen3 model (weights ~ N(0, ``init_std``)) to ``out``; return ``out``."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    spec = spec or TinyModelSpec()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size, spec.seed, corpus)
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    pad = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(spec.seed)
    model = Qwen3ForCausalLM(config)
    # Random init with std 0.02 gives near-uniform next-token distributions; a larger
    # scale makes the tiny model's outputs peaked enough that sampling settings matter.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, init_std)
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
