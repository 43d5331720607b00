"""Drive `capture.capture_steps` to its end: synchronously while the user's callables answer at once, and
as a task on the running event loop from the first answer that is awaitable.

The steps are a generator that asks for the user's callables to be called and receives their answers;
the driver never loses a capture: it hands the outcome to `on_finish`, or counts a failure with `on_drop`.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Callable, List, Optional, Set, Union

from .capture import RAISED, Outcome, Steps, UserCall, call_user_functions, refuse_awaitables

ASYNC_CALLABLE_TIMEOUT = 30.0  # seconds an awaitable returned by a user callable may take; then it counts as failed
# What spooling a request's event gave: None (it could not be stored), the record's journal sequence number to
# wait for (0: nothing to wait for), or the task that will say (a user callable is still being awaited).
Stored = Union[Optional[int], "asyncio.Task[Optional[int]]"]


class CaptureDriver:
    """Runs capture steps for one middleware: `on_user_error(option)` counts a failed user callable,
    `on_finish(outcome)` spools the outcome (its sequence number, see `Stored`), `on_drop(reason, message)`
    counts a capture that failed."""

    def __init__(self, on_user_error: Callable[[str], None], on_finish: Callable[[Outcome], Optional[int]],
                 on_drop: Callable[[str, str], None]) -> None:
        self._user_error = on_user_error
        self._finish = on_finish
        self._drop = on_drop
        self.pending: Set[Any] = set()  # captures waiting for awaitables (asyncio tasks, kept alive here)

    def advance(self, steps: Steps, answers: Optional[List[Any]]) -> Stored:
        """Run the capture steps here until they finish, or hand them to the event loop at the first awaitable
        (then the task is returned); see `Stored`."""
        try:
            while True:
                calls = steps.send(answers)  # type: ignore[arg-type]  # the first send is None
                answers = call_user_functions(calls, self._user_error)
                if any(inspect.isawaitable(answer) for answer in answers):
                    return self._continue_on_loop(steps, calls, answers)
        except StopIteration as stop:
            return self._finish(stop.value)

    def _continue_on_loop(self, steps: Steps, calls: List[UserCall], answers: List[Any]) -> Stored:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # log_event called outside an event loop: nothing can await these
            return self.advance(steps, refuse_awaitables(calls, answers))
        task = loop.create_task(self._capture_on_loop(steps, calls, answers))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        return task

    async def _capture_on_loop(self, steps: Steps, calls: List[UserCall], answers: List[Any]) -> Optional[int]:
        try:
            while True:
                answers = await resolve(calls, answers, self._user_error)
                calls = steps.send(answers)
                answers = call_user_functions(calls, self._user_error)
        except StopIteration as stop:
            return self._finish(stop.value)
        except Exception:
            self._drop("capture_error", "could not capture the request")
            return None


def stored_of(task: asyncio.Task[Optional[int]]) -> Optional[int]:
    """What a capture task stored (see `Stored`); None if it failed."""
    return None if task.cancelled() or task.exception() is not None else task.result()


async def resolve(calls: List[UserCall], answers: List[Any], on_error: Callable[[str], None]) -> List[Any]:
    """Await the awaitable answers together; one that fails or takes too long becomes `RAISED` (`on_error`)."""

    async def settle(option: str, answer: Any) -> Any:
        if not inspect.isawaitable(answer):
            return answer
        try:
            try:
                return await asyncio.wait_for(answer, ASYNC_CALLABLE_TIMEOUT)
            except asyncio.TimeoutError:
                raise TimeoutError(f"{option} did not finish within {ASYNC_CALLABLE_TIMEOUT:g} s") from None
        except Exception:
            on_error(option)
            return RAISED

    return list(await asyncio.gather(*(settle(call[0], answer) for call, answer in zip(calls, answers))))
