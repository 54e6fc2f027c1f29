"""The FineTuneJob spec: what to train, on which data, how, where the result goes and how it is served."""

from typing import Any, Literal

from pydantic import Field

from tunery.api import contract
from tunery.api.base import ApiModel
from tunery.api.fields import (
    HttpUrl,
    ModelName,
    ObjectName,
    OutputUri,
    Quantity,
    ResourceName,
    SourceUri,
    TargetModules,
)

Task = Literal["causal-lm", "masked-lm", "sequence-classification", "token-classification"]
MethodType = Literal["full", "lora", "qlora", "prompt-tuning", "prefix-tuning", "ia3", "bitfit"]
DataFormat = Literal["auto", "jsonl", "json", "csv", "parquet", "text"]
Optimizer = Literal["adamw", "adamw-8bit", "adafactor", "sgd"]
Scheduler = Literal["linear", "cosine", "constant", "constant-with-warmup", "polynomial"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
EvalMetric = Literal["loss", "perplexity", "accuracy", "precision", "recall", "f1"]
Addressing = Literal["auto", "path", "virtual"]
ServingRuntime = Literal["builtin", "vllm"]
ObjectiveType = Literal["sft", "dpo", "orpo"]


class TokenizerSource(ApiModel):
    """Where the tokenizer comes from when it is not the base model's own."""

    uri: SourceUri | None = None
    """Load the tokenizer from this URI (s3://, pvc://, hf:// or file://)."""
    train_vocab_size: int | None = Field(None, ge=256, le=1_048_576)
    """Train a byte-level BPE tokenizer with this vocabulary size on the training data (pretraining from scratch)."""


class BaseModelSource(ApiModel):
    """The model to start from: an existing checkpoint to fine-tune, or an architecture to pretrain from scratch."""

    uri: SourceUri | None = None
    """The checkpoint to fine-tune: s3://BUCKET/PREFIX/, pvc://CLAIM/PATH, hf://ORG/NAME[@REVISION] or file:///PATH. Leave empty to pretrain from scratch."""
    trust_remote_code: bool = False
    """Allow the model's own Python code to run while loading it. Enable only for checkpoints you trust."""
    architecture: str | None = Field(None, min_length=1, max_length=64)
    """Model type for pretraining from scratch, as transformers names it (for example llama, gpt2, bert). Only without uri."""
    config: dict[str, Any] | None = None
    """Model configuration for pretraining from scratch (transformers config keys, for example hidden_size). Only with architecture."""
    tokenizer: TokenizerSource | None = None
    """Tokenizer override. Required when pretraining from scratch: a tokenizer uri, or trainVocabSize to train one."""


class DatasetColumns(ApiModel):
    """Which column of the data holds what. An empty string means the column is not used."""

    text: str = Field("text", max_length=256)
    """Plain text, for pretraining, masked-LM and sequence classification."""
    prompt: str = Field("prompt", max_length=256)
    """The prompt of prompt/completion pairs; the loss is computed on the completion only."""
    completion: str = Field("completion", max_length=256)
    """The completion of prompt/completion pairs."""
    messages: str = Field("messages", max_length=256)
    """Chat conversations as a list of {role, content}; rendered with the model's chat template, loss on assistant turns."""
    label: str = Field("label", max_length=256)
    """The class label, for sequence classification."""
    tokens: str = Field("tokens", max_length=256)
    """The list of words, for token classification."""
    tags: str = Field("tags", max_length=256)
    """The list of per-word tags, for token classification."""
    chosen: str = Field("chosen", max_length=256)
    """The preferred completion of a preference pair (objective dpo or orpo): a string, or an assistant turn."""
    rejected: str = Field("rejected", max_length=256)
    """The dispreferred completion of a preference pair, to the same prompt (or messages) as chosen."""


class DatasetSource(ApiModel):
    """One source of a training mixture, and its share of the examples."""

    uri: SourceUri
    """One file, or a prefix (ending in /) whose shards are all read."""
    weight: float = Field(1.0, gt=0, le=1_000_000)
    """Its share of each epoch's training examples, relative to the other sources' weights."""


class Dataset(ApiModel):
    """The training data and how to prepare it."""

    train: SourceUri | None = None
    """The training data: one file, or a prefix (ending in /) whose shards are all read. Or set mixture instead."""
    mixture: list[DatasetSource] | None = Field(None, min_length=2, max_length=32)
    """Several training sources mixed by weight, instead of train: an epoch holds as many examples as the sources
    together, each source's share set by its weight (repeated when its share is more than it holds)."""
    validation: SourceUri | None = None
    """Validation data. When absent, validationSplit of the training data is held out."""
    validation_split: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of the training data held out for validation when validation is absent (0 disables evaluation)."""
    format: DataFormat = "auto"
    """File format; auto detects it from the file extension."""
    columns: DatasetColumns = Field(default_factory=DatasetColumns)
    """Column names in the data."""
    max_length: int = Field(2048, ge=8, le=1_048_576)
    """Maximum tokens per training sequence; longer examples are truncated. Sequences are never padded to this length."""
    packing: bool = True
    """Lay a micro-batch's examples end to end in one row, unpadded, each attending only to itself (causal-LM)."""
    dedupe: bool = True
    """Drop exact duplicate examples before training."""

    def sources(self) -> list[DatasetSource]:
        """The training sources: the mixture, or train alone."""
        return self.mixture or ([DatasetSource(uri=self.train)] if self.train else [])


class LoraSettings(ApiModel):
    """Low-rank adapter settings, for method lora and qlora."""

    rank: int = Field(16, ge=1, le=1024)
    """Rank of the adapter matrices."""
    alpha: float = Field(32, gt=0)
    """Scaling numerator; the adapter output is scaled by alpha / rank."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter input."""
    target_modules: TargetModules = "all-linear"
    """Modules to adapt: all-linear, or a list of module names (for example [q_proj, v_proj])."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): a trained magnitude per output feature on top of the low-rank direction update;
    closer to full fine-tuning at low ranks, somewhat slower per step."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale the adapter output by alpha / sqrt(rank) instead of alpha / rank, so higher ranks
    keep learning."""


class QloraSettings(ApiModel):
    """Quantisation of the frozen base model, for method qlora (bitsandbytes, GPU only)."""

    bits: Literal[4, 8] = 4
    """Bits per base-model weight."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantise the quantisation constants too (saves about 0.4 bits per weight)."""


class PromptTuningSettings(ApiModel):
    """Virtual-token settings, for method prompt-tuning and prefix-tuning."""

    virtual_tokens: int = Field(20, ge=1, le=1024)
    """Number of trained virtual tokens."""
    init_text: str = Field("", max_length=4096)
    """Initialise the virtual tokens from this text (prompt-tuning); empty means random initialisation."""


class Method(ApiModel):
    """The fine-tuning method: which parameters are trained."""

    type: MethodType = "lora"
    """full trains every weight; lora/qlora train low-rank adapters (qlora on a quantised base); prompt-tuning and prefix-tuning train virtual tokens; ia3 trains activation scalers; bitfit trains only biases."""
    lora: LoraSettings | None = None
    """LoRA settings; only with type lora or qlora (defaults apply when absent)."""
    qlora: QloraSettings | None = None
    """Quantisation settings; only with type qlora (defaults apply when absent)."""
    prompt_tuning: PromptTuningSettings | None = None
    """Virtual-token settings; only with type prompt-tuning or prefix-tuning (defaults apply when absent)."""


class Objective(ApiModel):
    """What the loss rewards: imitating the data, or preferring one completion of a pair to the other."""

    type: ObjectiveType = "sft"
    """sft learns the text or completions; dpo and orpo learn from pairs of a chosen and a rejected completion to one
    prompt: dpo against the base model's own log-probabilities (computed once, before training, so no second copy of
    the model is held), orpo with an odds-ratio penalty added to the chosen completions' loss and no reference."""
    beta: float | None = Field(None, gt=0, le=100)
    """dpo: the strength of the pull towards the base model (default 0.1; lower lets the preferences move the model
    further); orpo: the weight of the odds-ratio term (default 0.1). Only with type dpo or orpo."""

    @property
    def effective_beta(self) -> float:
        """beta, or its default of 0.1."""
        return 0.1 if self.beta is None else self.beta


class Hyperparameters(ApiModel):
    """Optimisation settings."""

    epochs: float = Field(3, gt=0, le=10_000)
    """Passes over the training data (fractions allowed). maxSteps takes precedence when set."""
    max_steps: int = Field(-1, ge=-1)
    """Stop after this many optimiser steps; -1 means train for epochs."""
    learning_rate: float = Field(2.0e-4, gt=0, le=10)
    """Peak learning rate."""
    batch_size: int = Field(8, ge=1, le=65_536)
    """Examples per device per micro-batch, packed or not (a step: x gradientAccumulationSteps x devices)."""
    gradient_accumulation_steps: int = Field(1, ge=1, le=65_536)
    """Micro-batches accumulated per optimiser step."""
    optimizer: Optimizer = "adamw"
    """Optimiser; adamw-8bit needs a GPU."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay."""
    scheduler: Scheduler = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    """Fraction of the steps spent warming the learning rate up from zero."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Clip gradients to this global norm; 0 disables clipping."""
    precision: Precision = "auto"
    """Training precision; auto picks bf16 where the GPU supports it, else fp16 on GPUs and fp32 on CPUs. fp16 needs a GPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    compile: bool = False
    """Compile each transformer block with torch.compile (dynamic shapes) before the first step; see docs/trainer.md."""
    seed: int = Field(42, ge=0, le=2**31 - 1)
    """Seed for initialisation, data order and the validation split."""


class Evaluation(ApiModel):
    """How and when the model is evaluated on the validation data."""

    every_steps: int = Field(0, ge=0)
    """Evaluate every N optimiser steps; 0 evaluates once per epoch and at the end."""
    metrics: list[EvalMetric] = Field(default_factory=lambda: ["loss"], max_length=6)
    """Metrics computed and reported: perplexity for language modelling; accuracy, precision, recall, f1 for classification. Loss is always reported."""


class Checkpoints(ApiModel):
    """Checkpointing to the output storage, for resuming after failures and preemption."""

    every_steps: int = Field(500, ge=0)
    """Write a checkpoint every N optimiser steps; 0 writes one only at the end of each epoch."""
    keep: int = Field(2, ge=1, le=100)
    """Number of most recent checkpoints kept."""
    resume_from_uid: str | None = Field(None, pattern=r"^[0-9a-f-]{36}$")
    """Also resume from checkpoints written by the FineTuneJob with this UID (for example one deleted and created
    again under the same name). Empty resumes only from this FineTuneJob's own checkpoints."""


class Output(ApiModel):
    """Where and how the trained model is published."""

    uri: OutputUri
    """Destination prefix: s3://BUCKET/PREFIX/ (or pvc://, file:// for local runs)."""
    merge_adapter: bool = True
    """For adapter methods, also publish a model with the adapter merged into the base weights."""
    name: ModelName | None = None
    """Model name served by the endpoint; defaults to the FineTuneJob's name."""


class Storage(ApiModel):
    """The S3-compatible object store. Credentials come only from a Secret or the pod's identity."""

    endpoint: HttpUrl | None = None
    """S3 endpoint URL for MinIO, SeaweedFS, Ceph and others; empty means AWS S3."""
    region: str = Field("us-east-1", min_length=1, max_length=64)
    """S3 region."""
    credentials_secret: ObjectName | None = None
    """Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; empty means the pod's identity (IRSA, workload identity)."""
    addressing: Addressing = "auto"
    """Bucket addressing: path (endpoint/bucket/key, most self-hosted stores), virtual (bucket.endpoint/key) or auto."""
    retry_timeout_seconds: int = Field(contract.STORAGE_RETRY_SECONDS, ge=0, le=86400)
    """How long each storage operation retries an unreachable or failing store (connection errors, HTTP 5xx, throttling), with exponential backoff, before the pod fails and the Job retries it."""


class Toleration(ApiModel):
    """A Kubernetes toleration for the training pods."""

    key: str | None = Field(None, max_length=317)
    """Taint key; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """How key and value are compared."""
    value: str | None = Field(None, max_length=63)
    """Taint value, for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches every effect."""
    toleration_seconds: int | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""


class Resources(ApiModel):
    """Compute for the training pods."""

    gpus: int = Field(1, ge=0, le=64)
    """GPUs per node (requested and limited as gpuResource); 0 trains on CPU."""
    gpu_resource: ResourceName = "nvidia.com/gpu"
    """Extended resource name of the GPU."""
    cpu: Quantity = "8"
    """CPU request per node."""
    memory: Quantity = "64Gi"
    """Memory request and limit per node."""
    nodes: int = Field(1, ge=1, le=1024)
    """Nodes for distributed training (torchrun, one pod per node)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How several training processes share the model: ddp keeps a whole copy in each; fsdp shards weights,
    gradients and optimizer state across them, for models whose training state does not fit one GPU. One process
    ignores it."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the training pods must match."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)
    """Tolerations for the training pods."""
    priority_class_name: str = Field("", max_length=253)
    """PriorityClass of the training pods."""
    ephemeral_storage: Quantity = "100Gi"
    """Local disk per node (requested and limited): the fetched base model, data and checkpoint staging."""


class ServingResources(ApiModel):
    """Compute for each serving replica."""

    gpus: int = Field(0, ge=0, le=64)
    """GPUs per replica."""
    cpu: Quantity = "2"
    """CPU request per replica."""
    memory: Quantity = "8Gi"
    """Memory request and limit per replica."""
    ephemeral_storage: Quantity = "50Gi"
    """Local disk per replica (requested and limited): the fetched model and its base."""


class Serving(ApiModel):
    """The inference endpoint published after training."""

    enabled: bool = True
    """Serve the trained model behind an OpenAI-compatible endpoint."""
    runtime: ServingRuntime = "builtin"
    """builtin (Tunery's server, CPU or GPU, every task) or vllm (causal-LM on GPUs)."""
    replicas: int = Field(1, ge=0, le=1000)
    """Serving replicas."""
    resources: ServingResources = Field(default_factory=ServingResources)
    """Compute per replica."""
    api_key_secret: ObjectName | None = None
    """Secret whose key api-key clients must send as `Authorization: Bearer KEY`; empty leaves the endpoint without
    authentication (still reachable only from allowed namespaces)."""
    client_namespace_labels: dict[str, str] = Field(default_factory=dict, max_length=16)
    """Besides its own namespace, pods in namespaces with all of these labels may reach the endpoint; empty allows
    only the own namespace (and the namespaces the platform allows for every endpoint)."""


class FineTuneJobSpec(ApiModel):
    """The desired fine-tuning job."""

    base_model: BaseModelSource
    """The model to start from."""
    task: Task = "causal-lm"
    """What the model learns: causal-lm (SFT and pretraining), masked-lm, sequence-classification or token-classification."""
    dataset: Dataset
    """The training data."""
    method: Method = Field(default_factory=Method)
    """The fine-tuning method."""
    objective: Objective = Field(default_factory=Objective)
    """The training objective: supervised fine-tuning (sft), or preference tuning (dpo, orpo) with any method."""
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    """Optimisation settings."""
    evaluation: Evaluation = Field(default_factory=Evaluation)
    """Evaluation settings."""
    checkpoints: Checkpoints = Field(default_factory=Checkpoints)
    """Checkpoint settings."""
    output: Output
    """Where the trained model is published."""
    storage: Storage = Field(default_factory=Storage)
    """The S3-compatible object store."""
    resources: Resources = Field(default_factory=Resources)
    """Compute for training."""
    image: str = Field("", max_length=512)
    """Trainer image override; honoured only when the operator's policy allows overrides."""
    serving: Serving = Field(default_factory=Serving)
    """The inference endpoint."""
    suspend: bool = False
    """Suspend the training Job (Kueue-compatible); resuming continues from the latest checkpoint."""
    backoff_limit: int = Field(3, ge=0, le=100)
    """Retries after a failure; each retry resumes from the latest checkpoint."""
    active_deadline_seconds: int | None = Field(None, ge=1)
    """Stop the training Job after this many seconds."""
