"""Cross-field rules of the spec, written once in CEL: the CRD embeds them, `tunery validate` evaluates them."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """A CEL rule over the defaulted spec (`self`), with the field it blames and a message that says the fix."""

    rule: str
    field_path: str
    message: str


_CLASSIFICATION = "['sequence-classification', 'token-classification']"

SPEC_RULES: tuple[Rule, ...] = (
    Rule(
        "has(self.dataset.train) != has(self.dataset.mixture)",
        ".dataset.train",
        "set exactly one of dataset.train (one source) and dataset.mixture (several sources, each with a weight)",
    ),
    Rule(
        "has(self.baseModel.uri) || has(self.baseModel.architecture)",
        ".baseModel.uri",
        "set baseModel.uri to the model to fine-tune, or baseModel.architecture and baseModel.config to pretrain from scratch",
    ),
    Rule(
        "!has(self.baseModel.uri) || !has(self.baseModel.architecture)",
        ".baseModel.architecture",
        "baseModel.architecture is only for pretraining from scratch: remove it, or remove baseModel.uri",
    ),
    Rule(
        "!has(self.baseModel.uri) || !has(self.baseModel.config)",
        ".baseModel.config",
        "baseModel.config is only for pretraining from scratch: remove it, or remove baseModel.uri",
    ),
    Rule(
        "!has(self.baseModel.architecture) || has(self.baseModel.config)",
        ".baseModel.config",
        "pretraining from scratch needs baseModel.config, the model configuration (for example hidden_size, num_hidden_layers)",
    ),
    Rule(
        "!has(self.baseModel.architecture) || has(self.baseModel.tokenizer)",
        ".baseModel.tokenizer",
        "pretraining from scratch needs a tokenizer: set baseModel.tokenizer.uri, or baseModel.tokenizer.trainVocabSize to train one",
    ),
    Rule(
        "!has(self.baseModel.tokenizer) || (has(self.baseModel.tokenizer.uri) != has(self.baseModel.tokenizer.trainVocabSize))",
        ".baseModel.tokenizer",
        "set exactly one of baseModel.tokenizer.uri (load a tokenizer) and baseModel.tokenizer.trainVocabSize (train one)",
    ),
    Rule(
        "!has(self.baseModel.tokenizer) || !has(self.baseModel.tokenizer.trainVocabSize) || !has(self.baseModel.uri)",
        ".baseModel.tokenizer.trainVocabSize",
        "a trained tokenizer does not match the base model's embeddings: remove trainVocabSize, or pretrain from scratch without baseModel.uri",
    ),
    Rule(
        "!has(self.baseModel.architecture) || self.method.type == 'full'",
        ".method.type",
        "pretraining from scratch trains every weight: set method.type to full",
    ),
    Rule(
        "self.method.type != 'qlora' || self.resources.gpus > 0",
        ".resources.gpus",
        "method qlora quantises the base model with bitsandbytes, which needs a GPU: set resources.gpus to 1 or more, or use method.type lora",
    ),
    Rule(
        "self.hyperparameters.optimizer != 'adamw-8bit' || self.resources.gpus > 0",
        ".hyperparameters.optimizer",
        "optimizer adamw-8bit (bitsandbytes) needs a GPU: set resources.gpus to 1 or more, or use optimizer adamw",
    ),
    Rule(
        "self.hyperparameters.precision != 'fp16' || self.resources.gpus > 0",
        ".hyperparameters.precision",
        "fp16 training needs a GPU: set resources.gpus to 1 or more, or use precision auto, bf16 or fp32",
    ),
    Rule(
        "self.resources.strategy != 'fsdp' || self.method.type != 'qlora'",
        ".resources.strategy",
        "strategy fsdp does not shard 4-bit quantised weights: use strategy ddp with qlora, or method.type lora with fsdp",
    ),
    Rule(
        "self.resources.strategy != 'fsdp' || self.hyperparameters.optimizer != 'adamw-8bit'",
        ".hyperparameters.optimizer",
        "optimizer adamw-8bit does not work on sharded weights: use optimizer adamw with strategy fsdp, or strategy ddp",
    ),
    Rule(
        "self.resources.strategy != 'fsdp' || self.hyperparameters.precision != 'fp16'",
        ".hyperparameters.precision",
        "strategy fsdp trains in bf16 or fp32: set precision bf16 (or auto on GPUs with bf16), or use strategy ddp",
    ),
    Rule(
        "!has(self.method.lora) || self.method.type in ['lora', 'qlora']",
        ".method.lora",
        "method.lora applies only to method.type lora or qlora: remove the block or change the type",
    ),
    Rule(
        "!has(self.method.qlora) || self.method.type == 'qlora'",
        ".method.qlora",
        "method.qlora applies only to method.type qlora: remove the block or change the type",
    ),
    Rule(
        "!has(self.method.promptTuning) || self.method.type in ['prompt-tuning', 'prefix-tuning']",
        ".method.promptTuning",
        "method.promptTuning applies only to method.type prompt-tuning or prefix-tuning: remove the block or change the type",
    ),
    Rule(
        "self.task != 'sequence-classification' || (self.dataset.columns.label != '' && self.dataset.columns.text != '')",
        ".dataset.columns",
        "sequence classification needs a text and a label column: set dataset.columns.text and dataset.columns.label",
    ),
    Rule(
        "self.task != 'token-classification' || (self.dataset.columns.tokens != '' && self.dataset.columns.tags != '')",
        ".dataset.columns",
        "token classification needs a tokens and a tags column: set dataset.columns.tokens and dataset.columns.tags",
    ),
    Rule(
        "self.hyperparameters.maxSteps != 0",
        ".hyperparameters.maxSteps",
        "maxSteps must be positive, or -1 to train for hyperparameters.epochs",
    ),
    Rule(
        f"self.task in {_CLASSIFICATION} || !self.evaluation.metrics.exists(m, m in ['accuracy', 'precision', 'recall', 'f1'])",
        ".evaluation.metrics",
        "accuracy, precision, recall and f1 are classification metrics: use loss or perplexity for this task",
    ),
    Rule(
        f"!(self.task in {_CLASSIFICATION}) || !self.evaluation.metrics.exists(m, m == 'perplexity')",
        ".evaluation.metrics",
        "perplexity is a language-modelling metric: use loss, accuracy, precision, recall or f1 for classification",
    ),
    Rule(
        "self.objective.type == 'sft' || self.task == 'causal-lm'",
        ".objective.type",
        "objectives dpo and orpo tune a causal language model on preference pairs: set task causal-lm, or objective.type sft",
    ),
    Rule(
        "self.objective.type == 'sft' || has(self.baseModel.uri)",
        ".objective.type",
        "preference tuning starts from a trained model: set baseModel.uri, or objective.type sft to pretrain from scratch",
    ),
    Rule(
        "self.objective.type == 'sft' || !(self.method.type in ['prompt-tuning', 'prefix-tuning'])",
        ".method.type",
        "objectives dpo and orpo score each completion token by token, which virtual tokens shift: use method.type lora, qlora, ia3, bitfit or full",
    ),
    Rule(
        "self.objective.type == 'sft' || (self.dataset.columns.chosen != '' && self.dataset.columns.rejected != '')",
        ".dataset.columns",
        "objectives dpo and orpo need a chosen and a rejected column: set dataset.columns.chosen and dataset.columns.rejected",
    ),
    Rule(
        "self.objective.type == 'sft' || !self.evaluation.metrics.exists(m, m == 'perplexity')",
        ".evaluation.metrics",
        "perplexity is exp(loss) of a language-modelling loss, not of a preference loss: use loss (the reward accuracy and margin are always reported)",
    ),
    Rule(
        "!has(self.objective.beta) || self.objective.type != 'sft'",
        ".objective.beta",
        "objective.beta applies only to objective.type dpo or orpo: remove it or change the type",
    ),
    Rule(
        "!self.serving.enabled || self.serving.runtime != 'vllm' || self.task == 'causal-lm'",
        ".serving.runtime",
        "vllm serves causal-lm models only: use serving.runtime builtin for this task",
    ),
    Rule(
        "!self.serving.enabled || self.serving.runtime != 'vllm' || self.serving.resources.gpus > 0",
        ".serving.resources.gpus",
        "vllm needs a GPU per replica: set serving.resources.gpus to 1 or more, or use serving.runtime builtin",
    ),
)
