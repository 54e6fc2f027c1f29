"""The chunked causal-LM loss equals the model's own, in value and in gradients, however many chunks it takes."""

from pathlib import Path

import pytest
import torch

from tunery.api.spec import FineTuneJobSpec
from tunery_trainer import loss
from tunery_trainer.loss import ChunkedLoss, chunks_the_loss
from tunery_trainer.tokenization import IGNORE_INDEX


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import decoder

    return decoder(tmp_path_factory.mktemp("decoder"))


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


@pytest.mark.parametrize("chunk_positions", [3, 20, 1_000_000])
def test_the_chunked_loss_and_its_gradients_are_the_models_own(
    tiny_llama: Path, chunk_positions: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert model.config.model_type in loss.PLAIN_HEAD_ARCHITECTURES
    # Several chunks, the last one short; the 20 shifted positions in one chunk; or, as the logits fit in one
    # chunk anyway, the model's own loss.
    monkeypatch.setattr(loss, "CHUNK_LOGITS_BYTES", chunk_positions * 4 * model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=generator)
    labels = input_ids.clone()
    labels[0, :4] = IGNORE_INDEX
    labels[1, 7:] = IGNORE_INDEX

    expected = model(input_ids=input_ids, labels=labels, use_cache=False).loss
    expected.backward()
    expected_gradients = gradients(model)
    model.zero_grad(set_to_none=True)
    chunked = ChunkedLoss(model)(labels=labels, input_ids=input_ids).loss
    chunked.backward()

    torch.testing.assert_close(chunked, expected, atol=1e-6, rtol=1e-5)
    actual_gradients = gradients(model)
    assert actual_gradients.keys() == expected_gradients.keys()
    for name, gradient in expected_gradients.items():
        torch.testing.assert_close(actual_gradients[name], gradient, atol=1e-6, rtol=1e-4, msg=name)


def test_without_gradients_only_the_loss_is_computed(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    monkeypatch.setattr(loss, "CHUNK_LOGITS_BYTES", 3 * 4 * model.config.vocab_size)
    input_ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        chunked = ChunkedLoss(model)(labels=input_ids, input_ids=input_ids).loss
        expected = model(input_ids=input_ids, labels=input_ids).loss
    assert not chunked.requires_grad
    torch.testing.assert_close(chunked, expected, atol=1e-6, rtol=1e-5)


def spec(**fields) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "baseModel": {"uri": "file:///base/"},
            "dataset": {"train": "file:///train.jsonl"},
            "output": {"uri": "file:///out/"},
        }
        | fields
    )


def test_the_loss_is_chunked_only_where_it_is_exactly_the_models_own(tiny_llama: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert chunks_the_loss(spec(method={"type": "lora"}), llama)
    assert chunks_the_loss(spec(method={"type": "full"}), llama)
    # PEFT prepends virtual tokens in its own forward pass, which the decoder alone would skip.
    assert not chunks_the_loss(spec(method={"type": "prompt-tuning"}), llama)
    assert not chunks_the_loss(spec(task="masked-lm", method={"type": "full"}), llama)
    # Gemma 2 soft-caps its logits: a plain projection would be a different loss.
    config = AutoConfig.for_model(
        "gemma2",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        vocab_size=64,
    )
    assert not chunks_the_loss(spec(method={"type": "full"}), AutoModelForCausalLM.from_config(config))
