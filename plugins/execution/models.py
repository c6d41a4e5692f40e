"""Model routes: the ``model_route`` extension point, its adapters, and route selection.

A model route in the control plane names an adapter, an endpoint, the data
classes it is approved for and its fallbacks. :func:`select_routes` orders
the candidates for one call from the snapshot and the prompt's data class;
a route not approved for that class is never a candidate, fallbacks
included, so a confidential prompt never reaches a route not approved for
confidential data. Adapters: ``echo`` (deterministic, local, the embedded
default) and ``openai`` (an OpenAI-compatible ``/chat/completions`` client).
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import Any

from planes.kernel.contract import ContractVersion
from planes.kernel.errors import PermissionDenied, PlanesError, Unavailable

from .config import CLASS_NAMES, ModelRoute, RunConfig, class_rank

__all__ = ["EchoModel", "ModelAdapter", "ModelReply", "ModelRequest", "OpenAIChatModel", "select_routes"]


@dataclass(frozen=True)
class ModelRequest:
    messages: list[dict[str, str]]
    parameters: dict[str, Any] = field(default_factory=dict)
    #: The highest class among the prompt's inputs (a ``Classification`` value).
    classification: int = 0


@dataclass
class ModelReply:
    text: str
    route: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ModelAdapter(abc.ABC):
    """Contract of the ``model_route`` extension point."""

    extension_point = "model_route"
    version = ContractVersion(1, 0)

    @abc.abstractmethod
    async def complete(self, route: ModelRoute, request: ModelRequest, secrets=None) -> ModelReply:
        """Answer one chat request on ``route``.

        Called by a worker for a model action, after route selection. Raise
        :class:`~planes.kernel.errors.Unavailable` when the route cannot answer
        now, so the worker tries the next fallback.
        """


class EchoModel(ModelAdapter):
    """Deterministic and local: answers with the last user message, for tests and the demo."""

    async def complete(self, route: ModelRoute, request: ModelRequest, secrets=None) -> ModelReply:
        last = next((m.get("content", "") for m in reversed(request.messages) if m.get("role") == "user"), "")
        prompt_tokens = sum(len(m.get("content", "").split()) for m in request.messages)
        text = f"echo: {last}"
        return ModelReply(text=text, route=route.name, prompt_tokens=prompt_tokens,
                          completion_tokens=len(text.split()))


class OpenAIChatModel(ModelAdapter):
    """POSTs to ``<endpoint>/chat/completions`` in the OpenAI format.

    The route's ``endpoint`` is the base URL (``https://host/v1``); the model
    name is the action's ``model`` parameter, else the route's ``model``; the
    API key is the route's ``credential_ref``, resolved on the worker.
    """

    async def complete(self, route: ModelRoute, request: ModelRequest, secrets=None) -> ModelReply:
        from .adapters.http_tool import request_json

        if not route.endpoint:
            raise Unavailable(f"model route {route.name} has no endpoint")
        parameters = dict(request.parameters)
        body = {"model": str(parameters.pop("model", route.spec.get("model", "default"))), "messages": request.messages}
        for name in ("temperature", "max_tokens", "top_p"):
            if name in parameters:
                body[name] = parameters[name]
        headers = {}
        if secrets is not None:
            try:
                key = secrets.get(str(route.spec.get("credential_ref", ""))).decode().strip()
                headers["Authorization"] = f"Bearer {key}"
            except PlanesError:
                pass
        url = route.endpoint.rstrip("/") + "/chat/completions"
        answer = await asyncio.to_thread(request_json, url, "POST", body, headers, 60.0)
        try:
            text = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise Unavailable(f"model route {route.name} answered without choices[0].message.content") from None
        usage = answer.get("usage", {}) if isinstance(answer.get("usage"), dict) else {}
        return ModelReply(text=str(text), route=route.name, prompt_tokens=int(usage.get("prompt_tokens", 0)),
                          completion_tokens=int(usage.get("completion_tokens", 0)))


def select_routes(config: RunConfig, tenant: str, requested: str, classification: int) -> list[ModelRoute]:
    """Routes to try in order: the requested one (or every route of the tenant) and its fallbacks,
    keeping only those approved for ``classification``.

    Raises:
        PermissionDenied: no candidate is approved for the data's class.
    """
    routes = config.tenant(tenant).routes
    if requested:
        first = routes.get(requested)
        if first is None:
            raise PermissionDenied(f"no model route {requested!r} for tenant {tenant}")
        ordered = [first] + [routes[name] for name in first.fallbacks if name in routes]
    else:
        ordered = [routes[name] for name in sorted(routes)]
    rank = class_rank(classification)
    allowed = [route for route in ordered if rank in route.allowed]
    if not allowed:
        raise PermissionDenied(f"no model route approved for {CLASS_NAMES.get(rank, rank)} data"
                               + (f" among {requested} and its fallbacks" if requested else ""))
    return allowed


def prompt_digest(request: ModelRequest) -> bytes:
    return hashlib.sha256(repr(request.messages).encode()).digest()
