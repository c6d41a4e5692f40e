"""The HTTP adapter: one request per call, with the egress allow-list enforced.

``target = {url = "https://api.example.com/v1/things", method = "POST",
credential_header = "Authorization"}``. The destination (``host:port``) must be
in the tool contract's ``egress`` list and allowed for the data's class by the
tenant's egress rules; otherwise the call is refused before any connection
is made. Redirects are not followed (a redirect could leave the allow-list)
and proxies from the environment are ignored. The idempotency key goes in
an ``Idempotency-Key`` header, so a retried idempotent call is recognised.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from planes.kernel.errors import DeadlineExceeded, InvalidArgument, PlanesError, Unavailable

from ..tools import ToolAdapter, ToolCall, ToolContext, ToolDescription, ToolResult

MAX_RESPONSE = 1 << 20


class HttpStatusError(PlanesError):
    reason = "HTTP_STATUS"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def destination(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgument(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def request_json(url: str, method: str, body: dict | None, headers: dict[str, str], timeout: float) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            payload = response.read(MAX_RESPONSE + 1)
            status = response.status
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code == 429:
            raise Unavailable(f"{destination(url)} answered HTTP {exc.code}") from None
        raise HttpStatusError(f"{destination(url)} answered HTTP {exc.code}") from None
    except TimeoutError:
        raise DeadlineExceeded(f"{destination(url)} did not answer in time") from None
    except urllib.error.URLError as exc:
        raise Unavailable(f"cannot reach {destination(url)}: {exc.reason}") from None
    if status >= 300:
        raise HttpStatusError(f"{destination(url)} answered HTTP {status} (redirects are not followed)")
    if len(payload) > MAX_RESPONSE:
        raise HttpStatusError(f"response from {destination(url)} is larger than {MAX_RESPONSE} bytes")
    try:
        result = json.loads(payload or b"{}")
    except ValueError:
        return {"text": payload.decode(errors="replace")}
    return result if isinstance(result, dict) else {"result": result}


class HttpAdapter(ToolAdapter):
    def describe(self, contract) -> ToolDescription:
        url = str(contract.target.get("url", ""))
        return ToolDescription("http", f"{contract.target.get('method', 'POST')} {destination(url)}")

    async def invoke(self, call: ToolCall, context: ToolContext) -> ToolResult:
        target = call.contract.target
        url = str(target.get("url", ""))
        where = destination(url)
        context.check_egress(where)
        context.notes["destination"] = where
        headers = {"Idempotency-Key": call.idempotency_key, "X-Correlation-Id": context.correlation.correlation_id}
        header = target.get("credential_header")
        if header and call.contract.credential_ref:
            headers[str(header)] = context.secrets.get(call.contract.credential_ref).decode().strip()
        method = str(target.get("method", "POST")).upper()
        body = call.arguments if method not in ("GET", "HEAD") else None
        output = await asyncio.to_thread(request_json, url, method, body, headers, context.remaining())
        return ToolResult(output=output)
