"""Give up on a whole (not streamed) answer once its client has disconnected, so the model moves on at once."""

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from tunery_server.errors import ApiError

T = TypeVar("T")


class ClientGone(ApiError):
    """The client closed its connection before its answer was ready; the status is for the metrics and the log."""

    def __init__(self) -> None:
        # 499, nginx's "client closed request": nobody reads the answer, but the request counts under it.
        super().__init__(499, "the client closed its connection before the answer was ready")


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """What `work` returns, unless the client disconnects first: then `work` is cancelled and ClientGone raised.

    Streamed answers need none of this: Starlette's StreamingResponse already cancels the stream on a disconnect.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also when this request itself is cancelled (the server stopping): neither may outlive it.
        watch.cancel()
        task.cancel()
    if task in done:
        return task.result()
    # Its cleanup (the generation told to stop) runs before the request ends.
    await asyncio.wait((task,))
    raise ClientGone


async def _disconnected(request: Request) -> None:
    # The body is read by now: the server's receive() waits until the connection closes (or the answer is sent).
    while (await request.receive())["type"] != "http.disconnect":
        pass
