"""The request and response bodies, in the shapes of OpenAI's API (and /v1/classify, which is our own)."""

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

# OpenAI's own bounds on the sampling parameters; its seed is an int64.
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
MAX_STOP_SEQUENCES = 4
# The roles the trainer takes in chat data (tunery_trainer.data): a served model saw no other.
ROLES = ("system", "user", "assistant")


def _unicode(value: str) -> str:
    """Refuse lone surrogates (JSON's "\\ud800" escapes make them): they are not text, and no tokenizer takes them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"a lone surrogate (U+{ord(value[error.start]):04X}) at character {error.start}: send UTF-8 text"
        ) from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]


class Request(BaseModel):
    """Parameters this server does not implement (penalties, logprobs, tools, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: Text | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class Sampling(Request):
    """What completions and chat completions share: the sampling parameters and streaming."""

    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: int = 1
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Seed | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported: send several requests for several choices")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return value

    def stop_sequences(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [stop for stop in stops if stop]

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def max_tokens_param(self) -> str:
        """The field that set the generation's length, for error messages."""
        return "max_tokens"


class CompletionRequest(Sampling):
    prompt: Text | list[Text]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("give one prompt (a string, or a list of one string): batches are not supported")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: Text | list[TextPart] | None = None

    @field_validator("role")
    @classmethod
    def _trained_role(cls, value: str) -> str:
        if value not in ROLES:
            # repr() escapes what UTF-8 cannot encode, so the message is always sendable.
            raise ValueError(f"{value!r} is not a role tunery trains on: use system, user or assistant")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    # OpenAI's newer name for max_tokens; either may be sent.
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    def rendered_messages(self) -> list[dict[str, str]]:
        return [{"role": message.role, "content": message.text()} for message in self.messages]


class ClassifyRequest(Request):
    input: Text | Annotated[list[Text], Field(min_length=1)]

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tunery"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LabelScore(BaseModel):
    """A sequence classifier's answer for one input: the likeliest label and every label's probability."""

    index: int
    label: str
    score: float
    scores: dict[str, float]


class Entity(BaseModel):
    """A run of words a token classifier tagged with one entity type; start and end are character offsets."""

    text: str
    label: str
    score: float
    start: int
    end: int


class TaggedInput(BaseModel):
    index: int
    entities: list[Entity]


class ClassifyUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class Classification(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[LabelScore] | list[TaggedInput]
    usage: ClassifyUsage


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
