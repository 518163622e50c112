"""Benchmark of the web viewer in headless Chromium against a local server (embedded default:
SQLite and local disk, a subprocess): time to first thumbnail and to interactive for a group
page of 10,000 slices, and the viewer's upload rate for 1000 slices.

    .venv/bin/python bench/viewer.py [--slices 10000] [--upload 1000] [--repeat 3]
        [--screenshots docs/images]

The page signs in with the ADMIN token the server prints on its first start; thumbnails are
plain <img> loads of the signed `viewUrl`.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from figures import Report, add_json_argument, machine
from harness import BIN, PUT_CONCURRENCY, content_md5, serving
from playwright.async_api import Page, async_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from browser import CHROMIUM, CHROMIUM_ARGS, mask_png

BATCH = 5000


async def gql(http: httpx.AsyncClient, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    body = (await http.post("/graphql", json={"query": query, "variables": variables})).json()
    if body.get("errors"):
        raise RuntimeError(body["errors"])
    data: dict[str, Any] = body["data"]
    return data


async def seed_group(http: httpx.AsyncClient, annotation_id: str, slices: int) -> str:
    """A COMPLETE group of `slices` slices, uploaded the way a worker does (not timed)."""
    bodies = [mask_png(index % 16, 128) for index in range(16)]
    md5s = [content_md5(body) for body in bodies]
    group = await gql(
        http,
        "mutation($i: CreateMaskGroupInput!) { createMaskGroup(input: $i) { id } }",
        {"i": {"annotationId": annotation_id, "sliceCount": slices, "groupName": "bench"}},
    )
    group_id: str = group["createMaskGroup"]["id"]
    gate = asyncio.Semaphore(PUT_CONCURRENCY)
    # Storage gets the signed URL only, never the API token.
    storage = httpx.AsyncClient(timeout=120)

    async def put(target: dict[str, Any]) -> None:
        headers = {header["name"]: header["value"] for header in target["headers"]}
        async with gate:
            body = bodies[target["sliceIndex"] % 16]
            response = await storage.put(target["url"], content=body, headers=headers)
            response.raise_for_status()

    try:
        for start in range(0, slices, BATCH):
            indexes = range(start, min(slices, start + BATCH))
            targets = await gql(
                http,
                """mutation($g: ID!, $s: [SliceUploadInput!]!) { requestMaskUploadUrls(groupId: $g,
                slices: $s) { sliceIndex url headers { name value } } }""",
                {
                    "g": group_id,
                    "s": [
                        {
                            "sliceIndex": i,
                            "fileSize": len(bodies[i % 16]),
                            "contentMd5": md5s[i % 16],
                        }
                        for i in indexes
                    ],
                },
            )
            await asyncio.gather(*(put(target) for target in targets["requestMaskUploadUrls"]))
            await gql(
                http,
                """mutation($g: ID!, $s: [CompletedSliceInput!]!) { completeMaskUpload(groupId: $g,
                slices: $s) { maskGroup { status } } }""",
                {
                    "g": group_id,
                    "s": [{"sliceIndex": i, "width": 128, "height": 128} for i in indexes],
                },
            )
    finally:
        await storage.aclose()
    return group_id


async def sign_in(page: Page, base_url: str, token: str) -> None:
    await page.goto(f"{base_url}/viewer/")
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await page.get_by_test_id("me").wait_for()


async def group_page(page: Page, url: str) -> dict[str, float]:
    await page.goto("about:blank")
    await page.goto(url)
    await page.wait_for_function(
        "performance.getEntriesByName('first-thumbnail').length > 0", timeout=120_000
    )
    marks: dict[str, float] = await page.evaluate(
        """() => Object.fromEntries(['grid-interactive', 'first-thumbnail'].map(
            name => [name, performance.getEntriesByName(name)[0].startTime]))"""
    )
    # Jump to the middle of the grid: how long until the tiles there show their images.
    scrolled = await page.evaluate(
        """() => new Promise(resolve => {
            const grid = document.querySelector('.grid-scroller');
            const started = performance.now();
            grid.scrollTop = grid.scrollHeight / 2;
            const check = () => {
                const images = [...grid.querySelectorAll('img')].filter(image => {
                    const box = image.getBoundingClientRect();
                    const view = grid.getBoundingClientRect();
                    return box.top >= view.top && box.bottom <= view.bottom;
                });
                if (images.length && images.every(image => image.complete && image.naturalWidth))
                    resolve(performance.now() - started);
                else requestAnimationFrame(check);
            };
            requestAnimationFrame(check);
        })"""
    )
    marks["scroll-to-middle"] = scrolled
    marks["tiles-in-dom"] = await page.locator(".tile").count()
    return marks


async def upload_rate(
    page: Page, base_url: str, annotation_id: str, folder: Path, screenshot: Path | None
) -> float:
    await page.goto(f"{base_url}/viewer/annotations/{annotation_id}/upload")
    await page.get_by_label("Group name").fill("liver-seg run 42")
    await page.get_by_label("Model name").fill("liver-seg")
    await page.get_by_label("Label", exact=True).fill("liver")
    await page.get_by_label("Mask files").set_input_files(sorted(folder.iterdir()))
    started = time.perf_counter()
    await page.get_by_role("button", name="Upload", exact=True).click()
    if screenshot:
        await page.get_by_text(re.compile(r" [3-9]\d\d of \d+ slices registered")).wait_for()
        await page.screenshot(path=str(screenshot))
    await page.get_by_text("group COMPLETE").wait_for(timeout=600_000)
    return time.perf_counter() - started


async def bench(args: argparse.Namespace, work: Path, report: Report) -> None:
    # The embedded default: SQLite and local disk under VAR_DIR.
    env = {"VAR_DIR": str(work / "var"), "LOG_LEVEL": "warning", "PATH": str(BIN)}
    with serving(env, work) as server:
        base_url = server.url
        await server.ready()
        token = server.log.read_text().split("it is shown only once:\n", 1)[1].split()[0]
        auth = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=base_url, timeout=120, headers=auth) as http:
            annotation = await gql(
                http,
                "mutation($i: CreateAnnotationInput!) { createAnnotation(input: $i) { id } }",
                {"i": {"studyInstanceUid": "1.2.840.1", "label": "bench"}},
            )
            annotation_id = annotation["createAnnotation"]["id"]
            seeded = time.perf_counter()
            group_id = await seed_group(http, annotation_id, args.slices)
            print(
                f"seeded {args.slices} slices in {time.perf_counter() - seeded:.1f} s", flush=True
            )
        folder = work / "upload"
        folder.mkdir()
        variants = [mask_png(index, 512) for index in range(16)]
        for index in range(args.upload):
            (folder / f"bench_{index:04d}.png").write_bytes(variants[index % 16])
        upload_bytes = sum(len(variants[index % 16]) for index in range(args.upload))

        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
            )
            # Playwright's waiting helpers evaluate strings, which the pages' CSP forbids.
            page = await browser.new_page(viewport={"width": 1920, "height": 1080}, bypass_csp=True)
            await sign_in(page, base_url, token)
            runs = [
                await group_page(page, f"{base_url}/viewer/groups/{group_id}")
                for _ in range(args.repeat)
            ]
            print_page_figures(args.slices, runs)
            report_page_figures(report, args.slices, runs)
            report.context["chromium"] = browser.version
            if args.screenshots:
                await page.goto(f"{base_url}/viewer/groups/{group_id}")
                await page.get_by_role("button", name="Slice 12", exact=True).click()
                await page.get_by_label("Mask opacity").fill("0.75")
                await page.wait_for_timeout(500)
                await page.screenshot(path=str(Path(args.screenshots) / "viewer-group.png"))
            shot = Path(args.screenshots) / "viewer-upload.png" if args.screenshots else None
            seconds = await upload_rate(page, base_url, annotation_id, folder, shot)
            await browser.close()

    print(
        f"upload of {args.upload} slices ({upload_bytes / 1e6:.1f} MB) through the page: "
        f"{seconds:.1f} s, {args.upload / seconds:.0f} slices/s, "
        f"{upload_bytes / seconds / 1e6:.2f} MB/s"
    )
    note = f"{args.upload} slices, {upload_bytes / 1e6:.1f} MB: MD5, URLs, PUTs, completion"
    report.add("upload through the page", seconds, "s", note=note)
    report.add("upload through the page: rate", args.upload / seconds, "slices/s")


def print_page_figures(slices: int, runs: list[dict[str, float]]) -> None:
    print(f"group page with {slices} slices, {len(runs)} runs (median, ms):", flush=True)
    for name in ("grid-interactive", "first-thumbnail", "scroll-to-middle", "tiles-in-dom"):
        values = [run[name] for run in runs]
        rounded = [round(value) for value in values]
        print(f"  {name:<18} {statistics.median(values):8.0f}   (all: {rounded})", flush=True)


def report_page_figures(report: Report, slices: int, runs: list[dict[str, float]]) -> None:
    names = {
        "grid-interactive": "group page: grid interactive",
        "first-thumbnail": "group page: first thumbnail",
        "scroll-to-middle": "jump to the middle: visible thumbnails loaded",
    }
    for mark, name in names.items():
        values = [run[mark] for run in runs]
        rounded = ", ".join(str(round(value)) for value in values)
        note = f"{slices} slices; median of {len(runs)} page loads ({rounded} ms)"
        report.add(name, statistics.median(values), "ms", note=note)
    report.add("thumbnails in the DOM", runs[-1]["tiles-in-dom"], "", note=f"of {slices}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=10_000)
    parser.add_argument("--upload", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--screenshots", help="folder for the README's screenshots")
    add_json_argument(parser)
    args = parser.parse_args()
    report = Report("Web viewer in headless Chromium (embedded default: SQLite, local disk)")
    report.context = machine()
    with tempfile.TemporaryDirectory(prefix="pacs-masks-viewer-bench-") as work:
        asyncio.run(bench(args, Path(work), report))
    report.write(args.json)


if __name__ == "__main__":
    main()
