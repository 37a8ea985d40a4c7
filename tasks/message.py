"""The task message: what travels from the producer to a worker, declared once.

A message is `download(url, name, job=JOB, index=I[, opts={...}])`:
  args    (url, name)   the URL, or its redacted form when it carries secrets (`sealed`: the worker reads the
                        real URL from the job's ledger, so `celery inspect` and Flower never see a password)
  kwargs  job, index    the URL's place in the job ledger
          opts          only the options the user set (Options) and the retry state (RetryState), flat; left out
                        when there is none (most messages)
The worker trusts only the pointer (job, index) and the retry state of a message that names a job: URL, name,
digest and options are read from the job's ledger (`tasks.download._received`), so a forged message can neither
send a job's secrets to another URL nor write another name. Options left unset are decided by the worker's own
settings (FLEETFETCH_*), in `Options.resolve`: a value typed by the user always wins over the worker's environment.
An undeclared key fails the message loudly (BadMessage) instead of being ignored: a producer newer than its workers
is told so.

Importable without requests or the task itself: the producer uses it to build messages.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import BadMessage
from .redact import redact_url


@dataclass(frozen=True)
class Options:
    """What the user asked for; None means "the worker's setting of the same name"."""

    subdir: str = ""
    sha256: str | None = None
    force: bool = False
    content_disposition: bool = False
    max_size: int | None = None
    max_attempts: int | None = None
    per_host: int | None = None
    host_rate: float | None = None
    headers: tuple[tuple[str, str], ...] = ()  # request headers the user added; never secret ones (see below)
    user_agent: str | None = None  # None: fleetfetch's own (fetch.USER_AGENT)
    limit_rate: int | None = None  # bytes per second per download; None or 0: unlimited
    secret_headers: bool = False  # the job or URL has secret headers: the worker reads them from the ledger
    credentials: bool = False  # the job has netrc logins or cookies: the worker reads them from the ledger
    split: int | None = None  # most connections for one big file (tasks/segments.py)
    min_split_size: int | None = None  # bytes: a smaller file is never split

    def __post_init__(self) -> None:
        # JSON (the message, the job's meta) turns the pairs into lists: keep one shape.
        object.__setattr__(self, "headers", tuple((str(k), str(v)) for k, v in self.headers))

    def resolve(self, settings: Any) -> Options:
        """Every unset option filled from the worker's settings (message first, then the worker)."""
        return replace(self, **{f.name: getattr(settings, f.name) for f in fields(self)
                                if getattr(self, f.name) is None and hasattr(settings, f.name)})

    def changed(self) -> dict[str, Any]:
        """Only the options that differ from "unset": what a message needs to carry."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) != f.default}


@dataclass
class RetryState:
    """Carried from one attempt of a URL to the next (Celery re-publishes the message with it)."""

    attempt: int = 1
    resume: dict[str, str] | None = None  # validators of a kept partial file: continue it with Range
    waited_s: float = 0.0  # time spent waiting for a host slot, reported in the record
    wait_since: float | None = None  # when the current wait for a host slot began (epoch seconds)
    sealed: bool = False  # args carry the redacted URL; the real one is in the ledger
    redeliveries: int = 0  # times the reconciler published this URL again after its message was lost


_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "subdir": (str,), "sha256": (str, type(None)), "force": (bool,), "content_disposition": (bool,),
    "max_size": (int,), "max_attempts": (int,), "per_host": (int,), "host_rate": (int, float),
    "headers": (list, tuple), "user_agent": (str,), "limit_rate": (int,), "secret_headers": (bool,),
    "credentials": (bool,), "split": (int,), "min_split_size": (int,),
    "attempt": (int,), "resume": (dict, type(None)), "waited_s": (int, float), "wait_since": (int, float, type(None)),
    "sealed": (bool,), "redeliveries": (int,),
}
_OPTIONS = {f.name for f in fields(Options)}
_STATE = {f.name for f in fields(RetryState)}
assert set(_OPTION_TYPES) == _OPTIONS | _STATE, "every message key has a declared type"


@dataclass(frozen=True)
class Entry:
    """One URL of a job as the producer recorded it in the ledger."""

    index: int
    url: str
    name: str
    sha256: str | None = None
    opts: dict[str, Any] = field(default_factory=dict)  # the URL's own options (a list's out=/dir=/header=...)


def is_secret_header(name: str) -> bool:
    """Headers that carry credentials: never in a message, a log or a record, never sent to another host."""
    n = name.strip().lower()
    return n in _SECRET_HEADERS or n.endswith(("-token", "-key"))


_SECRET_HEADERS = {"authorization", "proxy-authorization", "cookie"}


def is_owned_header(name: str) -> bool:
    """Headers that decide the framing or the meaning of the answer: fleetfetch sends them itself or not at all.
    A user's `Range` would store a part as the file, `If-None-Match: *` an empty one, `Content-Length` hang."""
    n = name.strip().lower()
    return n in _OWNED_HEADERS or n.startswith("if-")


_OWNED_HEADERS = {"range", "content-length", "transfer-encoding", "host", "connection", "expect", "te", "upgrade",
                  "keep-alive", "proxy-connection", "trailer"}


def split_headers(headers: list[tuple[str, str]]) -> tuple[tuple[tuple[str, str], ...], list[tuple[str, str]]]:
    """(headers a message may show, secret headers that stay in the ledger)."""
    return (tuple(h for h in headers if not is_secret_header(h[0])),
            [h for h in headers if is_secret_header(h[0])])


def url_options(job: Options, own: dict[str, Any]) -> Options:
    """A URL's options: the job's, with the URL's own sub-directory (inside the job's), headers and User-Agent."""
    if not own:
        return job
    subdir = "/".join(p for p in (job.subdir, own.get("subdir", "")) if p)
    shown, secret = split_headers([(k, v) for k, v in own.get("headers", ())])
    return replace(job, subdir=subdir, headers=job.headers + shown, user_agent=own.get("user_agent") or job.user_agent,
                   secret_headers=job.secret_headers or bool(secret))


@dataclass
class Message:
    url: str
    name: str
    job: str | None = None
    index: int = 0
    options: Options = field(default_factory=Options)
    state: RetryState = field(default_factory=RetryState)

    @property
    def sealed_url(self) -> str:
        """What args[0] carries: the URL itself, or its redacted form when that differs."""
        shown = redact_url(self.url)
        return shown if shown != self.url and self.job else self.url

    def encode(self) -> tuple[tuple[str, str], dict[str, Any]]:
        """(args, kwargs) of the task call."""
        shown = self.sealed_url
        state = replace(self.state, sealed=shown != self.url)
        defaults = RetryState()
        opts = self.options.changed() | {k: v for k, v in asdict(state).items() if v != getattr(defaults, k)}
        return (shown, self.name), {"job": self.job, "index": self.index, **({"opts": opts} if opts else {})}

    @classmethod
    def decode(cls, url: Any, name: Any, job: Any, index: Any, opts: Any) -> Message:
        """The message as the worker received it; BadMessage for an undeclared key or a value of the wrong type
        (anyone who can write to the broker can send one: nothing in it is trusted to have the right shape)."""
        if not isinstance(url, str) or not isinstance(name, str):
            raise BadMessage("the task message has a bad URL or name: strings expected")
        if not (job is None or isinstance(job, str) and job) or not _is_int(index) or index < 0:
            raise BadMessage("the task message has a bad job or index: a job id and an index from 0 expected")
        if opts is not None and not isinstance(opts, dict):
            raise BadMessage("the task message has a bad value for opts: an object expected")
        opts = dict(opts or {})
        unknown = sorted(set(opts) - _OPTIONS - _STATE)
        if unknown:
            raise BadMessage(f"the task message has unknown option(s) {', '.join(unknown)}: this worker is older "
                             "than the producer; upgrade the workers")
        for key, value in opts.items():
            if not isinstance(value, _OPTION_TYPES[key]) or (isinstance(value, bool) and bool not in
                                                               _OPTION_TYPES[key]):
                raise BadMessage(f"the task message has a bad value for {key}: {type(value).__name__}")
        if any(not isinstance(h, list | tuple) or len(h) != 2 or not all(isinstance(x, str) for x in h)
               for h in opts.get("headers", ())):
            raise BadMessage("the task message has a bad value for headers: pairs of strings expected")
        if any(is_owned_header(h[0]) for h in opts.get("headers", ())):
            raise BadMessage("the task message has a bad value for headers: a header fleetfetch owns (Range, If-*...)")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in (opts.get("resume") or {}).items()):
            raise BadMessage("the task message has a bad value for resume: strings expected")
        return cls(url, name, job, index, Options(**{k: v for k, v in opts.items() if k in _OPTIONS}),
                   RetryState(**{k: v for k, v in opts.items() if k in _STATE}))

    @classmethod
    def of(cls, job: str, e: Entry, options: Options, state: RetryState | None = None) -> Message:
        """The message of a job's URL: the job's options, with the URL's own digest and options."""
        opts = replace(options, sha256=e.sha256) if e.sha256 else options
        return cls(e.url, e.name, job, e.index, url_options(opts, e.opts), state or RetryState())

    def display(self) -> tuple[str, str]:
        """argsrepr/kwargsrepr for Flower and logs: the URL without its secrets."""
        return display_of(self.encode()[0], {"job": self.job, "index": self.index})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def display_of(args: Any, kwargs: Any) -> tuple[str, str]:
    """argsrepr/kwargsrepr of a message's args and kwargs: the URL without its secrets, the job and index (never
    options: headers the user added are not for every log). Published messages carry neither (a second copy of
    the URL in each); the worker builds them from the args for Flower, events and `celery inspect`."""
    url, name = (list(args) + ["", ""])[:2] if isinstance(args, list | tuple) else ("", "")
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    return repr((redact_url(str(url)), name)), repr({"job": kwargs.get("job"), "index": kwargs.get("index")})
