"""The {{name}} policy: refuses calls to tools the server marks destructive,
unless its settings allow them."""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports.log import Level, log
from wit_world.imports.types import Denial, Exchange, MessageKind, Outcome_Allow, Outcome_Deny, Verdict

allow: list[str] = []


class Hooks(exports.Hooks):
    def configure(self, text: str) -> None:
        """Settings arrive as JSON text; raising Err rejects them."""
        settings = json.loads(text)
        unknown = set(settings) - {"allow"}
        if unknown:
            raise Err(f"unknown setting {sorted(unknown)[0]!r}")
        if not isinstance(settings.get("allow", []), list):
            raise Err("allow must be a list")
        allow[:] = settings.get("allow", [])

    def on_request(self, exchange: Exchange) -> Verdict:
        if exchange.kind != MessageKind.REQUEST or exchange.method != "tools/call":
            return Verdict(Outcome_Allow(), [])
        tool = exchange.tool or ""
        destructive = exchange.annotations is not None and exchange.annotations.destructive_hint is True
        if destructive and tool not in allow:
            log(Level.INFO, f"refusing {tool}")
            return Verdict(Outcome_Deny(Denial(-32001, f"tool '{tool}' is destructive")), ["destructive"])
        return Verdict(Outcome_Allow(), ["checked"])

    def on_response(self, exchange: Exchange) -> Verdict:
        return Verdict(Outcome_Allow(), [])
