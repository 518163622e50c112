"""Signed `viewUrl`s: a browser's `<img>` gets the image without a token in the URL or a
header while the URL is valid, and nothing otherwise; API clients keep the bearer header."""

from __future__ import annotations

import re
import stat
import time
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from conftest import Stack, base_settings, png_bytes
from flows import create_annotation, create_group, upload

from app.view_urls import ViewUrlSigner

TREE = """
query($id: ID!) { annotation(id: $id) { maskGroups { id masks { sliceIndex labelName viewUrl } } } }
"""


async def _masks(stack: Stack) -> tuple[str, dict[tuple[int, str | None], str], dict[int, bytes]]:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 2)
    await upload(stack, group_id, [0, 1])
    await upload(stack, group_id, [0], label="tumor")
    tree = await stack.data(TREE, {"id": annotation_id}, as_="reader")
    [group] = tree["annotation"]["maskGroups"]
    urls = {(mask["sliceIndex"], mask["labelName"]): mask["viewUrl"] for mask in group["masks"]}
    return group_id, urls, {index: png_bytes(index) for index in (0, 1)}


def _with(url: str, **changes: str | None) -> str:
    parts = urlsplit(url)
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    for name, value in changes.items():
        if value is None:
            query.pop(name, None)
        else:
            query[name] = value
    return f"{parts.path}?{urlencode(query)}"


async def test_browser_gets_an_image_only_through_a_valid_signed_url(stack: Stack) -> None:
    group_id, urls, bodies = await _masks(stack)
    signed = urls[(1, None)]
    assert re.fullmatch(
        rf"/api/mask-group/{group_id}/view\?slice=1&expires=\d+&signature=[\w-]{{22}}", signed
    )
    assert urls[(0, "tumor")].startswith(f"/api/mask-group/{group_id}/view?slice=0&label=tumor&")
    for token in stack.tokens.values():
        assert all(token not in url for url in urls.values())

    # A browser: no Authorization header, no cookie.
    browser = stack.storage_client
    image = await browser.get(stack.base_url + signed)
    assert image.status_code == 200
    assert image.content == bodies[1]
    assert image.headers["content-type"] == "image/png"
    cache_control = image.headers["cache-control"]
    max_age = int(re.fullmatch(r"private, max-age=(\d+)", cache_control).group(1))  # type: ignore[union-attr]
    assert 0 < max_age <= stack.settings.view_url_ttl
    etag = image.headers["etag"]
    again = await browser.get(stack.base_url + signed, headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.headers["etag"] == etag
    labelled = await browser.get(stack.base_url + urls[(0, "tumor")])
    assert labelled.status_code == 200

    expires = parse_qs(urlsplit(signed).query)["expires"][0]
    signature = parse_qs(urlsplit(signed).query)["signature"][0]
    forged = signature[:-2] + ("AA" if not signature.endswith("AA") else "BB")
    refused = {
        "no signature": _with(signed, expires=None, signature=None),
        "no expiry": _with(signed, expires=None),
        "bad signature": _with(signed, signature=forged),
        "another slice": _with(signed, slice="0"),
        "another label": _with(signed, label="tumor"),
        "label removed": _with(urls[(0, "tumor")], label=None),
        "later expiry": _with(signed, expires=str(int(expires) + 60)),
        "another group": signed.replace(f"/mask-group/{group_id}/", f"/mask-group/{group_id}0/"),
    }
    for reason, url in refused.items():
        response = await browser.get(stack.base_url + url)
        assert response.status_code in (401, 403), reason
        assert response.content != bodies[1], reason
        assert "max-age" not in response.headers.get("cache-control", ""), reason


async def test_expired_or_foreign_signatures_are_refused(stack: Stack) -> None:
    group_id, _, _ = await _masks(stack)
    signer: ViewUrlSigner = stack.services.view_urls
    now = int(time.time())
    expired = signer.url(group_id, 1, None, now - 1)
    too_long = signer.url(group_id, 1, None, now + stack.settings.view_url_ttl + 120)
    foreign = ViewUrlSigner(b"another-servers-secret-" * 2, stack.settings.view_url_ttl)
    for url in (expired, too_long, foreign.url(group_id, 1, None, now + 60)):
        response = await stack.storage_client.get(stack.base_url + url)
        assert response.status_code == 403


async def test_api_clients_keep_the_bearer_header(stack: Stack) -> None:
    group_id, _, bodies = await _masks(stack)
    path = f"{stack.base_url}/api/mask-group/{group_id}/view"
    with_token = await stack.storage_client.get(
        path, params={"slice": 1}, headers=stack.auth("reader")
    )
    assert with_token.status_code == 200
    assert with_token.content == bodies[1]
    assert with_token.headers["cache-control"] == "private, no-cache"
    anonymous = await stack.storage_client.get(path, params={"slice": 1})
    assert anonymous.status_code == 401


def test_one_url_per_image_for_a_while() -> None:
    """Expiries move in steps of a fifth of the TTL, so a re-rendered page asks for the same
    URL and the browser's cache answers it."""
    signer = ViewUrlSigner(b"s" * 32, 300)
    start = 1_800_000_000
    first = signer.url(5, 3, None, signer.current_expiry(start))
    assert signer.url(5, 3, None, signer.current_expiry(start + 59)) == first
    assert signer.url(5, 3, None, signer.current_expiry(start + 60)) != first
    for now in range(start, start + 600, 7):
        assert 240 < signer.current_expiry(now) - now <= 300


def test_replicas_share_the_secret(tmp_path: Path) -> None:
    shared = base_settings(var_dir=tmp_path / "a", view_url_secret="x" * 40)
    elsewhere = base_settings(var_dir=tmp_path / "b", view_url_secret="x" * 40)
    assert ViewUrlSigner.from_settings(shared).url(1, 0, None, 99) == ViewUrlSigner.from_settings(
        elsewhere
    ).url(1, 0, None, 99)

    generated = base_settings(var_dir=tmp_path / "var")
    first = ViewUrlSigner.from_settings(generated).url(1, 0, None, 99)
    secret_file = tmp_path / "var" / "view-url-secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert ViewUrlSigner.from_settings(generated).url(1, 0, None, 99) == first
    other = ViewUrlSigner.from_settings(base_settings(var_dir=tmp_path / "other"))
    assert other.url(1, 0, None, 99) != first


@pytest.mark.parametrize("ttl", [9, 86_401])
def test_ttl_setting_is_bounded(ttl: int) -> None:
    with pytest.raises(ValueError, match="view_url_ttl"):
        base_settings(view_url_ttl=ttl)
