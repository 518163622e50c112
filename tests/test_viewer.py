"""The web viewer in Debian's Chromium against a real server: sign in, upload through the page
(expiring URLs, resume), view, filter, delete, and GraphiQL with the network limited to the
server's origin. Any console error fails the test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from browser import CHROMIUM, CHROMIUM_ARGS, mask_png, write_slices
from conftest import Stack, base_settings, open_stack, reset, unavailable
from flows import create_annotation, create_group, upload
from operations import DELETE_GROUP
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Page,
    Request,
    Response,
    Route,
    async_playwright,
    expect,
)

# Set to a folder (docs/images) to refresh the README's screenshots.
SCREENSHOTS = os.environ.get("VIEWER_SCREENSHOTS")
GROUP_QUERY = """query($id: ID!) { maskGroup(id: $id) {
  status uploadedSliceCount masks { labelName width height } } }"""


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        await launched.close()


@pytest.fixture
async def site(sqlite_local_stack: Stack) -> AsyncIterator[Stack]:
    try:
        yield sqlite_local_stack
    finally:
        await reset(sqlite_local_stack)


@dataclass
class Tab:
    page: Page
    base_url: str
    errors: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    puts: list[str] = field(default_factory=list)
    most_puts_at_once: int = 0
    allowed: list[Callable[[ConsoleMessage], bool]] = field(default_factory=list)

    async def sign_in(self, token: str) -> None:
        await self.page.goto(f"{self.base_url}/viewer/")
        await self.page.get_by_label("API token").fill(token)
        await self.page.get_by_role("button", name="Sign in").click()
        await expect(self.page.get_by_test_id("me")).to_contain_text("Signed in as")

    async def screenshot(self, name: str, selector: str | None = None) -> None:
        if SCREENSHOTS:
            path = str(Path(SCREENSHOTS) / f"{name}.png")
            if selector:
                await self.page.locator(selector).screenshot(path=path)
            else:
                await self.page.screenshot(path=path)

    async def assert_fits_width(self) -> None:
        overflow = await self.page.evaluate(
            "document.scrollingElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0


@contextlib.asynccontextmanager
async def open_tab(
    browser: Browser, stack: Stack, viewport: tuple[int, int] = (1280, 800)
) -> AsyncIterator[Tab]:
    context = await browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    page = await context.new_page()
    tab = Tab(page=page, base_url=stack.base_url)
    origin = urlsplit(stack.base_url).netloc
    in_flight = 0

    async def only_our_origin(route: Route) -> None:
        if urlsplit(route.request.url).netloc == origin or route.request.url.startswith("data:"):
            await route.continue_()
        else:
            tab.foreign.append(route.request.url)
            await route.abort()

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and not any(allow(message) for allow in tab.allowed):
            tab.errors.append(f"{message.text} ({message.location.get('url')})")

    def on_request(request: Request) -> None:
        nonlocal in_flight
        if request.method == "PUT":
            tab.puts.append(request.url)
            in_flight += 1
            tab.most_puts_at_once = max(tab.most_puts_at_once, in_flight)

    def on_request_end(request: Request) -> None:
        nonlocal in_flight
        if request.method == "PUT":
            in_flight -= 1

    def on_response(response: Response) -> None:
        on_request_end(response.request)

    await context.route("**/*", only_our_origin)
    page.on("console", on_console)
    page.on("pageerror", lambda error: tab.errors.append(f"uncaught: {error}"))
    page.on("request", on_request)
    # A response ends a PUT for the page (requestfinished may arrive after the next PUT).
    page.on("response", on_response)
    page.on("requestfailed", on_request_end)
    try:
        yield tab
        assert tab.errors == []
        assert tab.foreign == []
    finally:
        await context.close()


async def test_sign_in_shows_me_and_signs_out(browser: Browser, site: Stack) -> None:
    async with open_tab(browser, site) as tab:
        await tab.sign_in(site.tokens["uploader"])
        await expect(tab.page.get_by_test_id("me")).to_have_text(
            "Signed in as uploader-1 (UPLOADER)"
        )
        stored = await tab.page.evaluate(
            "[sessionStorage.getItem('pacs-masks.token'), localStorage.length, document.cookie]"
        )
        assert stored == [site.tokens["uploader"], 0, ""]
        await tab.page.reload()
        await expect(tab.page.get_by_test_id("me")).to_contain_text("uploader-1")
        await tab.page.get_by_role("button", name="Sign out").click()
        await expect(tab.page.get_by_label("API token")).to_be_visible()
        assert await tab.page.evaluate("sessionStorage.length") == 0


async def test_wrong_token_is_explained(browser: Browser, site: Stack) -> None:
    async with open_tab(browser, site) as tab:
        # The refused sign-in request is logged by the browser itself.
        tab.allowed.append(lambda message: "status of 401" in message.text)
        await tab.page.goto(f"{site.base_url}/viewer/")
        await tab.page.get_by_label("API token").fill("pm_not-a-token")
        await tab.page.get_by_role("button", name="Sign in").click()
        await expect(tab.page.get_by_role("alert")).to_contain_text(
            "your API token is no longer valid"
        )


async def test_search_by_study_uid(browser: Browser, site: Stack) -> None:
    await create_annotation(site, "1.2.840.10")
    await create_annotation(site, "1.2.840.20")
    async with open_tab(browser, site) as tab:
        await tab.sign_in(site.tokens["reader"])
        await tab.page.get_by_label("Study Instance UID", exact=True).fill("1.2.840.20")
        await tab.page.get_by_role("button", name="Search").click()
        await expect(tab.page.get_by_text("1 matching annotations")).to_be_visible()
        await tab.page.get_by_role("link", name="1.2.840.20").click()
        await expect(tab.page.get_by_role("heading", level=1)).to_contain_text("Annotation")


async def test_upload_30_slices_through_the_page(
    browser: Browser, site: Stack, tmp_path: Path
) -> None:
    annotation_id = await create_annotation(site)
    files = write_slices(tmp_path / "series", range(30))
    async with open_tab(browser, site) as tab:
        await tab.sign_in(site.tokens["uploader"])
        page = tab.page
        await page.goto(f"{site.base_url}/viewer/annotations/{annotation_id}/upload")
        await page.get_by_label("Group name").fill("liver run 1")
        await page.get_by_label("Model name").fill("liver-seg")
        await page.get_by_label("Version").fill("2.1.0")
        await page.get_by_label("Modality").fill("CT")
        await page.get_by_label("Confidence").fill("0.93")
        await page.get_by_label("Label", exact=True).fill("liver")
        await page.get_by_label("Mask files").set_input_files(files)
        await page.get_by_role("button", name="Upload", exact=True).click()
        await expect(page.get_by_test_id("upload-percent")).to_have_text("100 %", timeout=60_000)
        await expect(page.get_by_text("30 of 30 slices registered")).to_be_visible()
        await expect(page.get_by_text("group COMPLETE")).to_be_visible()
        assert len(tab.puts) == 30
        assert tab.most_puts_at_once <= 6
        await page.get_by_role("link", name="Open the mask group").click()
        await expect(page.get_by_test_id("group-status")).to_have_text("COMPLETE")
    annotation = await site.data(
        "query($id: ID!) { annotation(id: $id) { maskGroups { id } } }", {"id": annotation_id}
    )
    group_id = annotation["annotation"]["maskGroups"][0]["id"]
    group = (await site.data(GROUP_QUERY, {"id": group_id}))["maskGroup"]
    assert (group["status"], group["uploadedSliceCount"]) == ("COMPLETE", 30)
    assert {(m["labelName"], m["width"], m["height"]) for m in group["masks"]} == {
        ("liver", 64, 64)
    }


async def test_files_dropped_on_the_page_are_chosen(browser: Browser, site: Stack) -> None:
    annotation_id = await create_annotation(site)
    async with open_tab(browser, site) as tab:
        await tab.sign_in(site.tokens["uploader"])
        await tab.page.goto(f"{site.base_url}/viewer/annotations/{annotation_id}/upload")
        dropped = await tab.page.evaluate_handle(
            """() => {
                const transfer = new DataTransfer();
                for (const name of ['a_0001.png', 'a_0002.png', 'a_0003.png'])
                    transfer.items.add(new File([new Uint8Array(8)], name, {type: 'image/png'}));
                return transfer;
            }"""
        )
        await tab.page.dispatch_event(".drop", "drop", {"dataTransfer": dropped})
        await expect(tab.page.get_by_text("3 files chosen.")).to_be_visible()


async def test_expired_urls_are_renewed(
    browser: Browser, own_sqlite_url: str, tmp_path: Path
) -> None:
    settings = base_settings(
        database_url=own_sqlite_url,
        var_dir=tmp_path / "var",
        storage_provider="local",
        signed_url_default_ttl=2,
    )
    files = write_slices(tmp_path / "series", range(8))
    async with open_stack("short-ttl", settings) as stack:
        annotation_id = await create_annotation(stack)
        async with open_tab(browser, stack) as tab:
            # Storage's refusals of the held PUTs are logged by the browser itself.
            tab.allowed.append(lambda message: "status of 403" in message.text)
            held: set[str] = set()
            refused: list[int] = []

            async def hold_first_attempt(route: Route) -> None:
                key = urlsplit(route.request.url).path
                if route.request.method == "PUT" and key not in held:
                    held.add(key)
                    await asyncio.sleep(2.5)  # longer than the URL lives
                await route.continue_()

            await tab.page.route("**/storage/**", hold_first_attempt)
            tab.page.on(
                "response",
                lambda response: response.status == 403 and refused.append(response.status),
            )
            await tab.sign_in(stack.tokens["uploader"])
            await tab.page.goto(f"{stack.base_url}/viewer/annotations/{annotation_id}/upload")
            await tab.page.get_by_label("Mask files").set_input_files(files)
            await tab.page.get_by_role("button", name="Upload", exact=True).click()
            await expect(tab.page.get_by_text("group COMPLETE")).to_be_visible(timeout=60_000)
            assert len(refused) >= 1
            assert len(tab.puts) == 8 + len(refused)


async def test_storage_errors_back_off_and_retry(
    browser: Browser, site: Stack, tmp_path: Path
) -> None:
    annotation_id = await create_annotation(site)
    files = write_slices(tmp_path / "series", range(6))
    async with open_tab(browser, site) as tab:
        # The failed first attempts are logged by the browser itself.
        tab.allowed.append(lambda message: "status of 503" in message.text)
        tab.allowed.append(lambda message: "ERR_CONNECTION_RESET" in message.text)
        failed: set[str] = set()

        async def fail_first_attempt(route: Route) -> None:
            key = urlsplit(route.request.url).path
            if route.request.method != "PUT" or key in failed:
                await route.continue_()
                return
            failed.add(key)
            if int(re.findall(r"slice_(\d+)", key)[0]) % 2:
                await route.fulfill(status=503, body="busy")
            else:
                await route.abort("connectionreset")

        await tab.page.route("**/storage/**", fail_first_attempt)
        await tab.sign_in(site.tokens["uploader"])
        await tab.page.goto(f"{site.base_url}/viewer/annotations/{annotation_id}/upload")
        await tab.page.get_by_label("Mask files").set_input_files(files)
        await tab.page.get_by_role("button", name="Upload", exact=True).click()
        await expect(tab.page.get_by_text("group COMPLETE")).to_be_visible(timeout=60_000)
        assert len(failed) == 6
        assert len(tab.puts) == 12


async def test_second_tab_sees_an_upload_live(
    browser: Browser, site: Stack, tmp_path: Path
) -> None:
    annotation_id = await create_annotation(site)
    async with open_tab(browser, site) as watcher:
        await watcher.sign_in(site.tokens["reader"])
        await watcher.page.goto(f"{site.base_url}/viewer/annotations/{annotation_id}")
        await expect(watcher.page.get_by_text("Live updates: connected")).to_be_visible()
        # Another client (an inference worker) uploads: the open page follows without reload.
        group_id = await create_group(site, annotation_id, 20, groupName="from a worker")
        row = watcher.page.locator(f"tr[data-group-id='{group_id}']")
        await expect(row).to_contain_text("0 / 20")
        await upload(site, group_id, range(10), make_body=mask_png)
        await expect(row).to_contain_text("10 / 20")
        await upload(site, group_id, range(10, 20), make_body=mask_png)
        await expect(row).to_contain_text("COMPLETE")
        await site.data(DELETE_GROUP, {"id": group_id})
        await expect(row).to_have_count(0)


async def test_resume_sends_only_missing_slices(
    browser: Browser, site: Stack, tmp_path: Path
) -> None:
    annotation_id = await create_annotation(site)
    group_id = await create_group(site, annotation_id, 30, groupName="interrupted")
    await upload(site, group_id, range(20), make_body=mask_png)
    files = write_slices(tmp_path / "series", range(30))
    async with open_tab(browser, site) as tab:
        await tab.sign_in(site.tokens["uploader"])
        page = tab.page
        await page.goto(f"{site.base_url}/viewer/groups/{group_id}")
        await expect(page.get_by_text("10 of 30 slices are missing")).to_be_visible()
        await tab.screenshot("viewer-resume", ".resume")
        await page.get_by_label("Mask files").set_input_files(files)
        await page.get_by_role("button", name="Resume").click()
        await expect(page.get_by_test_id("group-status")).to_have_text("COMPLETE", timeout=60_000)
        assert sorted(int(re.findall(r"slice_(\d+)", url)[0]) for url in tab.puts) == list(
            range(20, 30)
        )
    group = (await site.data(GROUP_QUERY, {"id": group_id}))["maskGroup"]
    assert (group["status"], group["uploadedSliceCount"]) == ("COMPLETE", 30)


@pytest.mark.parametrize("viewport", [(1280, 800), (1920, 1080)])
async def test_view_filter_and_delete(
    browser: Browser, site: Stack, viewport: tuple[int, int]
) -> None:
    annotation_id = await create_annotation(site)
    group_id = await create_group(
        site, annotation_id, 400, groupName="liver run 2", modelName="liver-seg", modality="CT"
    )
    await upload(site, group_id, range(400), "liver", make_body=mask_png)
    await upload(site, group_id, range(0, 400, 10), "tumor", make_body=mask_png)
    async with open_tab(browser, site, viewport) as tab:
        page = tab.page
        await tab.sign_in(site.tokens["uploader"])
        await page.goto(f"{site.base_url}/viewer/annotations/{annotation_id}")
        row = page.locator(f"tr[data-group-id='{group_id}']")
        await expect(row).to_contain_text("COMPLETE")
        await expect(row).to_contain_text("400 / 400")
        if viewport == (1280, 800):
            await tab.screenshot("viewer-annotation")
        await row.get_by_role("link", name="liver run 2").click()
        await expect(page.get_by_text("440 slices shown")).to_be_visible()
        # Virtualized: only the rows on screen (and a couple around) are in the page.
        tiles = page.locator(".tile")
        assert 0 < await tiles.count() < 200
        # Thumbnails are plain <img> loads of the signed viewUrl: no header, no token in URLs.
        first = page.locator(".tile img").first
        await expect(first).to_have_js_property("complete", True)
        assert await first.evaluate("image => image.naturalWidth") == 64
        await page.get_by_role("region", name="Slices").evaluate(
            "element => { element.scrollTop = element.scrollHeight }"
        )
        await expect(page.get_by_role("button", name="Slice 399 (liver)")).to_be_visible()
        await page.get_by_label("Label filter").select_option(label="tumor")
        await expect(page.get_by_text("40 slices shown")).to_be_visible()
        await page.get_by_role("button", name="Slice 0 (tumor)").focus()
        await page.keyboard.press("Enter")
        viewer = page.get_by_role("region", name="Slice viewer")
        await expect(viewer.get_by_role("heading")).to_have_text("Slice 0 · tumor")
        await page.keyboard.press("ArrowRight")
        await expect(viewer.get_by_role("heading")).to_have_text("Slice 10 · tumor")
        await page.keyboard.press("+")
        await expect(viewer.locator("output[for=zoom]")).to_have_text("125 %")  # 512 px: 100 %
        await page.get_by_label("Mask opacity").fill("0.3")
        await expect(viewer.locator("output[for=opacity]")).to_have_text("30 %")
        await expect(viewer).to_contain_text("512 × 512")
        await tab.assert_fits_width()
        await page.keyboard.press("Escape")
        await expect(viewer).to_have_count(0)

        # Thumbnails scrolled past may still be queued; their masks must exist when served.
        await page.wait_for_load_state("networkidle")
        await page.get_by_role("button", name="Delete this group…").click()
        dialog = page.get_by_role("dialog")
        await expect(dialog).to_contain_text("The mask group “liver run 2”")
        await dialog.get_by_role("button", name="Delete “liver run 2”").click()
        await expect(page).to_have_url(f"{site.base_url}/viewer/annotations/{annotation_id}")
        await expect(page.get_by_text("No mask groups yet.")).to_be_visible()
    assert (await site.data(GROUP_QUERY, {"id": group_id}))["maskGroup"] is None


async def test_graphiql_runs_a_query_offline(browser: Browser, site: Stack) -> None:
    async with open_tab(browser, site) as tab:
        await tab.sign_in(site.tokens["reader"])
        page = tab.page
        await page.get_by_role("link", name="GraphiQL").click()
        await expect(page.locator(".graphiql-container")).to_be_visible()
        await page.get_by_role("button", name=re.compile("Execute query")).click()
        await expect(page.locator(".result-window")).to_contain_text('"user": "reader-1"')
        await tab.screenshot("graphiql")
        assert tab.foreign == []


async def test_refused_delete_is_explained(browser: Browser, site: Stack) -> None:
    annotation_id = await create_annotation(site)
    group_id = await create_group(site, annotation_id, 2, groupName="not yours")
    await upload(site, group_id, range(2), make_body=mask_png)
    async with open_tab(browser, site) as tab:
        await tab.sign_in(site.tokens["reader"])
        await tab.page.goto(f"{site.base_url}/viewer/groups/{group_id}")
        await tab.page.get_by_role("button", name="Delete this group…").click()
        await tab.page.get_by_role("button", name="Delete “not yours”").click()
        await expect(tab.page.get_by_role("alert")).to_have_text(
            "Your role does not allow this. Ask an administrator for the access you need."
        )
    assert (await site.data(GROUP_QUERY, {"id": group_id}))["maskGroup"] is not None


async def test_view_urls_are_renewed_before_they_lapse(
    browser: Browser, own_sqlite_url: str, tmp_path: Path
) -> None:
    settings = base_settings(database_url=own_sqlite_url, var_dir=tmp_path / "var", view_url_ttl=10)
    async with open_stack("short-view-ttl", settings) as stack:
        annotation_id = await create_annotation(stack)
        group_id = await create_group(stack, annotation_id, 2)
        await upload(stack, group_id, range(2), make_body=mask_png)
        async with open_tab(browser, stack) as tab:
            await tab.sign_in(stack.tokens["reader"])
            await tab.page.goto(f"{stack.base_url}/viewer/groups/{group_id}")
            image = tab.page.locator(".tile img").first
            first_url = await image.get_attribute("src")
            # A 10 s URL is renewed 5 s on (the page keeps at least that much between queries).
            await expect(image).not_to_have_attribute("src", first_url or "", timeout=9_000)
            await expect(image).to_have_js_property("naturalWidth", 64)
