"""OIDC access tokens, verified against a real JWKS served over HTTP on loopback.

Keys are real (cryptography), tokens are signed by PyJWT or, for the forgeries, assembled by
hand; nothing of ours or of PyJWT is mocked.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from app.config import Settings
from app.errors import Unauthenticated
from app.oidc import OidcConfig, OidcVerifier, looks_like_jwt
from app.principals import Principal, Role

AUDIENCE = "pacs-masks"
REALM_PATH = "/realms/hospital"
JWKS_PATH = REALM_PATH + "/protocol/openid-connect/certs"
DISCOVERY_PATH = REALM_PATH + "/.well-known/openid-configuration"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# --- keys and the identity provider ----------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: str
    private: PrivateKey

    @property
    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            data = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            data = ECAlgorithm.to_jwk(public, as_dict=True)
        return {**data, "kid": self.kid, "use": "sig", "alg": self.algorithm}

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@pytest.fixture(scope="session")
def rsa_key() -> SigningKey:
    return SigningKey("rsa-1", "RS256", rsa.generate_private_key(65537, 2048))


@pytest.fixture(scope="session")
def rotated_rsa_key() -> SigningKey:
    return SigningKey("rsa-2", "RS256", rsa.generate_private_key(65537, 2048))


@pytest.fixture(scope="session")
def ec_key() -> SigningKey:
    return SigningKey("ec-1", "ES256", ec.generate_private_key(ec.SECP256R1()))


@dataclass
class Idp:
    """A stand-in for Keycloak: the JWKS and discovery documents it serves can be changed
    between requests, and every request is counted by path."""

    base_url: str
    keys: list[dict[str, Any]] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)
    failing: bool = False
    advertised_issuer: str | None = None

    @property
    def issuer(self) -> str:
        return self.base_url + REALM_PATH

    @property
    def jwks_url(self) -> str:
        return self.base_url + JWKS_PATH

    def config(self, **overrides: Any) -> OidcConfig:
        values: dict[str, Any] = {
            "issuer": self.issuer,
            "audience": AUDIENCE,
            "jwks_url": self.jwks_url,
            **overrides,
        }
        return OidcConfig(**values)

    def respond(self, path: str) -> tuple[int, Any]:
        self.requests[path] += 1
        if self.failing:
            return 503, {"error": "maintenance"}
        if path == JWKS_PATH:
            return 200, {"keys": list(self.keys)}
        if path == DISCOVERY_PATH:
            return 200, {
                "issuer": self.advertised_issuer or self.issuer,
                "jwks_uri": self.jwks_url,
            }
        return 404, {"error": "not found"}


@pytest.fixture
def idp(rsa_key: SigningKey, ec_key: SigningKey) -> Iterator[Idp]:
    state: Idp

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, document = state.respond(self.path)
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = Idp(f"http://127.0.0.1:{server.server_address[1]}", keys=[rsa_key.jwk, ec_key.jwk])
    # A short poll interval keeps shutdown() from costing half a second per test.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- tokens ----------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(document: dict[str, Any]) -> str:
    return b64url(json.dumps(document).encode())


def claims(idp: Idp, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": idp.issuer,
        "aud": AUDIENCE,
        "sub": "f3b1c2d4-0000-4000-8000-000000000001",
        "preferred_username": "alice",
        "roles": ["uploader"],
        "iat": now,
        "exp": now + 300,
        **overrides,
    }
    return {name: value for name, value in values.items() if value is not None}


def sign(key: SigningKey, payload: dict[str, Any], **headers: Any) -> str:
    return jwt.encode(
        payload, key.private, algorithm=key.algorithm, headers={"kid": key.kid, **headers}
    )


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64url_json(header)}.{b64url_json(payload)}.{b64url(signature)}"


# --- accepted tokens -------------------------------------------------------------------------


async def test_rs256_token_gives_principal(idp: Idp, rsa_key: SigningKey) -> None:
    verifier = OidcVerifier.from_config(idp.config())
    principal = await verifier.verify(sign(rsa_key, claims(idp)))
    assert principal == Principal(user="alice", role=Role.UPLOADER)


async def test_es256_token_gives_principal(idp: Idp, ec_key: SigningKey) -> None:
    verifier = OidcVerifier.from_config(idp.config())
    principal = await verifier.verify(sign(ec_key, claims(idp, roles=["reader"])))
    assert principal == Principal(user="alice", role=Role.READER)


async def test_user_falls_back_to_sub(idp: Idp, rsa_key: SigningKey) -> None:
    verifier = OidcVerifier.from_config(idp.config())
    token = sign(rsa_key, claims(idp, preferred_username=None, sub="svc-inference"))
    assert (await verifier.verify(token)).user == "svc-inference"


async def test_user_claim_is_configurable(idp: Idp, rsa_key: SigningKey) -> None:
    verifier = OidcVerifier.from_config(idp.config(user_claim="email"))
    token = sign(rsa_key, claims(idp, email="alice@hospital.example"))
    assert (await verifier.verify(token)).user == "alice@hospital.example"


@pytest.mark.parametrize(
    ("config", "extra_claims", "role"),
    [
        pytest.param({}, {"roles": "ADMIN"}, Role.ADMIN, id="string-claim"),
        pytest.param({}, {"roles": ["offline_access", "Reader"]}, Role.READER, id="list-claim"),
        pytest.param(
            {},
            {"roles": ["reader", "admin", "uploader"]},
            Role.ADMIN,
            id="highest-role-wins",
        ),
        pytest.param(
            {"role_claim": "realm_access.roles"},
            {"roles": None, "realm_access": {"roles": ["default-roles-hospital", "uploader"]}},
            Role.UPLOADER,
            id="dotted-path",
        ),
        pytest.param(
            {"role_claim": "https://pacs.hospital.example/roles"},
            {"roles": None, "https://pacs.hospital.example/roles": ["admin"]},
            Role.ADMIN,
            id="literal-dotted-name",
        ),
        pytest.param(
            {"role_map": {"radiologist": Role.UPLOADER, "pacs-admins": Role.ADMIN}},
            {"roles": ["staff", "radiologist"]},
            Role.UPLOADER,
            id="role-map",
        ),
        pytest.param(
            {"role_map": {"radiologist": Role.UPLOADER}},
            {"roles": ["radiologist", "reader"]},
            Role.UPLOADER,
            id="role-map-and-direct-name",
        ),
    ],
)
async def test_roles(
    idp: Idp,
    rsa_key: SigningKey,
    config: dict[str, Any],
    extra_claims: dict[str, Any],
    role: Role,
) -> None:
    verifier = OidcVerifier.from_config(idp.config(**config))
    principal = await verifier.verify(sign(rsa_key, claims(idp, **extra_claims)))
    assert principal == Principal(user="alice", role=role)


async def test_clock_skew_within_leeway_is_tolerated(idp: Idp, rsa_key: SigningKey) -> None:
    verifier = OidcVerifier.from_config(idp.config(leeway_seconds=30))
    now = int(time.time())
    token = sign(rsa_key, claims(idp, exp=now - 10, nbf=now + 10))
    assert (await verifier.verify(token)).role is Role.UPLOADER


# --- refused tokens --------------------------------------------------------------------------


def _expired(idp: Idp, key: SigningKey, ec_key: SigningKey) -> str:
    return sign(key, claims(idp, exp=int(time.time()) - 120))


def _not_yet_valid(idp: Idp, key: SigningKey, ec_key: SigningKey) -> str:
    return sign(key, claims(idp, nbf=int(time.time()) + 120))


def _wrong_issuer(idp: Idp, key: SigningKey, ec_key: SigningKey) -> str:
    return sign(key, claims(idp, iss="https://sso.other-hospital.example/realms/hospital"))


def _issuer_prefix(idp: Idp, key: SigningKey, ec_key: SigningKey) -> str:
    return sign(key, claims(idp, iss=idp.issuer[:-1]))


def _wrong_audience(idp: Idp, key: SigningKey, ec_key: SigningKey) -> str:
    return sign(key, claims(idp, aud="billing"))


def _missing_exp(idp: Idp, key: SigningKey, ec_key: SigningKey) -> str:
    return sign(key, claims(idp, exp=None))


def _missing_aud(idp: Idp, key: SigningKey, ec_key: SigningKey) -> str:
    return sign(key, claims(idp, aud=None))


def _tampered_payload(idp: Idp, key: SigningKey, ec_key: SigningKey) -> str:
    header, _, signature = sign(key, claims(idp, roles=["reader"])).split(".")
    return ".".join([header, b64url_json(claims(idp, roles=["admin"])), signature])


def _signed_by_another_key(idp: Idp, key: SigningKey, ec_key: SigningKey) -> str:
    impostor = SigningKey(key.kid, "RS256", rsa.generate_private_key(65537, 2048))
    return sign(impostor, claims(idp, roles=["admin"]))


def _alg_none(idp: Idp, key: SigningKey, ec_key: SigningKey) -> str:
    return unsigned({"alg": "none", "typ": "JWT", "kid": key.kid}, claims(idp, roles=["admin"]))


def _hs256_with_public_key(idp: Idp, key: SigningKey, ec_key: SigningKey) -> str:
    # The key-confusion forgery: HMAC keyed with the published RSA key. PyJWT refuses to sign
    # this way, so the token is assembled by hand.
    header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
    signing_input = f"{b64url_json(header)}.{b64url_json(claims(idp, roles=['admin']))}"
    signature = hmac.new(key.public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def _ec_alg_with_rsa_kid(idp: Idp, key: SigningKey, ec_key: SigningKey) -> str:
    return jwt.encode(claims(idp), ec_key.private, algorithm="ES256", headers={"kid": key.kid})


def _no_kid(idp: Idp, key: SigningKey, ec_key: SigningKey) -> str:
    return jwt.encode(claims(idp), key.private, algorithm="RS256")


def _critical_extension(idp: Idp, key: SigningKey, ec_key: SigningKey) -> str:
    return sign(key, claims(idp), crit=["x-bound-to"], **{"x-bound-to": "device-1"})


def _no_role(idp: Idp, key: SigningKey, ec_key: SigningKey) -> str:
    return sign(key, claims(idp, roles=["offline_access", "uma_authorization"]))


def _no_role_claim(idp: Idp, key: SigningKey, ec_key: SigningKey) -> str:
    return sign(key, claims(idp, roles=None))


def _no_user(idp: Idp, key: SigningKey, ec_key: SigningKey) -> str:
    return sign(key, claims(idp, preferred_username=None, sub=None))


def _garbage(idp: Idp, key: SigningKey, ec_key: SigningKey) -> str:
    return "not-a-jwt"


def _garbage_segments(idp: Idp, key: SigningKey, ec_key: SigningKey) -> str:
    return "eyJub3QiOiJhIGhlYWRlciJ9.e30.AAAA"


REFUSALS = [
    (_expired, "token expired"),
    (_not_yet_valid, "token not yet valid"),
    (_wrong_issuer, "token is from another issuer"),
    (_issuer_prefix, "token is from another issuer"),
    (_wrong_audience, "token is for another audience"),
    (_missing_exp, "token lacks the exp claim"),
    (_missing_aud, "token lacks the aud claim"),
    (_tampered_payload, "bad token signature"),
    (_signed_by_another_key, "bad token signature"),
    (_alg_none, "token algorithm not allowed"),
    (_hs256_with_public_key, "token algorithm not allowed"),
    (_ec_alg_with_rsa_kid, "signing key does not fit the token algorithm"),
    (_no_kid, "token names no signing key"),
    (_critical_extension, "critical header|malformed token"),
    (_no_role, "token carries no pacs-masks role"),
    (_no_role_claim, "token carries no pacs-masks role"),
    (_no_user, "token names no user"),
    (_garbage, "malformed token"),
    (_garbage_segments, "token algorithm not allowed"),
]


@pytest.mark.parametrize(
    ("make_token", "message"),
    [pytest.param(make, message, id=make.__name__.lstrip("_")) for make, message in REFUSALS],
)
async def test_refused(
    idp: Idp,
    rsa_key: SigningKey,
    ec_key: SigningKey,
    make_token: Callable[[Idp, SigningKey, SigningKey], str],
    message: str,
) -> None:
    verifier = OidcVerifier.from_config(idp.config())
    with pytest.raises(Unauthenticated, match=message) as raised:
        await verifier.verify(make_token(idp, rsa_key, ec_key))
    assert raised.value.code == "UNAUTHENTICATED"


async def test_disallowed_algorithm_is_refused_without_contacting_the_idp(
    idp: Idp, ec_key: SigningKey
) -> None:
    verifier = OidcVerifier.from_config(idp.config(algorithms=("RS256",)))
    with pytest.raises(Unauthenticated, match="algorithm not allowed"):
        await verifier.verify(sign(ec_key, claims(idp)))
    assert idp.requests[JWKS_PATH] == 0


# --- the key set: caching, rotation, outages, discovery -------------------------------------


async def test_key_set_is_fetched_once_and_shared(
    idp: Idp, rsa_key: SigningKey, ec_key: SigningKey
) -> None:
    verifier = OidcVerifier.from_config(idp.config())
    tokens = [sign(rsa_key, claims(idp)), sign(ec_key, claims(idp))] * 10
    # Concurrent first requests wait for one fetch instead of each starting their own.
    principals = await asyncio.gather(*(verifier.verify(token) for token in tokens))
    assert {principal.user for principal in principals} == {"alice"}
    await verifier.verify(tokens[0])
    assert idp.requests[JWKS_PATH] == 1


async def test_key_rotation_refetches_once(
    idp: Idp, rsa_key: SigningKey, rotated_rsa_key: SigningKey
) -> None:
    verifier = OidcVerifier.from_config(idp.config())
    await verifier.verify(sign(rsa_key, claims(idp)))
    assert idp.requests[JWKS_PATH] == 1

    idp.keys.append(rotated_rsa_key.jwk)
    principal = await verifier.verify(sign(rotated_rsa_key, claims(idp, roles=["admin"])))
    assert principal.role is Role.ADMIN
    assert idp.requests[JWKS_PATH] == 2

    # Both keys are now cached; neither needs the IdP.
    await verifier.verify(sign(rsa_key, claims(idp)))
    await verifier.verify(sign(rotated_rsa_key, claims(idp)))
    assert idp.requests[JWKS_PATH] == 2


async def test_unknown_kids_refetch_at_most_once_per_interval(
    idp: Idp, rsa_key: SigningKey
) -> None:
    verifier = OidcVerifier.from_config(idp.config())
    await verifier.verify(sign(rsa_key, claims(idp)))
    assert idp.requests[JWKS_PATH] == 1

    garbage = SigningKey("made-up-1", "RS256", rsa_key.private)
    with pytest.raises(Unauthenticated, match="unknown signing key"):
        await verifier.verify(sign(garbage, claims(idp)))
    assert idp.requests[JWKS_PATH] == 2

    for kid in ("made-up-2", "made-up-3", "made-up-1"):
        with pytest.raises(Unauthenticated, match="unknown signing key"):
            await verifier.verify(sign(SigningKey(kid, "RS256", rsa_key.private), claims(idp)))
    assert idp.requests[JWKS_PATH] == 2
    # Known keys keep working while refetches are held back.
    await verifier.verify(sign(rsa_key, claims(idp)))
    assert idp.requests[JWKS_PATH] == 2


async def test_refetch_is_allowed_again_after_the_interval(
    idp: Idp, rsa_key: SigningKey, rotated_rsa_key: SigningKey
) -> None:
    verifier = OidcVerifier(idp.config(), min_refetch_interval=0.3)
    await verifier.verify(sign(rsa_key, claims(idp)))
    with pytest.raises(Unauthenticated, match="unknown signing key"):
        await verifier.verify(sign(rotated_rsa_key, claims(idp)))
    assert idp.requests[JWKS_PATH] == 2

    idp.keys.append(rotated_rsa_key.jwk)
    with pytest.raises(Unauthenticated, match="unknown signing key"):
        await verifier.verify(sign(rotated_rsa_key, claims(idp)))
    assert idp.requests[JWKS_PATH] == 2

    await asyncio.sleep(0.4)
    assert (await verifier.verify(sign(rotated_rsa_key, claims(idp)))).user == "alice"
    assert idp.requests[JWKS_PATH] == 3


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_idp_down_is_unauthenticated_and_logged(
    idp: Idp, rsa_key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    config = idp.config(jwks_url=f"http://127.0.0.1:{_closed_port()}/certs")
    verifier = OidcVerifier.from_config(config)
    token = sign(rsa_key, claims(idp))
    with (
        caplog.at_level(logging.WARNING, logger="app.oidc"),
        pytest.raises(Unauthenticated, match="identity provider unreachable"),
    ):
        await verifier.verify(token)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert token not in caplog.text
    assert token.split(".")[2] not in caplog.text


async def test_idp_errors_back_off_then_recover(idp: Idp, rsa_key: SigningKey) -> None:
    verifier = OidcVerifier(idp.config(), failure_backoff=0.3)
    token = sign(rsa_key, claims(idp))
    idp.failing = True
    for _ in range(3):
        with pytest.raises(Unauthenticated, match="identity provider unreachable"):
            await verifier.verify(token)
    assert idp.requests[JWKS_PATH] == 1

    idp.failing = False
    await asyncio.sleep(0.4)
    assert (await verifier.verify(token)).user == "alice"
    assert idp.requests[JWKS_PATH] == 2


async def test_discovery_finds_the_key_set_once(idp: Idp, rsa_key: SigningKey) -> None:
    verifier = OidcVerifier.from_config(idp.config(jwks_url=None))
    for _ in range(3):
        assert (await verifier.verify(sign(rsa_key, claims(idp)))).user == "alice"
    assert idp.requests == Counter({DISCOVERY_PATH: 1, JWKS_PATH: 1})


async def test_discovery_with_a_trailing_slash_issuer(idp: Idp, rsa_key: SigningKey) -> None:
    idp.advertised_issuer = idp.issuer + "/"
    verifier = OidcVerifier.from_config(idp.config(issuer=idp.issuer + "/", jwks_url=None))
    token = sign(rsa_key, claims(idp, iss=idp.issuer + "/"))
    assert (await verifier.verify(token)).user == "alice"
    assert idp.requests == Counter({DISCOVERY_PATH: 1, JWKS_PATH: 1})


async def test_discovery_refuses_a_document_for_another_issuer(
    idp: Idp, rsa_key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    idp.advertised_issuer = "https://evil.example/realms/hospital"
    verifier = OidcVerifier.from_config(idp.config(jwks_url=None))
    with (
        caplog.at_level(logging.WARNING, logger="app.oidc"),
        pytest.raises(Unauthenticated, match="identity provider unreachable"),
    ):
        await verifier.verify(sign(rsa_key, claims(idp)))
    assert "evil.example" in caplog.text
    assert idp.requests == Counter({DISCOVERY_PATH: 1})


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "algorithms",
    [("none",), ("RS256", "HS256"), ("hs512",), ("NONE",), ("XY999",), ()],
)
def test_config_refuses_unsafe_or_unknown_algorithms(algorithms: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="OIDC_ALGORITHMS"):
        OidcConfig(
            issuer="https://sso.hospital.example/realms/hospital",
            audience=AUDIENCE,
            algorithms=algorithms,
        )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"audience": ""}, "OIDC_AUDIENCE is required"),
        ({"jwks_url": "http://sso.hospital.example/certs"}, "OIDC_JWKS_URL must be an https"),
        ({"issuer": "http://sso.hospital.example/realms/x"}, "discovery URL"),
        ({"jwks_url": "file:///etc/passwd"}, "OIDC_JWKS_URL must be an https"),
        ({"leeway_seconds": -1}, "OIDC_LEEWAY_SECONDS"),
        ({"role_claim": ""}, "OIDC_ROLE_CLAIM"),
    ],
)
def test_config_refuses_bad_values(values: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {
        "issuer": "https://sso.hospital.example/realms/hospital",
        "audience": AUDIENCE,
    }
    with pytest.raises(ValueError, match=message):
        OidcConfig(**{**base, **values})


def test_config_accepts_http_on_loopback_only() -> None:
    config = OidcConfig(issuer="http://localhost:8080/realms/dev", audience=AUDIENCE)
    assert (
        config.discovery_url == "http://localhost:8080/realms/dev/.well-known/openid-configuration"
    )
    assert config.algorithms == ("RS256", "ES256")


def test_from_settings_is_none_without_an_issuer() -> None:
    assert OidcConfig.from_settings(Settings(_env_file=None)) is None


def test_from_settings_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OIDC_ISSUER", "https://sso.hospital.example/realms/hospital")
    monkeypatch.setenv("OIDC_AUDIENCE", AUDIENCE)
    monkeypatch.setenv("OIDC_ROLE_CLAIM", "realm_access.roles")
    monkeypatch.setenv("OIDC_ROLE_MAP", '{"pacs-admins": "admin", "radiologists": "UPLOADER"}')
    # The formats an operator writes: JSON for the map, a comma-separated list of algorithms.
    monkeypatch.setenv("OIDC_ALGORITHMS", "RS256, ES384")
    config = OidcConfig.from_settings(Settings(_env_file=None))
    assert config == OidcConfig(
        issuer="https://sso.hospital.example/realms/hospital",
        audience=AUDIENCE,
        role_claim="realm_access.roles",
        role_map={"pacs-admins": Role.ADMIN, "radiologists": Role.UPLOADER},
        algorithms=("RS256", "ES384"),
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"oidc_audience": None}, "OIDC_AUDIENCE is required"),
        ({"oidc_role_map": {"pacs-admins": "superuser"}}, "OIDC_ROLE_MAP"),
        ({"oidc_algorithms": ["HS256"]}, "OIDC_ALGORITHMS"),
    ],
)
def test_from_settings_refuses_bad_values(values: dict[str, Any], message: str) -> None:
    good: dict[str, Any] = {
        "oidc_issuer": "https://sso.hospital.example/realms/hospital",
        "oidc_audience": AUDIENCE,
    }
    settings = Settings(_env_file=None, **{**good, **values})
    with pytest.raises(ValueError, match=message):
        OidcConfig.from_settings(settings)


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl", True),
        ("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", True),
        ("pmk_" + "A" * 43, False),
        ("a.b", False),
        ("a.b.c.d", False),
        ("a..c", False),
        ("a.b+/.c", False),
        ("a.b.c\n", False),
        ("a." + "b" * 40_000 + ".c", False),
    ],
)
def test_looks_like_jwt(token: str, expected: bool) -> None:
    assert looks_like_jwt(token) is expected


# --- through the served API ------------------------------------------------------------------


async def test_sso_token_works_end_to_end(
    idp: Idp, rsa_key: SigningKey, own_sqlite_url: str, tmp_path: Any
) -> None:
    from conftest import base_settings, serve

    settings = base_settings(
        database_url=own_sqlite_url,
        var_dir=tmp_path,
        oidc_issuer=idp.issuer,
        oidc_audience=AUDIENCE,
        oidc_jwks_url=idp.jwks_url,
        oidc_role_map={"radiologist": "UPLOADER"},
    )
    token = sign(rsa_key, claims(idp, preferred_username="dr-kim", roles=["radiologist"]))
    create = 'mutation { createAnnotation(input: {studyInstanceUid: "1.2.7"}) { createdBy } }'
    async with serve(settings) as (_, base_url), httpx.AsyncClient(base_url=base_url) as client:
        me = await client.post(
            "/graphql",
            json={"query": "{ me { user role } }"},
            headers={"Authorization": f"Bearer {token}"},
        )
        created = await client.post(
            "/graphql", json={"query": create}, headers={"Authorization": f"Bearer {token}"}
        )
        expired = sign(rsa_key, claims(idp, exp=int(time.time()) - 3600))
        refused = await client.post(
            "/graphql",
            json={"query": "{ me { user } }"},
            headers={"Authorization": f"Bearer {expired}"},
        )
    assert me.json() == {"data": {"me": {"user": "dr-kim", "role": "UPLOADER"}}}
    assert created.json()["data"]["createAnnotation"]["createdBy"] == "dr-kim"
    assert refused.status_code == 401
    assert refused.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
