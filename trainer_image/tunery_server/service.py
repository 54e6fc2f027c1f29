"""The model behind the API: loaded in the background, requests admitted against the limits, run on its thread."""

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from tunery_server import schemas
from tunery_server.errors import SERVER_ERROR, ApiError, bad_request
from tunery_server.metrics import ServerMetrics
from tunery_server.model import GENERATIVE, Generated, SamplingParams, ServedModel
from tunery_server.settings import MAX_CLASSIFY_INPUTS, ServerSettings

logger = logging.getLogger("tunery_server")

COMPLETIONS, CHAT, CLASSIFY, MODELS = "/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/models"
# The legacy completions API's default; chat defaults to whatever fits (within --max-tokens-limit), as OpenAI's does.
DEFAULT_COMPLETION_TOKENS = 16
T = TypeVar("T")


@dataclass(frozen=True)
class Prepared:
    """A generation request checked against the limits: its prompt ids and how to sample."""

    prompt_ids: list[int]
    params: SamplingParams


class ModelService:
    """Owns the model: loads it on a background thread, then runs every request on one worker thread.

    One worker serialises the model (its lock makes that safe for any other caller too) and keeps the event loop
    free to answer the probes while it works; waiting requests queue in front of it.
    """

    def __init__(
        self,
        settings: ServerSettings,
        loader: Callable[[], ServedModel],
        metrics: ServerMetrics,
        on_load_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model: ServedModel | None = None
        self.error: str | None = None
        self._loader = loader
        self._on_load_failure = on_load_failure
        self._executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunery-model")
        self.metrics.set_loaded(False)
        threading.Thread(target=self._load, name="tunery-load", daemon=True).start()

    def stop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _load(self) -> None:
        try:
            model = self._loader()
        except BaseException as error:  # noqa: BLE001 - any failure leaves the server unready; report it
            logger.exception("loading the model failed")
            self.error = f"{type(error).__name__}: {error}"
            if self._on_load_failure is not None:
                self._on_load_failure(error)
            return
        self.model = model
        self.metrics.set_loaded(True)
        logger.info("model %s loaded (%s); ready", self.settings.name, model.task)

    def served(self, requested: str | None, tasks: tuple[str, ...], endpoint: str) -> ServedModel:
        """The model, if the request may use it: the name matches, it is loaded, and its task fits the endpoint."""
        name = self.settings.name
        if requested is not None and requested != name:
            raise ApiError(
                404,
                f"The model `{requested}` does not exist: this server serves `{name}`",
                param="model",
                code="model_not_found",
            )
        if self.error is not None:
            raise ApiError(503, f"the model failed to load: {self.error}", code="model_load_failed", type=SERVER_ERROR)
        if self.model is None:
            message = "the model is still loading: retry when /readyz answers 200"
            raise ApiError(503, message, code="model_loading", type=SERVER_ERROR)
        task = self.model.task
        if task not in tasks:
            fits = f"{COMPLETIONS} or {CHAT}" if task in GENERATIVE else CLASSIFY
            raise bad_request(f"{name} is a {task} model: it is served on POST {fits}, not {endpoint}")
        return self.model

    async def _on_model(self, function: Callable[..., T], *args: Any) -> T:
        assert self._executor is not None, "start() the service first"
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # Generation ---------------------------------------------------------------------------------------------------

    async def prepare_completion(self, model: ServedModel, request: schemas.CompletionRequest) -> Prepared:
        self._limit_max_tokens(request)
        prompt = request.prompt_text()
        return await self._on_model(
            self._prepare, model, lambda: model.encode_prompt(prompt), request, "prompt", DEFAULT_COMPLETION_TOKENS
        )

    async def prepare_chat(self, model: ServedModel, request: schemas.ChatRequest) -> Prepared:
        if not model.has_chat_template:
            raise bad_request(f"{self.settings.name} has no chat template: use POST {COMPLETIONS}", "messages")
        self._limit_max_tokens(request)
        messages = request.rendered_messages()

        def encode() -> list[int]:
            from jinja2 import TemplateError, TemplateSyntaxError

            try:
                return model.encode_chat(messages)
            except TemplateSyntaxError:
                raise  # the model's template is broken, whatever was sent: the server's failure
            except TemplateError as error:
                # Templates refuse conversations they do not take (raise_exception: roles that do not alternate).
                message = f"{self.settings.name}'s chat template refused these messages: {error}"
                raise bad_request(message[:1000], "messages") from error

        return await self._on_model(
            self._prepare,
            model,
            encode,
            request,
            "messages",
            self.settings.max_tokens_limit,
        )

    def _limit_max_tokens(self, request: schemas.Sampling) -> None:
        requested, limit = request.requested_max_tokens(), self.settings.max_tokens_limit
        param = request.max_tokens_param()
        if requested is not None and requested > limit:
            message = f"{param} is {requested}; this server generates at most {limit} tokens per request"
            raise bad_request(message + " (--max-tokens-limit)", param)

    def _prepare(
        self,
        model: ServedModel,
        encode: Callable[[], list[int]],
        request: schemas.Sampling,
        prompt_param: str,
        default_tokens: int,
    ) -> Prepared:
        """Encode the prompt and fit the generation into the model's context (on the model's thread)."""
        ids = encode()
        if not ids:
            raise bad_request(f"{prompt_param} is empty: give the model something to continue", prompt_param)
        requested = request.requested_max_tokens()
        tokens = requested or min(default_tokens, self.settings.max_tokens_limit)
        context = model.max_positions
        if context is not None:
            if len(ids) >= context:
                raise bad_request(
                    f"{prompt_param} is {len(ids)} tokens; this model's context is {context} tokens, which must "
                    "leave room for at least one generated token",
                    prompt_param,
                )
            room = context - len(ids)
            if requested is not None and requested > room:
                param = request.max_tokens_param()
                raise bad_request(
                    f"this model's context is {context} tokens: {prompt_param} takes {len(ids)} and {param} asks "
                    f"for {requested}; lower {param} or shorten {prompt_param}",
                    param,
                )
            # Unasked for, the default shrinks to what fits.
            tokens = min(tokens, room)
        params = SamplingParams(
            max_new_tokens=tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stops=tuple(request.stop_sequences()),
        )
        return Prepared(ids, params)

    async def generate(self, model: ServedModel, prepared: Prepared, started: float) -> AsyncIterator[str | Generated]:
        """Generate on the model's thread: yield the text as it is released, then the outcome.

        `started` is when the request arrived: the time to first token includes the wait for the model.
        """
        assert self._executor is not None, "start() the service first"
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        cancelled = threading.Event()
        first = threading.Event()

        def on_text(delta: str) -> None:
            if not first.is_set():
                first.set()
                self.metrics.observe_first_token(time.perf_counter() - started)
            if delta:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, delta)
                except RuntimeError:
                    cancelled.set()  # the event loop is gone: the server is stopping

        def count_generated(done: asyncio.Future[Generated]) -> None:
            # Counted when the model stops, so that the tokens generated for a client who left count too.
            if not done.cancelled() and done.exception() is None:
                self.metrics.add_generated_tokens(done.result().completion_tokens)

        self.metrics.add_prompt_tokens(len(prepared.prompt_ids))
        future = loop.run_in_executor(
            self._executor, model.generate, prepared.prompt_ids, prepared.params, on_text, cancelled
        )
        future.add_done_callback(count_generated)
        # Scheduled after every delta the worker queued, so it comes last.
        future.add_done_callback(lambda _: queue.put_nowait(None))
        outcome: Generated | None = None
        try:
            while (delta := await queue.get()) is not None:
                yield delta
            outcome = future.result()
            yield outcome
        except (asyncio.CancelledError, GeneratorExit):
            # The client left (a stream cancelled, a whole answer given up on) before the outcome was out.
            if outcome is None:
                self.metrics.count_cancelled()
            raise
        finally:
            # A client gone stops the generation at its next token (or before it starts, if queued).
            cancelled.set()

    # Classification -----------------------------------------------------------------------------------------------

    async def classify(self, model: ServedModel, request: schemas.ClassifyRequest) -> schemas.Classification:
        texts = request.texts()
        if len(texts) > MAX_CLASSIFY_INPUTS:
            raise bad_request(f"input holds {len(texts)} texts; at most {MAX_CLASSIFY_INPUTS} per request", "input")

        def run() -> tuple[list[int], list[Any]]:
            counts = model.token_counts(texts)
            context = model.max_positions
            for index, count in enumerate(counts):
                if context is not None and count > context:
                    param = "input" if isinstance(request.input, str) else f"input[{index}]"
                    raise bad_request(f"{param} is {count} tokens; this model reads at most {context}", param)
            return counts, model.classify(texts) if model.task == "sequence-classification" else model.tag(texts)

        counts, results = await self._on_model(run)
        self.metrics.add_prompt_tokens(sum(counts))
        if model.task == "sequence-classification":
            data: list[Any] = [
                schemas.LabelScore(
                    index=index, label=max(scores, key=scores.__getitem__), score=max(scores.values()), scores=scores
                )
                for index, scores in enumerate(results)
            ]
        else:
            data = [schemas.TaggedInput(index=index, entities=entities) for index, entities in enumerate(results)]
        usage = schemas.ClassifyUsage(prompt_tokens=sum(counts), total_tokens=sum(counts))
        return schemas.Classification(model=self.settings.name, data=data, usage=usage)
