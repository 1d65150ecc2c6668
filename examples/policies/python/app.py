"""The reference policy in Python: read-only, plus an argument rule, plus a tag."""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports.log import Level, log
from wit_world.imports.types import (
    Denial,
    Exchange,
    MessageKind,
    Outcome_Allow,
    Outcome_Deny,
    Verdict,
)

settings = {"allow": [], "roots": []}


def allow(*tags: str) -> Verdict:
    return Verdict(Outcome_Allow(), list(tags))


def deny(reason: str, tag: str) -> Verdict:
    return Verdict(Outcome_Deny(Denial(-32001, reason)), [tag])


def inside_roots(path: str) -> bool:
    return any(path == root.rstrip("/") or path.startswith(root.rstrip("/") + "/") for root in settings["roots"])


class Hooks(exports.Hooks):
    def configure(self, text: str) -> None:
        parsed = json.loads(text)
        for key in ("allow", "roots"):
            if not isinstance(parsed.get(key, []), list):
                raise Err(f"{key} must be a list")
        settings["allow"] = parsed.get("allow", [])
        settings["roots"] = parsed.get("roots", [])

    def on_request(self, exchange: Exchange) -> Verdict:
        if exchange.kind != MessageKind.REQUEST or exchange.method != "tools/call":
            return allow()
        tool = exchange.tool or ""
        read_only = exchange.annotations is not None and exchange.annotations.read_only_hint is True
        if not read_only and tool not in settings["allow"]:
            log(Level.INFO, f"refusing {tool}")
            return deny(f"tool '{tool}' is not declared read-only (readOnlyHint)", "write-refused")
        arguments = json.loads(exchange.params or "{}").get("arguments") or {}
        path = arguments.get("path")
        if settings["roots"] and isinstance(path, str) and not inside_roots(path):
            return deny(f"argument 'path' path '{path}' is outside the allowed roots", "bad-arguments")
        return allow("checked")

    def on_response(self, exchange: Exchange) -> Verdict:
        return allow()
