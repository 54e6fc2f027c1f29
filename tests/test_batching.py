"""The data order is a pure function of (seed, step, rank); micro-batches pad to their longest; flattened documents stay apart."""

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import minilm_path, sentences

from tunery_trainer.attention import PER_DOCUMENT_SDPA, packed_kernel
from tunery_trainer.batching import Schedule, collator, flatten, step_seed
from tunery_trainer.tokenization import IGNORE_INDEX, tokenize


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import decoder

    return decoder(tmp_path_factory.mktemp("decoder"))


@pytest.fixture(scope="module")
def wordpiece() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


# Schedule


def indices(schedule: Schedule, step: int, rank: int) -> list[int]:
    return [index for batch in schedule.micro_batches(step, rank) for index in batch]


def test_micro_batches_are_a_pure_function_of_seed_step_and_rank() -> None:
    first, again = Schedule(50, 3, 2, 2, seed=7), Schedule(50, 3, 2, 2, seed=7)
    for step in (0, 4, 9, 31):
        for rank in (0, 1):
            batches = first.micro_batches(step, rank)
            assert len(batches) == 2 and all(len(batch) == 3 for batch in batches)
            assert batches == again.micro_batches(step, rank)
    assert indices(first, 0, 0) != indices(Schedule(50, 3, 2, 2, seed=8), 0, 0)
    assert indices(first, 0, 0) != indices(first, 0, 1)


def test_one_epoch_covers_every_sequence_with_ranks_disjoint_within_each_step() -> None:
    schedule = Schedule(103, batch_size=4, accumulation=2, world_size=3, seed=5)
    assert schedule.per_step == 24 and schedule.steps_per_epoch == 5
    covered = set()
    for step in range(schedule.steps_per_epoch):
        # The last step wraps around to the epoch's start; even then no sequence is used twice in one step.
        in_step = [index for rank in range(3) for index in indices(schedule, step, rank)]
        assert len(in_step) == 24 == len(set(in_step))
        covered.update(in_step)
    assert covered == set(range(103))


def test_epochs_are_permutations_in_different_orders() -> None:
    schedule = Schedule(64, batch_size=4, accumulation=2, world_size=1, seed=3)
    steps = schedule.steps_per_epoch
    assert steps == 8
    epochs = [
        [index for step in range(epoch * steps, (epoch + 1) * steps) for index in indices(schedule, step, 0)]
        for epoch in range(3)
    ]
    for order in epochs:
        assert sorted(order) == list(range(64))
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]


def test_steps_per_epoch_and_total_steps() -> None:
    schedule = Schedule(100, batch_size=4, accumulation=2, world_size=1, seed=0)
    assert schedule.steps_per_epoch == 13
    assert schedule.total_steps(epochs=1, max_steps=0) == 13
    assert schedule.total_steps(epochs=2.5, max_steps=0) == 33
    assert schedule.total_steps(epochs=0.01, max_steps=0) == 1
    assert schedule.total_steps(epochs=3, max_steps=7) == 7
    assert schedule.total_steps(epochs=0.1, max_steps=500) == 500
    assert Schedule(96, 4, 2, 2, seed=0).steps_per_epoch == 6
    assert Schedule(3, 4, 2, 2, seed=0).steps_per_epoch == 1


def test_step_seed_is_deterministic_and_distinct_per_step_and_rank() -> None:
    seeds = {(step, rank): step_seed(42, step, rank) for step in range(200) for rank in range(8)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= value < 2**63 for value in seeds.values())
    assert step_seed(42, 17, 3) == seeds[17, 3]
    assert step_seed(43, 17, 3) != seeds[17, 3]


# Collators


def test_sequence_classification_pads_to_the_longest_in_the_batch(wordpiece: Any) -> None:
    texts = ["the sky is blue", "grass", "one plum is purple and one carrot is orange"]
    data = tokenize(
        "sequence-classification", wordpiece, [{"text": t, "label": "b"} for t in texts], [], 512, ["a", "b"]
    )
    batch = collator("sequence-classification", wordpiece, False)(data.train[:2])
    lengths = [len(sequence["input_ids"]) for sequence in data.train[:2]]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["labels"].tolist() == [1, 1]
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert batch["input_ids"][row, :length].tolist() == data.train[row]["input_ids"]
        assert set(batch["input_ids"][row, length:].tolist()) <= {wordpiece.pad_token_id}


def test_token_classification_pads_labels_with_ignore_index(wordpiece: Any) -> None:
    examples = [
        {"tokens": ["Tunery", "learns"], "tags": ["B", "O"]},
        {"tokens": ["photosynthesis", "is", "green", "and", "quick"], "tags": ["B", "O", "O", "O", "O"]},
    ]
    data = tokenize("token-classification", wordpiece, examples, [], 512, ["O", "B"])
    short, long = (len(sequence["input_ids"]) for sequence in data.train)
    assert short < long
    batch = collator("token-classification", wordpiece, False)(data.train)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, long)
    assert batch["labels"][0].tolist() == data.train[0]["labels"] + [IGNORE_INDEX] * (long - short)
    assert batch["attention_mask"].tolist() == [[1] * short + [0] * (long - short), [1] * long]
    assert batch["input_ids"][0, short:].tolist() == [wordpiece.pad_token_id] * (long - short)


def test_masked_lm_masks_some_tokens_and_labels_only_those(wordpiece: Any) -> None:
    texts = [" ".join(sentences(6, seed=seed)) for seed in range(4)] + ["red"]
    data = tokenize("masked-lm", wordpiece, [{"text": text} for text in texts], [], 512, [])
    collate = collator("masked-lm", wordpiece, False)
    torch.manual_seed(0)
    batch = collate(data.train)
    torch.manual_seed(0)
    again = collate(data.train)
    assert all(torch.equal(batch[key], again[key]) for key in ("input_ids", "labels"))
    torch.manual_seed(1)
    assert not torch.equal(collate(data.train)["labels"], batch["labels"])

    longest = max(len(sequence["input_ids"]) for sequence in data.train)
    original = torch.tensor(
        [s["input_ids"] + [wordpiece.pad_token_id] * (longest - len(s["input_ids"])) for s in data.train]
    )
    assert batch["input_ids"].shape == batch["labels"].shape == (len(texts), longest)
    chosen = batch["labels"] != IGNORE_INDEX
    assert 0 < int(chosen.sum()) < int((original != wordpiece.pad_token_id).sum())
    assert torch.equal(batch["labels"][chosen], original[chosen])
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])
    assert (batch["input_ids"][chosen] == wordpiece.mask_token_id).any()
    special = torch.isin(original, torch.tensor(wordpiece.all_special_ids))
    assert not (chosen & special).any()


# Flattened micro-batches


def test_flatten_lays_documents_end_to_end_and_marks_their_bounds() -> None:
    docs = [
        {"input_ids": [10, 11, 12], "labels": [IGNORE_INDEX, 11, 12]},
        {"input_ids": [20, 21], "labels": [20, 21]},
        {"input_ids": [30, 31, 32, 33], "labels": [30, 31, 32, 33]},
    ]
    batch = flatten(docs)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30, 31, 32, 33]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # No document learns to predict the next one's first token.
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 11, 12, IGNORE_INDEX, 21, IGNORE_INDEX, 31, 32, 33]]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 5, 9]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 4
    assert "attention_mask" not in batch


def test_a_causal_lm_collator_flattens_only_when_asked(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    docs = tokenize("causal-lm", tokenizer, [{"text": text} for text in sentences(3, seed=3)], [], 64, []).train
    assert collator("causal-lm", tokenizer, True)(docs).keys() == flatten(docs).keys()
    padded = collator("causal-lm", tokenizer, False)(docs)
    assert padded["input_ids"].shape == (3, max(len(doc["input_ids"]) for doc in docs))


def logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


@pytest.mark.parametrize("kernel", [PER_DOCUMENT_SDPA, "flex_attention"])
def test_a_flattened_document_sees_only_itself(tiny_llama: Path, kernel: str) -> None:
    """Each document of a flattened row gets the logits it gets alone; plain causal attention over the row does not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert packed_kernel(torch.device("cpu")) == PER_DOCUMENT_SDPA
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    docs = tokenize("causal-lm", tokenizer, [{"text": text} for text in sentences(4, seed=3)], [], 64, []).train
    batch = flatten(docs)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=kernel).eval()
    flattened = logits(model, batch)[0]
    # The counterfactual: plain causal attention over the whole row (a 2D mask stops transformers from finding the
    # documents in the position ids).
    model.set_attn_implementation("sdpa")
    row = {key: batch[key] for key in ("input_ids", "position_ids")}
    across = logits(model, row | {"attention_mask": torch.ones_like(batch["input_ids"])})[0]
    bounds = batch["cu_seq_lens_q"].tolist()
    for number, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
        alone = logits(model, {"input_ids": torch.tensor([docs[number]["input_ids"]])})[0]
        torch.testing.assert_close(flattened[start:end], alone, atol=1e-5, rtol=0)
        difference = (across[start:end] - alone).abs().max()
        assert difference < 1e-5 if number == 0 else difference > 1e-2
