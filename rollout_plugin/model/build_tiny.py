"""Build the project's tiny, randomly initialised Llama model as a Hugging Face model directory.

Standalone on purpose (imports nothing from ``rollout_plugin``): it runs by file path under the
engine's interpreter, which has torch/transformers/tokenizers but maybe not this package::

    <engine-python> build_tiny.py --out DIR [--seed 0] [--dtype bfloat16]

The directory holds a byte-level BPE tokenizer trained here on a generated corpus (arithmetic Q/A
plus plain sentences), a chat template, a LlamaConfig (head_dim 64: vLLM's CPU attention rejects
smaller heads) and seeded random weights in model.safetensors. Same seed, same bytes. The build
goes to a temporary sibling directory renamed into place under an fcntl lock, so concurrent
builders don't collide and a crash never leaves a half-built model. The last stdout line is DIR.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLES]  # ids 0..5
VOCAB_SIZE = 4096
DEFAULT_DTYPE = "bfloat16"
# The assistant turn ends with eos and nothing after it, so prompt + generation renders exactly
# like the whole conversation (what an RL trainer re-tokenizes).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
WORDS = (
    "the a one every some small large quick slow red blue green old new happy quiet model "
    "student teacher cat dog bird river city house garden book letter number answer question "
    "problem reads writes finds counts adds checks sees builds carries opens near under over "
    "with without before after and but because so then today yesterday often never always"
).split()


def corpus(n_lines: int = 9000) -> list[str]:
    """A fixed text (independent of --seed, so every seed shares one tokenizer)."""
    rng = random.Random(20240601)
    ops = [("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b)]
    lines = []
    for i in range(n_lines):
        if i % 3 == 2:
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
            lines.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?"]))
            continue
        sym, fn = rng.choice(ops)
        a, b = rng.randint(0, 999 if sym != "*" else 99), rng.randint(0, 999 if sym != "*" else 99)
        q = rng.choice(["What is {a} {s} {b}?", "Compute {a} {s} {b}.", "Calculate {a} {s} {b}."])
        lines.append(q.format(a=a, s=sym, b=b) + f" The answer is {fn(a, b)}.")
    return lines


def build_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus()
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)]
    )
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "additional_special_tokens": list(ROLES),
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    write_json(out / "tokenizer_config.json", tokenizer_config)
    special_map = {k: v for k, v in special.items() if v is not None}
    write_json(out / "special_tokens_map.json", {**special_map, "additional_special_tokens": list(ROLES)})
    return tok.get_vocab_size(with_added_tokens=True)


def build_model(out: Path, vocab_size: int, seed: int, dtype_name: str) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    ids = {"pad_token_id": SPECIAL_TOKENS.index(PAD), "bos_token_id": SPECIAL_TOKENS.index(BOS),
           "eos_token_id": SPECIAL_TOKENS.index(EOS)}
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        **ids,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)  # initialised in float32, then cast: same bytes every time
    model = model.to(getattr(torch, dtype_name)).eval()
    model.config.dtype = dtype_name
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(out, safe_serialization=True)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build(out: Path, seed: int, dtype_name: str) -> Path:
    out = out.expanduser().absolute()
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent builder waits here, then finds it done
        if (out / "config.json").is_file():
            return out
        if out.exists() and any(out.iterdir()):
            raise SystemExit(f"error: {out} exists, is not empty and has no config.json")
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed builder
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            vocab_size = build_tokenizer(tmp)
            build_model(tmp, vocab_size, seed, dtype_name)
            write_json(tmp / "build_info.json", {"builder": "rollout_plugin build_tiny.py v1",
                                                "seed": seed, "dtype": dtype_name})
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700 (and some files come out 0600)
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
            if out.exists():  # an empty directory: rename() may replace it
                out.rmdir()
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="model directory to create")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.add_argument("--dtype", default=DEFAULT_DTYPE, choices=["bfloat16", "float32", "float16"])
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = build(args.out, args.seed, args.dtype)
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
