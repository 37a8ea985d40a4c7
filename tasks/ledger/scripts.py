"""The ledger's Lua scripts (ledger/lua/*.lua, each opening with the KEYS and ARGV it takes), registered once per
client. Scripts that read or change a URL's state have the library `states.lua` put in front of them."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

import redis
from redis.commands.core import Script

_WITH_STATES = ("transition", "hold", "requeue", "mark_queued", "cancel", "uncancel")
NAMES = (*_WITH_STATES, "intern", "renew")


@cache
def body(name: str) -> str:
    """The text of script `name` alone (lua/<name>.lua)."""
    return files(__package__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@cache
def source(name: str) -> str:
    """The text of script `name`, the states library in front where it needs it."""
    return body("states") + body(name) if name in _WITH_STATES else body(name)


class Scripts:
    """Every ledger script registered on `client` (EVALSHA, loaded again by redis-py if the server lost it)."""

    def __init__(self, client: redis.Redis) -> None:
        for name in NAMES:
            setattr(self, name, client.register_script(source(name)))

    transition: Script
    hold: Script
    requeue: Script
    mark_queued: Script
    cancel: Script
    uncancel: Script
    intern: Script
    renew: Script
