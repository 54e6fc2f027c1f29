"""Load or build the tokenizer and model for the task, and make trainable exactly what the method trains."""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tunery.api.spec import FineTuneJobSpec, LoraSettings, PromptTuningSettings, QloraSettings, Task
from tunery_trainer.attention import attention_kernel
from tunery_trainer.failures import UnsupportedError
from tunery_trainer.tokenization import DEFAULT_CHAT_TEMPLATE

ADAPTER_METHODS = ("lora", "qlora", "prompt-tuning", "prefix-tuning", "ia3")
MERGEABLE_METHODS = ("lora", "qlora", "ia3")
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def load_tokenizer(
    spec: FineTuneJobSpec, model_dir: Path | None, tokenizer_dir: Path | None, texts: Callable[[], Sequence[str]]
):
    """The base model's tokenizer, an override, or a byte-level BPE trained on the training `texts()` (read only then:
    the examples live on disk)."""
    from transformers import AutoTokenizer

    source = tokenizer_dir or model_dir
    if source is not None:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=spec.base_model.trust_remote_code)
    else:
        vocab_size = spec.base_model.tokenizer.train_vocab_size if spec.base_model.tokenizer else None
        tokenizer = train_tokenizer(texts(), vocab_size or 8000, with_mask=spec.task == "masked-lm")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if spec.task == "causal-lm" and tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if spec.task == "token-classification" and getattr(tokenizer, "add_prefix_space", None) is False:
        # Byte-level BPE tokenizers need it to tokenise pre-split words.
        tokenizer = AutoTokenizer.from_pretrained(source, add_prefix_space=True)
    return tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int, with_mask: bool):
    """A byte-level BPE tokenizer trained on the data, for pretraining from scratch."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = {**SPECIAL_TOKENS, **({"mask_token": "<mask>"} if with_mask else {})}
    bpe = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **special)


def auto_class(task: Task):
    import transformers

    return {
        "causal-lm": transformers.AutoModelForCausalLM,
        "masked-lm": transformers.AutoModelForMaskedLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "token-classification": transformers.AutoModelForTokenClassification,
    }[task]


def label_arguments(label_names: Sequence[str]) -> dict[str, Any]:
    """The config overrides that give a classifier its label map (none for language models)."""
    if not label_names:
        return {}
    return {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: index for index, name in enumerate(label_names)},
    }


def load_model(
    spec: FineTuneJobSpec, model_dir: Path | None, tokenizer: Any, label_names: Sequence[str], device: torch.device
):
    """The base model (or a fresh one from the architecture and config), with the method applied."""
    from transformers import AutoConfig

    label_args = label_arguments(label_names)
    attention = attention_kernel(spec, device)
    stored_as = {"dtype": dtype} if (dtype := frozen_base_dtype(spec, device)) else {}
    if model_dir is None:
        config = AutoConfig.for_model(
            spec.base_model.architecture,
            **{**(spec.base_model.config or {}), "vocab_size": len(tokenizer), **label_args},
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = auto_class(spec.task).from_config(config, attn_implementation=attention, **stored_as)
    else:
        model = auto_class(spec.task).from_pretrained(
            model_dir,
            trust_remote_code=spec.base_model.trust_remote_code,
            attn_implementation=attention,
            **label_args,
            **stored_as,
            **_quantization(spec, device),
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if spec.method.type != "qlora":
        model.to(device)
    if spec.hyperparameters.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return apply_method(spec, model, model_dir or Path("."))


def precision_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda" and precision == "fp16":
        raise UnsupportedError("hyperparameters.precision fp16 needs a GPU: use bf16, fp32 or auto on CPU")
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def frozen_base_dtype(spec: FineTuneJobSpec, device: torch.device) -> torch.dtype | None:
    """bf16 for the base weights that an adapter method freezes, when the run computes in bf16 on a GPU (the
    adapters PEFT adds stay fp32); None keeps the weights as stored. QLoRA quantises them instead."""
    frozen = spec.method.type in ADAPTER_METHODS and spec.method.type != "qlora"
    if not frozen or device.type != "cuda":
        return None
    return torch.bfloat16 if precision_dtype(spec.hyperparameters.precision, device) == torch.bfloat16 else None


def _quantization(spec: FineTuneJobSpec, device: torch.device) -> dict[str, Any]:
    if spec.method.type != "qlora":
        return {}
    if device.type != "cuda":
        raise UnsupportedError(
            "method.type qlora quantises the base model with bitsandbytes, which needs a CUDA GPU and none is "
            "visible: set resources.gpus to 1 or more, or use method.type lora"
        )
    from transformers import BitsAndBytesConfig

    settings = spec.method.qlora or QloraSettings()
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if settings.bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=settings.quant_type,
            bnb_4bit_use_double_quant=settings.double_quant,
            bnb_4bit_compute_dtype=compute,
        )
    return {"quantization_config": quantization, "device_map": {"": device.index or 0}, "dtype": compute}


def apply_method(spec: FineTuneJobSpec, model, tokenizer_path: Path):
    """Freeze what the method does not train; wrap adapter methods with PEFT."""
    method = spec.method.type
    if method == "full":
        return model
    if method == "bitfit":
        return _bitfit(spec.task, model)
    import peft

    task_type = {
        "causal-lm": peft.TaskType.CAUSAL_LM,
        "sequence-classification": peft.TaskType.SEQ_CLS,
        "token-classification": peft.TaskType.TOKEN_CLS,
    }.get(spec.task)
    if method in ("lora", "qlora"):
        lora = spec.method.lora or LoraSettings()
        if method == "qlora":
            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=spec.hyperparameters.gradient_checkpointing
            )
        config = peft.LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
            # PEFT trains a classifier's head in full (modules_to_save); an adapter on it as well is refused.
            exclude_modules=[prefix.rstrip(".") for prefix in _head_prefixes(model)] or None,
            task_type=task_type,
        )
    elif method == "ia3":
        config = peft.IA3Config(task_type=task_type)
    else:
        if task_type is None:
            raise UnsupportedError(
                f"method.type {method} trains virtual tokens for causal-lm and classification tasks, "
                f"not {spec.task}: use lora or full"
            )
        virtual = spec.method.prompt_tuning or PromptTuningSettings()
        count = virtual.virtual_tokens
        if method == "prefix-tuning":
            config = peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=count)
        elif virtual.init_text:
            config = peft.PromptTuningConfig(
                task_type=task_type,
                num_virtual_tokens=count,
                prompt_tuning_init=peft.PromptTuningInit.TEXT,
                prompt_tuning_init_text=virtual.init_text,
                tokenizer_name_or_path=str(tokenizer_path),
            )
        else:
            config = peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=count)
    if spec.hyperparameters.gradient_checkpointing:
        model.enable_input_require_grads()
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:
        raise UnsupportedError(f"method.type {method} cannot be applied to this model ({exc})") from exc


def _bitfit(task: Task, model):
    """Only the bias terms train, plus the freshly initialised head of a classifier."""
    head = _head_prefixes(model) if task in ("sequence-classification", "token-classification") else ()
    trainable = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.endswith(".bias") or name.startswith(head)
        trainable += parameter.requires_grad and name.endswith(".bias")
    if not trainable:
        raise UnsupportedError(
            f"method.type bitfit trains bias terms and this {model.config.model_type} model has none: use lora or ia3"
        )
    return model


def _head_prefixes(model) -> tuple[str, ...]:
    names = {name.split(".")[0] for name, _ in model.named_parameters()}
    return tuple(f"{name}." for name in ("classifier", "score") if name in names)


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of the model's layer stacks (every child of a ModuleList): the transformer layers."""
    stacks = [module for module in model.modules() if isinstance(module, torch.nn.ModuleList)]
    return [block for stack in stacks for block in stack]


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile each block in place, with dynamic shapes: the blocks share one graph, so compiling costs one
    block's time however deep the model, and rows of new lengths do not recompile."""
    for block in blocks(model):
        block.compile(dynamic=True)


def trainable_parameters(model) -> dict[str, torch.Tensor]:
    """The parameters the optimiser updates, by name: what a checkpoint must keep."""
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


def restore_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's trained weights into the model's trainable parameters."""
    expected = trainable_parameters(model)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise RuntimeError(f"the checkpoint lacks trained weights {missing[:3]}: it was written by another setup")
    with torch.no_grad():
        for name, parameter in expected.items():
            parameter.copy_(weights[name].to(parameter.device, parameter.dtype))
