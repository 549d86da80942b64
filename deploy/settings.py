"""The HTTP API's settings: builder args (YAML `args:` or `serve run ... key=value`), falling back
to STREAMKV_<NAME> environment variables."""

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from deploy import auth
from pipeline.errors import ConfigError, SourceRefusedError
from pipeline.source_policy import SourcePolicy


@dataclass
class Settings:
    model_dir: str
    index_url: str | None = None
    answerers: int = 1  # the coordinator's answer pool: at least this many actors ...
    max_answerers: int | None = None  # ... at most this many (None: a fixed pool)
    answer_target_ongoing: int = 2  # questions in flight per answer actor before the pool grows
    answer_idle_s: float = 120.0  # an extra answer actor idle this long is removed
    answer_start_timeout_s: float = 600.0  # a new answer actor not placed this long is given up
    restore_timeout_s: float = 120.0  # a restarted actor finds no replica of a stream this long: the stream is lost
    api_tokens: list[str] = field(default_factory=list)
    metrics_token: str | None = None  # a token for /metrics only (every stream); API tokens see their own
    owner_secret: str = ""  # keys the owner hashes (HMAC); build_app makes one when left out
    allow_local_files: bool = False
    allow_private_sources: bool = False  # sources on loopback, private, link-local ... addresses (tests, demos)
    allow_source_networks: list[str] = field(default_factory=list)  # CIDRs allowed although not public
    max_source_bytes: int | None = 16 * 2**30  # bytes one pulled source may read (reconnects included)
    max_source_seconds: float | None = None  # how long one pulled source may stay connected (None: no limit)
    max_upload_bytes: int = 64 * 2**20
    max_json_bytes: int = 1 * 2**20
    max_inline_bytes: int = 32 * 2**20  # inline media (data: URLs) in one chat request, decoded
    model_name: str | None = None
    device: str = "cpu"
    placement: str = "local"  # "cluster": pin actor kinds to ray_cluster.yaml's node types (deploy.ingest)
    actor_cpus: float = 0.1  # each prefill/compressor/answer actor
    coordinator_cpus: float = 0.1
    coordinator_name: str = "streamkv-coordinator"
    default_max_tokens: int = 64
    oneshot_timeout_s: float = 120.0
    # Stream creation never hangs (issue 23): at most max_streams streams (one-shot ones included;
    # past it 429). Sources are decoded by a pool of decoder hosts, many per process (actors/decoder_pool.py);
    # raise it with the nodes' memory and CPUs (BENCHMARKS.md: decoder pool). start_timeout_s bounds each
    # wait for an actor a creation needs (past it 503 with Retry-After, the stream undone);
    # max_creating bounds the creations one HTTP replica waits on at once (past it 503 at once), so
    # they never fill its request slots (max_ongoing_requests) ahead of reads and questions.
    max_streams: int | None = 64
    start_timeout_s: float = 30.0
    max_creating: int = 16
    # running sources per decoder host process (None: 16 per CPU of the coordinator's node)
    decoder_capacity: int | None = None

    def __post_init__(self):
        if self.placement not in ("local", "cluster"):
            raise ConfigError(f"placement must be 'local' or 'cluster', not {self.placement!r}")
        self.source_policy()  # a bad network is a ConfigError at start
        if not self.owner_secret:
            raise ConfigError("owner_secret is required (build_app makes one)")
        if (self.max_streams is not None and self.max_streams < 1) or self.start_timeout_s <= 0 or self.max_creating < 1:
            raise ConfigError("max_streams and max_creating must be >= 1, start_timeout_s > 0")
        if not self.model_name:
            self.model_name = Path(self.model_dir).name or "streamkv"

    def secret(self) -> bytes:
        return self.owner_secret.encode()

    def source_policy(self) -> SourcePolicy:
        try:
            return SourcePolicy(allow_private=self.allow_private_sources, allow_files=self.allow_local_files,
                                max_bytes=self.max_source_bytes, max_seconds=self.max_source_seconds,
                                allow_networks=tuple(self.allow_source_networks))
        except SourceRefusedError as exc:
            raise ConfigError(str(exc)) from None


def flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def settings_from_args(args: dict | None) -> Settings:
    """Builder args (YAML `args:` or `serve run ... key=value`), falling back to STREAMKV_* env.
    A missing owner_secret is made here, once for every replica of this deployment: set one to keep
    the streams' owners across redeploys."""
    args = dict(args or {})

    def get(key, default=None):
        value = args.get(key)
        return value if value is not None else os.environ.get(f"STREAMKV_{key.upper()}", default)

    model_dir = get("model_dir")
    if not model_dir:
        raise ConfigError("model_dir is required (builder arg or STREAMKV_MODEL_DIR)")
    path = Path(str(model_dir)).expanduser()
    if not path.is_absolute() and path.exists():  # replicas do not share the caller's cwd
        path = path.resolve()
    return Settings(
        model_dir=str(path),
        index_url=get("index_url") or None,
        answerers=int(get("answerers", 1)),
        max_answerers=int(get("max_answerers")) if get("max_answerers") else None,
        answer_target_ongoing=int(get("answer_target_ongoing", 2)),
        answer_idle_s=float(get("answer_idle_s", 120.0)),
        answer_start_timeout_s=float(get("answer_start_timeout_s", 600.0)),
        restore_timeout_s=float(get("restore_timeout_s", 120.0)),
        api_tokens=auth.parse_tokens(get("api_token")),
        metrics_token=get("metrics_token") or None,
        owner_secret=str(get("owner_secret") or secrets.token_hex(32)),
        allow_local_files=flag(get("allow_local_files", False)),
        allow_private_sources=flag(get("allow_private_sources", False)),
        allow_source_networks=auth.parse_tokens(get("allow_source_networks")),
        max_source_bytes=int(get("max_source_bytes")) if get("max_source_bytes") else 16 * 2**30,
        max_source_seconds=float(get("max_source_seconds")) if get("max_source_seconds") else None,
        max_upload_bytes=int(get("max_upload_bytes", 64 * 2**20)),
        max_json_bytes=int(get("max_json_bytes", 2**20)),
        max_inline_bytes=int(get("max_inline_bytes", 32 * 2**20)),
        model_name=get("model_name") or None,
        device=str(get("device", "cpu")),
        placement=str(get("placement", "local")),
        actor_cpus=float(get("actor_cpus", 0.1)),
        coordinator_cpus=float(get("coordinator_cpus", 0.1)),
        coordinator_name=str(get("coordinator_name", "streamkv-coordinator")),
        default_max_tokens=int(get("default_max_tokens", 64)),
        oneshot_timeout_s=float(get("oneshot_timeout_s", 120.0)),
        max_streams=None if str(get("max_streams", 64)).lower() in ("", "none", "0") else int(get("max_streams", 64)),
        start_timeout_s=float(get("start_timeout_s", 30.0)),
        max_creating=int(get("max_creating", 16)),
        decoder_capacity=int(get("decoder_capacity")) if get("decoder_capacity") else None,
    )
