"""OIDC/JWT access tokens from the hospital's single sign-on, verified against the IdP's JWKS.

A token that verifies but carries no pacs-masks role is rejected as UNAUTHENTICATED, not
FORBIDDEN: a Principal always has a role, and such a token grants nothing here, exactly like a
token minted for another audience. FORBIDDEN stays reserved for "known caller, role too low".

Signing keys are kept here rather than in PyJWKClient's own cache (the client only fetches): its
cache has no single-flight, no back-off after a failed fetch, and its unknown-kid cooldown
differs between PyJWT releases (absent in old ones; in recent ones it also starts at the first
fetch, which would hold back a freshly rotated key for 30 s).
"""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import jwt
from jwt import PyJWK, PyJWKClient

from app.config import Settings
from app.errors import Unauthenticated
from app.principals import Principal, Role, usable_user_name

logger = logging.getLogger(__name__)

DEFAULT_ALGORITHMS = ("RS256", "ES256")
JWKS_LIFESPAN_SECONDS = 300.0
MIN_REFETCH_INTERVAL_SECONDS = 30.0
FAILURE_BACKOFF_SECONDS = 5.0
# Requests wait for the fetch, so an IdP that hangs must not hold them for urllib's default.
HTTP_TIMEOUT_SECONDS = 5.0
MAX_LEEWAY_SECONDS = 300
# Keycloak tokens with many roles reach several KiB; anything far larger is not a token of theirs.
MAX_TOKEN_CHARS = 32 * 1024

# Asymmetric algorithms only: with HS* the verification key is the published JWKS (the classic
# key-confusion forgery), and "none" needs no key at all.
_KEY_TYPES = {
    "RS256": "RSA",
    "RS384": "RSA",
    "RS512": "RSA",
    "PS256": "RSA",
    "PS384": "RSA",
    "PS512": "RSA",
    "ES256": "EC",
    "ES384": "EC",
    "ES512": "EC",
    "EdDSA": "OKP",
}
# An ES256 signature checked with a P-384 key is meaningless; the JWA binds each to one curve.
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}

# The signature segment may be empty so unsecured ("alg": "none") JWTs still take the JWT path
# and are refused for their algorithm rather than as unknown API tokens.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

_LOOPBACK_NAMES = {"localhost"}


class IdpError(Exception):
    """The identity provider answered, but not with what OIDC promises."""


# ValueError covers JSON that does not parse; OSError covers refused, reset and timed out.
_FETCH_ERRORS = (IdpError, jwt.PyJWTError, OSError, http.client.HTTPException, ValueError)


def looks_like_jwt(token: str) -> bool:
    """Whether `token` has the compact JWS shape; says nothing about its validity."""
    return len(token) <= MAX_TOKEN_CHARS and _JWT_SHAPE.fullmatch(token) is not None


@dataclass(frozen=True, slots=True)
class OidcConfig:
    issuer: str
    audience: str
    jwks_url: str | None = None
    role_claim: str = "roles"
    user_claim: str = "preferred_username"
    role_map: Mapping[str, Role] = field(default_factory=dict)
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway_seconds: int = 30

    def __post_init__(self) -> None:
        if not self.issuer:
            raise ValueError("OIDC_ISSUER must not be empty")
        if not self.audience:
            raise ValueError("OIDC_AUDIENCE is required when OIDC_ISSUER is set")
        if not self.role_claim or not self.user_claim:
            raise ValueError("OIDC_ROLE_CLAIM and OIDC_USER_CLAIM must not be empty")
        algorithms = tuple(self.algorithms)
        if not algorithms:
            raise ValueError("OIDC_ALGORITHMS must name at least one algorithm")
        for algorithm in algorithms:
            if algorithm.lower() == "none" or algorithm.upper().startswith("HS"):
                raise ValueError(
                    f"OIDC_ALGORITHMS must not contain {algorithm!r}: unsigned and symmetric "
                    "algorithms would let anyone who can read the JWKS forge tokens"
                )
            if algorithm not in _KEY_TYPES:
                raise ValueError(
                    f"OIDC_ALGORITHMS: unsupported algorithm {algorithm!r}; "
                    f"supported: {', '.join(_KEY_TYPES)}"
                )
        if not 0 <= self.leeway_seconds <= MAX_LEEWAY_SECONDS:
            raise ValueError(f"OIDC_LEEWAY_SECONDS must be between 0 and {MAX_LEEWAY_SECONDS}")
        for name, role in self.role_map.items():
            if not isinstance(role, Role):
                raise TypeError(f"OIDC_ROLE_MAP[{name!r}] must be a Role, got {role!r}")
        if self.jwks_url is not None:
            _check_fetch_url(self.jwks_url, "OIDC_JWKS_URL")
        else:
            _check_fetch_url(self.discovery_url, "the discovery URL derived from OIDC_ISSUER")
        object.__setattr__(self, "algorithms", algorithms)
        # Frozen all the way down: the verifier shares this object across requests.
        object.__setattr__(self, "role_map", MappingProxyType(dict(self.role_map)))

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer.rstrip('/')}/.well-known/openid-configuration"

    @classmethod
    def from_settings(cls, settings: Settings) -> OidcConfig | None:
        """None when OIDC_ISSUER is unset."""
        if not settings.oidc_issuer:
            return None
        role_map: dict[str, Role] = {}
        for idp_role, role_name in settings.oidc_role_map.items():
            role = _role_named(role_name)
            if role is None:
                raise ValueError(
                    f"OIDC_ROLE_MAP[{idp_role!r}] = {role_name!r} is not one of "
                    f"{', '.join(role.value for role in Role)}"
                )
            role_map[idp_role] = role
        return cls(
            issuer=settings.oidc_issuer,
            audience=settings.oidc_audience or "",
            jwks_url=settings.oidc_jwks_url or None,
            role_claim=settings.oidc_role_claim,
            user_claim=settings.oidc_user_claim,
            role_map=role_map,
            algorithms=tuple(settings.oidc_algorithms or DEFAULT_ALGORITHMS),
            leeway_seconds=settings.oidc_leeway_seconds,
        )


class OidcVerifier:
    def __init__(
        self,
        config: OidcConfig,
        *,
        min_refetch_interval: float = MIN_REFETCH_INTERVAL_SECONDS,
        failure_backoff: float = FAILURE_BACKOFF_SECONDS,
    ) -> None:
        self.config = config
        self._min_refetch_interval = min_refetch_interval
        self._failure_backoff = failure_backoff
        # One fetch at a time: when the key set expires under load, waiters reuse its result.
        self._lock = asyncio.Lock()
        self._client: PyJWKClient | None = None
        self._jwks: dict[str, list[dict[str, Any]]] = {}
        self._parsed: dict[tuple[str, str], Any] = {}
        self._jwks_expire_at = float("-inf")
        self._next_forced_refetch = float("-inf")
        self._retry_at = float("-inf")

    @classmethod
    def from_config(cls, config: OidcConfig) -> OidcVerifier:
        return cls(config)

    async def verify(self, token: str) -> Principal:
        config = self.config
        if not looks_like_jwt(token):
            raise Unauthenticated("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed token") from None
        algorithm = header.get("alg")
        # Checked before any key lookup so a forged header cannot make us contact the IdP.
        if not isinstance(algorithm, str) or algorithm not in config.algorithms:
            raise Unauthenticated("token algorithm not allowed")
        # RFC 7515 says to refuse extensions we do not understand (we understand none);
        # PyJWT before 2.12 ignored "crit" (CVE-2026-32597), so this does not rely on it.
        if "crit" in header:
            raise Unauthenticated("token has unsupported critical header parameters")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("token names no signing key")
        key = self._verification_key(await self._jwks_for(kid), kid, algorithm)

        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=config.audience,
                issuer=config.issuer,
                leeway=config.leeway_seconds,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("token is from another issuer") from None
        except jwt.MissingRequiredClaimError as error:
            raise Unauthenticated(f"token lacks the {error.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("bad token signature") from None
        except jwt.PyJWTError:
            raise Unauthenticated("invalid token") from None
        # PyJWT 2.10.0 matched issuers as substrings (CVE-2024-53861); the floor allows it.
        if claims.get("iss") != config.issuer:
            raise Unauthenticated("token is from another issuer")
        return Principal(user=self._user(claims), role=self._role(claims))

    def _user(self, claims: Mapping[str, Any]) -> str:
        user = _claim(claims, self.config.user_claim)
        if not isinstance(user, str) or not user.strip():
            user = claims.get("sub")
        if not isinstance(user, str) or not user.strip():
            raise Unauthenticated("token names no user")
        usable = usable_user_name(user)
        if usable is None:
            raise Unauthenticated("token user name is not usable")
        return usable

    def _role(self, claims: Mapping[str, Any]) -> Role:
        value = _claim(claims, self.config.role_claim)
        names = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        roles: set[Role] = set()
        for name in names:
            if not isinstance(name, str):
                continue
            role = self.config.role_map.get(name) or _role_named(name)
            if role is not None:
                roles.add(role)
        if not roles:
            raise Unauthenticated("token carries no pacs-masks role")
        return max(roles, key=lambda role: role.rank)

    def _verification_key(self, candidates: list[dict[str, Any]], kid: str, algorithm: str) -> Any:
        cached = self._parsed.get((kid, algorithm))
        if cached is not None:
            return cached
        for jwk in candidates:
            # A key is used only with the algorithm it was published for (RFC 8725 3.1);
            # otherwise PyJWT would be handed, say, an EC key for an RS256 token.
            if jwk.get("alg", algorithm) != algorithm or jwk.get("kty") != _KEY_TYPES[algorithm]:
                continue
            curve = _EC_CURVES.get(algorithm)
            if curve is not None and jwk.get("crv") != curve:
                continue
            try:
                key = PyJWK(jwk, algorithm).key
            except jwt.PyJWTError:
                continue
            self._parsed[(kid, algorithm)] = key
            return key
        raise Unauthenticated("signing key does not fit the token algorithm")

    async def _jwks_for(self, kid: str) -> list[dict[str, Any]]:
        if time.monotonic() < self._jwks_expire_at and kid in self._jwks:
            return self._jwks[kid]
        async with self._lock:
            now = time.monotonic()
            if now < self._jwks_expire_at:
                if kid in self._jwks:
                    return self._jwks[kid]
                # Unknown kid in a fresh set: the IdP may have rotated keys. Made-up kids must
                # not turn into a request to the IdP each.
                if now < self._next_forced_refetch:
                    raise Unauthenticated("unknown signing key")
                self._next_forced_refetch = now + self._min_refetch_interval
            elif now < self._retry_at:
                raise Unauthenticated("identity provider unreachable")
            await self._refresh()
        if kid not in self._jwks:
            raise Unauthenticated("unknown signing key")
        return self._jwks[kid]

    async def _refresh(self) -> None:
        client = self._client
        try:
            if client is None:
                jwks_url = self.config.jwks_url
                if jwks_url is None:
                    jwks_url = await asyncio.to_thread(self._discover)
                client = PyJWKClient(
                    jwks_url,
                    cache_jwk_set=False,
                    timeout=HTTP_TIMEOUT_SECONDS,
                    headers={"Accept": "application/json", "User-Agent": "pacs-masks"},
                )
            jwks = _index_jwks(await asyncio.to_thread(client.fetch_data))
        except _FETCH_ERRORS as error:
            self._retry_at = time.monotonic() + self._failure_backoff
            # The error names the URL and the cause, never the token being verified.
            logger.warning("OIDC: could not load signing keys: %s", error)
            raise Unauthenticated("identity provider unreachable") from error
        # Discovery is done once it has succeeded; a failed one is retried after the back-off.
        self._client = client
        self._jwks = jwks
        self._parsed = {}
        self._jwks_expire_at = time.monotonic() + JWKS_LIFESPAN_SECONDS

    def _discover(self) -> str:
        url = self.config.discovery_url
        document = _get_json(url)
        if not isinstance(document, dict):
            raise IdpError(f"{url} did not return a JSON object")
        # OpenID Connect Discovery 1.0, section 4.3: a mismatch means a misconfigured or
        # impersonated provider, and its keys must not be trusted for our issuer.
        if document.get("issuer") != self.config.issuer:
            raise IdpError(
                f"{url} names issuer {document.get('issuer')!r}, not {self.config.issuer!r}"
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise IdpError(f"{url} has no jwks_uri")
        _check_fetch_url(jwks_uri, f"jwks_uri from {url}")
        return jwks_uri


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    # A literal name wins so namespaced claims such as "https://example.org/roles" still work.
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _role_named(name: str) -> Role | None:
    return Role.__members__.get(name.strip().upper())


def _index_jwks(data: Any) -> dict[str, list[dict[str, Any]]]:
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise IdpError("the JWKS endpoint did not return a JWK Set")
    jwks: dict[str, list[dict[str, Any]]] = {}
    for jwk in data["keys"]:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        kid = jwk.get("kid")
        if isinstance(kid, str) and kid:
            jwks.setdefault(kid, []).append(jwk)
    return jwks


def _get_json(url: str) -> Any:
    request = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": "pacs-masks"}
    )
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        error.close()
        raise


def _check_fetch_url(url: str, what: str) -> None:
    """Keys fetched over plain HTTP could be swapped in transit, and with them anyone could mint
    ADMIN tokens; loopback is exempt for local IdPs and tests."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return
    if parts.scheme == "http" and _is_loopback(host):
        return
    raise ValueError(f"{what} must be an https:// URL (http:// only on loopback), got {url!r}")


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
