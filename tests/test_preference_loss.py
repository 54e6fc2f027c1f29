"""Preference losses equal TRL's on the same tiny models and pairs; packed rows score sequences as padded rows do."""

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tunery_trainer import preference
from tunery_trainer.attention import packed_kernel
from tunery_trainer.batching import flatten
from tunery_trainer.preference import (
    dpo_loss,
    orpo_loss,
    pairwise_reward_loss,
    preference_metrics,
    report_metrics,
    sequence_logps,
)
from tunery_trainer.tokenization import IGNORE_INDEX

BETA = 0.1
# (prompt, chosen, rejected) token ids of different lengths, so padding and the completion masks differ per pair.
PAIRS = [
    ([5, 17, 42], [61, 7, 88, 3], [90, 12]),
    ([33, 8, 71, 20, 54], [9, 64], [27, 81, 46, 15, 30]),
    ([11, 93], [44, 19, 70], [52, 6, 38]),
    ([77, 24, 58, 13], [35], [49, 66, 21, 84]),
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from tiny_models import COLORS, COUNTS, THINGS, sentences

    from tunery_trainer.modeling import train_tokenizer

    return train_tokenizer(sentences(100) + COLORS + THINGS + COUNTS, vocab_size=128, with_mask=False)


def tiny_llama(tokenizer: Any, seed: int, task: str = "causal-lm", attention: str = "sdpa") -> torch.nn.Module:
    import transformers
    from tiny_models import DECODER_CONFIGS

    config = transformers.LlamaConfig(
        **DECODER_CONFIGS["llama"],
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=1,
    )
    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForSequenceClassification
    transformers.set_seed(seed)
    return auto.from_config(config, attn_implementation=attention).eval()


def padded(rows: list[list[int]], prompt_lengths: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows with their attention mask, and labels only on each row's completion."""
    longest = max(map(len, rows))
    input_ids = torch.tensor([row + [pad_id] * (longest - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in rows])
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    for row, prompt_length in enumerate(prompt_lengths):
        labels[row, :prompt_length] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pair_logps(model: torch.nn.Module, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed completion log-probabilities and token counts of the chosen, then the rejected, sequences."""
    rows = [prompt + chosen for prompt, chosen, _ in PAIRS] + [prompt + rejected for prompt, _, rejected in PAIRS]
    batch = padded(rows, [len(prompt) for prompt, _, _ in PAIRS] * 2, pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    sums, counts = sequence_logps(logits, batch["labels"])
    chosen_sums, rejected_sums = sums.chunk(2)
    chosen_counts, rejected_counts = counts.chunk(2)
    return chosen_sums, rejected_sums, chosen_counts, rejected_counts


def preference_dataset() -> Any:
    """A text dataset for the TRL trainers' constructors; the tests feed them token ids directly."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["one sky is"], "chosen": [" blue ."], "rejected": [" red ."]})


@pytest.mark.parametrize("chunk_positions", [3, 1_000_000])
def test_sequence_logps_and_their_gradients_equal_a_full_log_softmax(
    chunk_positions: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    vocab = 11
    monkeypatch.setattr(preference, "CHUNK_LOGITS_BYTES", chunk_positions * 4 * vocab)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, vocab, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = torch.randint(0, vocab, (3, 7), generator=generator)
    labels[0, :3] = IGNORE_INDEX
    labels[1, 5:] = IGNORE_INDEX
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    sums, counts = sequence_logps(logits, labels)
    (grad,) = torch.autograd.grad((sums * weights).sum(), logits)

    targets = labels[:, 1:]
    kept = targets != IGNORE_INDEX
    expected = (logits[:, :-1].log_softmax(-1).gather(2, targets.clamp(min=0)[..., None])[..., 0] * kept).sum(1)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    torch.testing.assert_close(sums, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)
    assert counts.tolist() == kept.sum(1).tolist() == [4, 4, 6]


def test_bf16_logits_get_fp32_logps_and_bf16_gradients() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 13, generator=generator).bfloat16().requires_grad_()
    labels = torch.randint(0, 13, (2, 9), generator=generator)
    as_fp32 = logits.detach().float().requires_grad_()

    sums, _ = sequence_logps(logits, labels)
    sums.sum().backward()
    expected, _ = sequence_logps(as_fp32, labels)
    expected.sum().backward()

    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums, expected, rtol=0, atol=1e-5)
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.float(), as_fp32.grad, rtol=0, atol=1e-2)


def test_packed_logps_need_one_flattened_row() -> None:
    with pytest.raises(ValueError, match="cu_seq_lens.*2 rows.*batching.flatten"):
        sequence_logps(torch.zeros(2, 4, 5), torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 2, 4]))


def test_dpo_loss_and_metrics_equal_trl(tokenizer: Any, tmp_path: Path) -> None:
    pytest.importorskip("trl")
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    policy, reference = tiny_llama(tokenizer, seed=0), tiny_llama(tokenizer, seed=1)
    policy_chosen, policy_rejected, _, _ = pair_logps(policy, tokenizer.pad_token_id)
    reference_chosen, reference_rejected, _, _ = pair_logps(reference, tokenizer.pad_token_id)
    ours = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, BETA)
    metrics = report_metrics(
        preference_metrics(ours.chosen_rewards, ours.rejected_rewards, policy_chosen, policy_rejected), "eval"
    )

    trainer = DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=DPOConfig(output_dir=str(tmp_path), beta=BETA, report_to=[], use_cpu=True, bf16=False),
        train_dataset=preference_dataset(),
        processing_class=tokenizer,
    )
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(
        [{"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected} for prompt, chosen, rejected in PAIRS]
    )
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch)
    logged = {name: values[-1] for name, values in trainer._metrics["eval"].items()}

    assert abs(ours.loss.item() - theirs.item()) < 1e-5
    assert abs(metrics["evalRewardAccuracy"] - logged["rewards/accuracies"]) < 1e-5
    assert abs(metrics["evalRewardMargin"] - logged["rewards/margins"]) < 1e-5
    assert abs(metrics["evalChosenLogps"] - logged["logps/chosen"]) < 1e-5
    assert abs(metrics["evalRejectedLogps"] - logged["logps/rejected"]) < 1e-5
    # Two different models: the loss is not the log 2 of equal policies, so the comparison means something.
    assert abs(ours.loss.item() - math.log(2)) > 1e-3


def test_orpo_loss_and_metrics_equal_trl(tokenizer: Any, tmp_path: Path) -> None:
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model = tiny_llama(tokenizer, seed=0)
    pad_id = tokenizer.pad_token_id
    chosen_sums, rejected_sums, chosen_counts, rejected_counts = pair_logps(model, pad_id)
    # TRL's NLL: one mean over every chosen token after the first, prompt included.
    chosen_rows = [prompt + chosen for prompt, chosen, _ in PAIRS]
    whole_chosen = padded(chosen_rows, [0] * len(PAIRS), pad_id)
    with torch.no_grad():
        logits = model(input_ids=whole_chosen["input_ids"], attention_mask=whole_chosen["attention_mask"]).logits
    whole_sums, whole_counts = sequence_logps(logits, whole_chosen["labels"])
    chosen_mean, rejected_mean = chosen_sums / chosen_counts, rejected_sums / rejected_counts
    ours = orpo_loss(-whole_sums.sum() / whole_counts.sum(), chosen_mean, rejected_mean, BETA)
    metrics = report_metrics(
        preference_metrics(ours.chosen_rewards, ours.rejected_rewards, chosen_mean, rejected_mean), "eval"
    )

    trainer = ORPOTrainer(
        model=copy.deepcopy(model),
        args=ORPOConfig(output_dir=str(tmp_path), beta=BETA, max_length=64, report_to=[], use_cpu=True, bf16=False),
        train_dataset=preference_dataset(),
        processing_class=tokenizer,
    )
    batch: dict[str, torch.Tensor] = {}
    for side, index in (("chosen", 1), ("rejected", 2)):
        side_batch = padded([pair[0] + pair[index] for pair in PAIRS], [len(pair[0]) for pair in PAIRS], pad_id)
        batch |= {f"{side}_{key}": value for key, value in side_batch.items()}
    with torch.no_grad():
        theirs, logged = trainer.get_batch_loss_metrics(trainer.model, batch, train_eval="eval")

    assert abs(ours.loss.item() - theirs.item()) < 1e-5
    assert abs(metrics["evalRewardAccuracy"] - logged["eval_rewards/accuracies"]) < 1e-5
    assert abs(metrics["evalRewardMargin"] - logged["eval_rewards/margins"]) < 1e-5
    assert abs(metrics["evalChosenLogps"] - logged["eval_logps/chosen"]) < 1e-5
    assert abs(metrics["evalRejectedLogps"] - logged["eval_logps/rejected"]) < 1e-5


def test_pairwise_reward_loss_equals_trl_and_a_hand_computation(tokenizer: Any, tmp_path: Path) -> None:
    pytest.importorskip("trl")
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    model = tiny_llama(tokenizer, seed=0, task="reward")
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(
        [{"chosen_ids": prompt + chosen, "rejected_ids": prompt + rejected} for prompt, chosen, rejected in PAIRS]
    )
    with torch.no_grad():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    chosen_scores, rejected_scores = scores.chunk(2)
    ours = pairwise_reward_loss(chosen_scores, rejected_scores).item()

    trainer = RewardTrainer(
        model=copy.deepcopy(model),
        args=RewardConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False),
        train_dataset=preference_dataset(),
        processing_class=tokenizer,
    )
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, dict(batch)).item()
    by_hand = sum(
        math.log1p(math.exp(-(chosen - rejected)))
        for chosen, rejected in zip(chosen_scores.tolist(), rejected_scores.tolist(), strict=True)
    ) / len(PAIRS)

    assert abs(ours - theirs) < 1e-5
    assert abs(ours - by_hand) < 1e-5
    assert len(set(chosen_scores.tolist() + rejected_scores.tolist())) == 2 * len(PAIRS)


def packed_logps(model: torch.nn.Module, sequences: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Each (prompt, completion)'s completion log-probability, all laid end to end in one flattened row."""
    row = flatten(
        [
            {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion}
            for prompt, completion in sequences
        ]
    )
    labels = row.pop("labels")
    with torch.no_grad():
        logits = model(**row).logits
    sums, _ = sequence_logps(logits, labels, cu_seq_lens=row["cu_seq_lens_q"])
    return sums


def test_a_packed_row_scores_each_sequence_as_padded_rows_do(tokenizer: Any) -> None:
    padded_model = tiny_llama(tokenizer, seed=0)
    packed_model = tiny_llama(tokenizer, seed=0, attention=packed_kernel(torch.device("cpu")))
    chosen, rejected, _, _ = pair_logps(padded_model, tokenizer.pad_token_id)

    sequences = [(prompt, chosen) for prompt, chosen, _ in PAIRS] + [
        (prompt, rejected) for prompt, _, rejected in PAIRS
    ]
    packed = packed_logps(packed_model, sequences)

    torch.testing.assert_close(packed, torch.cat([chosen, rejected]), rtol=0, atol=1e-5)


def test_a_pairs_sequences_do_not_see_each_other_in_a_packed_row(tokenizer: Any) -> None:
    model = tiny_llama(tokenizer, seed=0, attention=packed_kernel(torch.device("cpu")))
    prompt, chosen, rejected = PAIRS[0]

    # The rejected sequence goes first: causal attention alone would already hide it from a later one.
    before = packed_logps(model, [(prompt, rejected), (prompt, chosen)])
    after = packed_logps(model, [(prompt, [token + 1 for token in rejected]), (prompt, chosen)])

    assert before[1].item() == after[1].item()
    assert before[0].item() != after[0].item()
