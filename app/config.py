from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_VAR_DIR = Path("var")

# Extension of the stored object for each accepted content type; the filename is ours.
CONTENT_TYPE_EXTENSIONS = {
    "image/png": "png",
    "image/webp": "webp",
    "image/jpeg": "jpg",
    "application/dicom": "dcm",
    "application/octet-stream": "bin",
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    database_url: str = ""
    var_dir: Path = DEFAULT_VAR_DIR

    storage_provider: Literal["local", "s3", "minio"] = "local"
    local_storage_dir: Path | None = None
    local_storage_secret: str = ""
    s3_bucket_name: str = "pacs-masks"
    s3_region: str = "us-east-1"
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = None
    s3_force_path_style: bool | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    # Off by default: storage would delete objects whose rows remain (setup-storage applies it).
    s3_mask_expiry_days: int | None = Field(None, ge=1)
    storage_connect_timeout: float = Field(5.0, gt=0)
    storage_read_timeout: float = Field(30.0, gt=0)
    storage_max_attempts: int = Field(3, ge=1, le=10)

    cleanup_enabled: bool = True
    cleanup_interval_seconds: float = Field(300.0, gt=0)
    # Unregistered objects younger than this are uploads in progress, not debris.
    # None: 2 x SIGNED_URL_MAX_TTL.
    cleanup_grace_seconds: int | None = Field(None, ge=1)
    # Validation of groups that became COMPLETE (app/validation_job.py).
    validation_enabled: bool = True
    validation_interval_seconds: float = Field(30.0, gt=0)

    # Seconds a deleted group is kept (invisible, restorable by restoreMaskGroup) before the
    # sweeper purges its rows and objects; 0 deletes at once.
    deleted_group_retention: int = Field(0, ge=0)

    signed_url_default_ttl: int = Field(600, ge=1)
    signed_url_max_ttl: int = Field(3600, ge=1)
    max_mask_size_bytes: int = Field(64 * 1024 * 1024, ge=1)
    allowed_content_types: Annotated[list[str], NoDecode] = ["image/png"]
    max_slices_per_call: int = Field(5000, ge=1)
    max_slice_count: int = Field(100_000, ge=1, le=100_000)
    view_url_secret: str = ""
    view_url_ttl: int = Field(300, ge=10, le=86_400)

    auth_disabled: bool = False
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_jwks_url: str | None = None
    oidc_role_claim: str = "roles"
    oidc_user_claim: str = "preferred_username"
    oidc_role_map: dict[str, str] = {}
    oidc_algorithms: Annotated[list[str], NoDecode] = ["RS256", "ES256"]
    oidc_leeway_seconds: int = 30
    graphql_introspection: bool = True
    graphiql: bool = True
    max_query_depth: int = Field(15, ge=1)
    max_query_aliases: int = Field(50, ge=0)
    max_query_tokens: int = Field(20_000, ge=100)
    max_query_cost: int = Field(200_000, ge=1)
    # Admitted documents (parsed, limits checked, validated) kept per process, by query text.
    graphql_document_cache_size: int = Field(128, ge=0)
    # Seconds an API token's lookup is reused by a process: a revoked token keeps working
    # on each process for at most this long (0: looked up on every request).
    token_cache_seconds: float = Field(5, ge=0, le=60)
    # The largest legitimate body, a 5000-slice batch of the longest values, is 1.1 MB
    # (1.6 MB indented): 4 MiB leaves room (docs/security.md).
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_json_input_bytes: int = Field(64 * 1024, ge=2)
    # Slow clients: a request's headers, and its body, must arrive within these many seconds.
    request_header_timeout: float = Field(10, gt=0)
    request_body_timeout: float = Field(30, gt=0)
    # Each check of /readyz and of the command line before it starts (database, storage).
    readiness_timeout: float = Field(3, gt=0)
    # Peers whose X-Forwarded-For / X-Forwarded-Proto are believed (uvicorn's rule); none by
    # default, so a client cannot choose the clientIp the audit log records.
    forwarded_allow_ips: Annotated[list[str], NoDecode] = []

    # The PACS's DICOMweb root (QIDO-RS, WADO-RS, STOW-RS); without it DICOM SEG export to
    # and import from a PACS answer PACS_NOT_CONFIGURED.
    dicomweb_url: str | None = None
    dicomweb_username: str | None = None
    dicomweb_password: str | None = None
    dicomweb_token: str | None = None
    dicomweb_timeout: float = Field(60.0, gt=0)
    dicom_export_enabled: bool = True
    # Exports also start at once when requested (the mutation wakes the job); the interval
    # is how soon another replica, or a restarted one, takes over what is pending.
    dicom_export_interval_seconds: float = Field(2.0, gt=0)

    public_base_url: str = ""
    cors_origins: Annotated[list[str], NoDecode] = []
    host: str = "127.0.0.1"
    port: int = 8000
    # Server processes sharing the port (`serve --workers`); more than one needs PostgreSQL.
    workers: int = Field(1, ge=1)
    log_level: str = "info"
    # auto: human-readable text on a terminal, JSON lines otherwise (log collectors).
    log_format: Literal["auto", "json", "text"] = "auto"
    metrics_token: str | None = Field(None, min_length=16)
    metrics_public: bool = False
    # Freeze start-up's objects out of the garbage collector's sight (app.gc_tuning).
    gc_tuning: bool = True

    @field_validator(
        "allowed_content_types",
        "cors_origins",
        "oidc_algorithms",
        "forwarded_allow_ips",
        mode="before",
    )
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        levels = ("critical", "error", "warning", "info", "debug")
        if value.lower() not in levels:
            raise ValueError(f"must be one of {', '.join(levels)}")
        return value.lower()

    @field_validator("allowed_content_types")
    @classmethod
    def _known_content_types(cls, value: list[str]) -> list[str]:
        unknown = [item for item in value if item not in CONTENT_TYPE_EXTENSIONS]
        if unknown:
            raise ValueError(
                f"unsupported content types {unknown}; known: {sorted(CONTENT_TYPE_EXTENSIONS)}"
            )
        return value

    @model_validator(mode="after")
    def _ttls_in_order(self) -> Settings:
        if self.signed_url_default_ttl > self.signed_url_max_ttl:
            raise ValueError("SIGNED_URL_DEFAULT_TTL must not exceed SIGNED_URL_MAX_TTL")
        if (
            self.cleanup_grace_seconds is not None
            and self.cleanup_grace < 2 * self.signed_url_max_ttl
        ):
            # An object younger than that may still be completed through its URL.
            raise ValueError("CLEANUP_GRACE_SECONDS must be at least 2 x SIGNED_URL_MAX_TTL")
        return self

    @property
    def is_embedded_database(self) -> bool:
        return not self.database_url

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            url = self.database_url
            # Operators paste libpq-style URLs; the async engine needs the asyncpg driver.
            for prefix in ("postgresql://", "postgres://"):
                if url.startswith(prefix):
                    return "postgresql+asyncpg://" + url[len(prefix) :]
            if url.startswith("sqlite://") and not url.startswith("sqlite+aiosqlite://"):
                return "sqlite+aiosqlite://" + url[len("sqlite://") :]
            return url
        return f"sqlite+aiosqlite:///{(self.var_dir / 'pacs-masks.db').resolve()}"

    @property
    def resolved_local_storage_dir(self) -> Path:
        return (self.local_storage_dir or self.var_dir / "storage").resolve()

    @property
    def resolved_public_base_url(self) -> str:
        if self.public_base_url:
            return self.public_base_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def cleanup_grace(self) -> int:
        return self.cleanup_grace_seconds or 2 * self.signed_url_max_ttl

    @property
    def storage_call_deadline(self) -> float:
        """The longest one storage call may take, every attempt included."""
        per_attempt = self.storage_connect_timeout + self.storage_read_timeout
        # botocore's standard retry mode sleeps at most 20 s between attempts; we add 1 s each.
        return self.storage_max_attempts * per_attempt + (self.storage_max_attempts - 1)

    @property
    def is_path_style(self) -> bool:
        if self.s3_force_path_style is not None:
            return self.s3_force_path_style
        # MinIO and test servers answer on one host; AWS prefers virtual-hosted buckets.
        return self.storage_provider == "minio" or self.s3_endpoint_url is not None
