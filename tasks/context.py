"""What a worker's download tasks share, built once from the settings their Celery app was made with
(`tasks.app.create_app`): the settings, the HTTP limits, the lease renewer, the downloads' ends sent with the acks,
and each thread's ledger and host limiter. A task finds it through its app (`of`), so one process can hold apps of
two configurations (the fast tier's in-process workers). Only workers import this module: it imports requests."""

from __future__ import annotations

import functools
import threading
from typing import Any

from . import fetch, hostlimit, urllib3_hooks
from .config import Settings, settings_of
from .guard import Policy
from .lease import Renewer
from .ledger import Ledger, client_for, for_thread
from .message import Options
from .slot_state import Ends, SlotAndState

_ATTRIBUTE = "fleetfetch_context"
_BUILDING = threading.Lock()


class TaskContext:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._mine = threading.local()
        s = settings
        self.leases = Renewer(self.ledger, self.limiter, s.url_lease, min(s.url_lease, s.host_lease) / 3)
        self.resolved = functools.lru_cache(maxsize=1024)(self._resolve)  # most URLs share their job's options
        self.ends = Ends(lambda: client_for(s.backend, 2, own_connection=True, timeout=10, name=Ends.NAME))

    def _resolve(self, options: Options) -> Options:
        """A message's options with the worker's settings for those it leaves unset."""
        return options.resolve(self.settings)

    @functools.cached_property
    def limits(self) -> fetch.Limits:
        s = self.settings
        urllib3_hooks.use_stock(s.stock)
        policy = Policy.from_settings(s.allow_private, s.allow_networks, s.resolve)
        return fetch.Limits(s.connect_timeout, s.read_timeout, s.max_redirects, policy, s.ca_bundle)

    def ledger(self) -> Ledger:
        """This thread's ledger (a connection of its own); its Redis client serves the thread's limiter too."""
        return for_thread(self.settings.backend, self.settings.result_expires)

    def limiter(self) -> hostlimit.HostLimiter:
        ledger = self.ledger()
        limiter: hostlimit.HostLimiter | None = getattr(self._mine, "limiter", None)
        if limiter is None or limiter.r is not ledger.r:
            limiter = self._mine.limiter = hostlimit.HostLimiter(ledger.r, self.settings.host_lease)
        return limiter

    def slot_and_state(self) -> SlotAndState:
        limiter = self.limiter()
        both: SlotAndState | None = getattr(self._mine, "both", None)
        if both is None or both.limiter is not limiter:
            both = self._mine.both = SlotAndState(self.ledger(), limiter)
        return both


def of(app: Any) -> TaskContext:
    """The context of the app a task runs in, built on first use from the app's settings."""
    context: TaskContext | None = getattr(app, _ATTRIBUTE, None)
    if context is None or context.settings is not settings_of(app):
        with _BUILDING:  # a pool's threads may get here at once: one renewer per app
            context = getattr(app, _ATTRIBUTE, None)
            if context is None or context.settings is not settings_of(app):
                context = TaskContext(settings_of(app))
                setattr(app, _ATTRIBUTE, context)
    return context
