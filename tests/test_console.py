"""The web console in a real headless Chromium (Debian's, driven by Playwright) against the real API, a real worker,
PostgreSQL and Redis: what an on-call engineer does, and what an attacker tries. Each page's screenshot is written
to var/screenshots/ (the README shows one)."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from service.settings import ApprovalPolicy, Settings
from tests.conftest import KEYS, free_port, headers, live_api, running_worker, submit, wait_for, wait_for_status

CHROMIUM = os.environ.get("APIOPS_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip
CHROMIUM_PRESENT = Path(CHROMIUM).exists()
SCREENSHOTS = Path(__file__).resolve().parent.parent / "var" / "screenshots"
# Long enough for a loaded machine; every wait ends as soon as the page shows what it waits for. Playwright's
# `expect` has a timeout of its own (5 s by default), set here for every assertion of this module.
WAIT_MS = 15_000
expect.set_options(timeout=WAIT_MS)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert CHROMIUM_PRESENT, f"{CHROMIUM} is missing: `make browser` installs Debian's chromium"
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


class Console:
    """A signed-in browser tab on the console, which records every request it makes and every page load."""

    def __init__(self, base: str, context: BrowserContext, page: Page) -> None:
        self.base = base
        self.context = context
        self.page = page
        self.requests: list[str] = []
        self.loads = 0
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("load", lambda _page: self._loaded())
        page.set_default_timeout(WAIT_MS)

    def _loaded(self) -> None:
        self.loads += 1

    async def open(self, path: str) -> None:
        await self.page.goto(self.base + path)

    async def sign_in(self, who: str) -> None:
        await self.open("/ui/")
        await expect(self.page).to_have_url(re.compile(r"/ui/sign-in\?next="))
        await self.page.fill("#key", KEYS[who][0])
        await self.page.click("button[type=submit]")
        await expect(self.page).to_have_url(f"{self.base}/ui/")

    async def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)

    def row(self, job_id: str) -> Any:
        return self.page.locator(f"#job-{job_id}")


@asynccontextmanager
async def console(browser: Browser, base: str, who: str = "writer") -> AsyncIterator[Console]:
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        tab = Console(base, context, await context.new_page())
        await tab.sign_in(who)
        yield tab
    finally:
        await context.close()


@asynccontextmanager
async def service(settings: Settings) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    async with live_api(settings) as base, httpx.AsyncClient(base_url=base, headers=headers("writer")) as api:
        yield base, api


async def test_a_submitted_job_appears_and_runs_to_success_live_and_sign_out_ends_the_session(
    settings: Settings, browser: Browser
) -> None:
    async with service(settings) as (base, api), console(browser, base) as ui:
        loads = ui.loads
        job_id = await submit(api, steps=3, sleep_s=0.4)
        failing = await submit(api, steps=3, fail_at_step=2, target="db-7")
        await expect(ui.row(job_id)).to_be_visible()
        await expect(ui.row(job_id).locator(".status")).to_have_text("pending")
        async with running_worker(settings):
            await expect(ui.row(job_id).locator(".status")).to_have_text("running")
            await expect(ui.row(job_id).locator(".step")).to_contain_text("step-")
            await expect(ui.row(job_id).locator(".status")).to_have_text("success")
            await expect(ui.row(failing).locator(".status")).to_have_text("failed")
        await expect(ui.row(failing).locator(".step")).to_contain_text("step-2")
        await expect(ui.page.locator("#counts")).to_contain_text("success 1")
        await expect(ui.page.locator("#counts")).to_contain_text("failed 1")
        assert ui.loads == loads, "the page was reloaded"
        await ui.screenshot("jobs")

        await ui.page.click("text=Sign out")
        await expect(ui.page).to_have_url(re.compile(r"/ui/sign-in$"))
        await ui.open("/ui/")
        await expect(ui.page).to_have_url(re.compile(r"/ui/sign-in\?next="))
        await ui.screenshot("sign-in")
        assert all(url.startswith(base) for url in ui.requests), "a request left the service"


async def test_find_the_failed_job_in_two_clicks_see_why_retry_and_watch_it_live(
    settings: Settings, browser: Browser
) -> None:
    async with service(settings) as (base, api), running_worker(settings):
        ok = await submit(api, steps=1)
        failed = await submit(api, steps=3, fail_at_step=2, target="db-7")
        await wait_for_status(api, failed, "failed", within=15)
        await wait_for_status(api, ok, "success", within=15)
        async with console(browser, base) as ui:
            await ui.page.click("#counts a.s-failed")  # click 1: failed only
            await expect(ui.page).to_have_url(f"{base}/ui/?status=failed")
            await expect(ui.row(ok)).to_have_count(0)
            await ui.row(failed).locator("a").click()  # click 2: the job
            await expect(ui.page).to_have_url(f"{base}/ui/jobs/{failed}")
            await expect(ui.page.locator("tr[data-step=step-2] .status")).to_have_text("failed")
            await expect(ui.page.locator("pre.error")).to_contain_text("step-2")
            await expect(ui.page.locator("pre.params")).to_contain_text('"fail_at_step": 2')
            await expect(ui.page.locator("svg.timeline rect")).to_have_count(2)
            await ui.screenshot("job-failed")

            loads = ui.loads
            await ui.page.click("button.a-retry")
            await expect(ui.page.locator("table.history")).to_contain_text("retried")
            await expect(ui.page.locator("h1 .status")).to_have_text("failed")  # noop fails at step 2 again
            # Neither the retry nor its run loaded the page again: the page followed it live.
            assert ui.loads == loads
            attempts = ui.page.locator("dl.facts dd").nth(7)
            await expect(attempts).to_have_text("2")

            await ui.page.click("text=failed or changed only")
            await expect(ui.page.locator("table.history")).not_to_contain_text("progress")
            await expect(ui.page.locator("table.history")).to_contain_text("finished")


async def test_cancel_a_running_job_from_its_page_and_watch_it_end_cancelled(
    settings: Settings, browser: Browser
) -> None:
    async with service(settings) as (base, api), running_worker(settings):
        job_id = await submit(api, steps=1, sleep_s=60)
        await wait_for_status(api, job_id, "running", within=15)
        async with console(browser, base) as ui:
            await ui.open(f"/ui/jobs/{job_id}")
            await expect(ui.page.locator(".lease")).to_contain_text(":")  # the worker holding it
            await ui.screenshot("job-running")
            loads = ui.loads
            ui.page.once("dialog", lambda dialog: dialog.accept())
            await ui.page.click("button.a-cancel")
            await expect(ui.page.locator("h1 .status")).to_have_text("cancelled")
            await expect(ui.page.locator("button.a-cancel")).to_have_count(0)
            await expect(ui.page.locator("button.a-retry")).to_be_visible()
            assert ui.loads == loads, "the cancel left the page"


async def test_values_a_job_carries_are_shown_as_text_and_never_run(settings: Settings, browser: Browser) -> None:
    payload = "<script>window.__xss = 1</script><img src=x onerror=window.__xss=2>"
    async with service(settings) as (base, api), console(browser, base) as ui:
        job_id = await submit(api, steps=1, target=payload)
        await expect(ui.row(job_id)).to_contain_text(payload)
        await ui.open(f"/ui/jobs/{job_id}")
        await expect(ui.page.locator("dl.facts")).to_contain_text(f"noop/{payload}")
        assert await ui.page.evaluate("window.__xss === undefined")
        async with httpx.AsyncClient(base_url=base, cookies=ui_cookies(await ui.context.cookies())) as http:
            response = await http.get(f"/ui/jobs/{job_id}")
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert "&lt;script&gt;" in response.text


def ui_cookies(cookies: list[Any]) -> dict[str, str]:
    return {cookie["name"]: cookie["value"] for cookie in cookies}


async def test_a_cross_site_post_is_refused(settings: Settings, browser: Browser) -> None:
    """Another site's page, open in the same browser as a signed-in console, posts a cancel: refused, and the job
    runs on. Over plain HTTP as well: with the session cookie, neither a foreign Origin nor a missing token passes."""
    async with service(settings) as (base, api), running_worker(settings):
        job_id = await submit(api, steps=1, sleep_s=60)
        await wait_for_status(api, job_id, "running", within=15)
        async with console(browser, base) as ui, attacker_site(f"{base}/ui/jobs/{job_id}/cancel") as evil:
            await ui.page.goto(evil)
            await expect(ui.page.locator("body")).to_contain_text("cross-site request refused")
            cookies = ui_cookies(await ui.context.cookies())
            async with httpx.AsyncClient(base_url=base, cookies=cookies) as http:
                forged = await http.post(
                    f"/ui/jobs/{job_id}/cancel", data={"confirmed": "yes"}, headers={"Origin": "http://evil.test"}
                )
                tokenless = await http.post(f"/ui/jobs/{job_id}/cancel", data={"confirmed": "yes"},
                                            headers={"Origin": base})  # fmt: skip
        assert forged.status_code == 403 and tokenless.status_code == 403
        assert (await api.get(f"/ops/jobs/{job_id}")).json()["status"] == "running"


@asynccontextmanager
async def attacker_site(action: str) -> AsyncIterator[str]:
    """Another origin (same host, another port) serving a page whose form posts to `action` as soon as it loads."""

    async def evil(request: Any) -> HTMLResponse:
        return HTMLResponse(
            f'<form id="f" method="post" action="{action}"><input name="confirmed" value="yes"></form>'
            "<script>document.getElementById('f').submit()</script>"
        )

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/", evil)]), host="127.0.0.1", port=port,
                                           log_level="warning"))  # fmt: skip
    serving = asyncio.create_task(server.serve())
    try:
        await wait_for(lambda: asyncio.sleep(0, server.started), within=10, interval=0.01)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        await serving


async def test_submit_form_shows_the_apis_messages_next_to_fields_then_submits(
    settings: Settings, browser: Browser
) -> None:
    async with service(settings) as (base, _api), console(browser, base) as ui:
        await ui.open("/ui/submit")
        await ui.page.click("text=noop")
        await expect(ui.page.locator("#f-steps")).to_have_value("2")  # the schema's default
        await ui.page.fill("#f-steps", "99")
        await ui.page.click("button:text('Submit')")
        await expect(ui.page.locator(".field.invalid .field-error")).to_contain_text("less than or equal to 20")
        await expect(ui.page.locator("#f-steps")).to_have_value("99")  # what was sent is kept
        await ui.screenshot("submit")
        await ui.page.fill("#f-steps", "2")
        await ui.page.click("button:text('Submit')")
        await expect(ui.page).to_have_url(re.compile(r"/ui/jobs/noop-"))
        await expect(ui.page.locator("h1 .status")).to_have_text("pending")

        await ui.open("/ui/submit/pg-rebuild")  # a type with a dry run offers it first, ticked
        await expect(ui.page.locator(".submit .field input").first).to_have_attribute("name", "dry_run")
        await expect(ui.page.locator("#f-dry_run")).to_be_checked()
        await expect(ui.page.locator("#f-profile option")).to_contain_text(["(default)", "zalando", "cnpg"])


async def test_workers_page_shows_live_workers_queue_and_readiness(settings: Settings, browser: Browser) -> None:
    async with service(settings) as (base, api), running_worker(settings), console(browser, base) as ui:
        # The page is rendered once (it is not live): open it once the worker's first heartbeat is in.
        await wait_for(lambda: workers(api), within=10)
        await ui.open("/ui/workers")
        await expect(ui.page.locator("table.checks")).to_contain_text("postgres")
        await expect(ui.page.locator("table.checks td.ok")).to_have_count(2)
        await expect(ui.page.locator("table.workers tbody tr")).to_have_count(1)
        await expect(ui.page.locator("table.workers")).to_contain_text(str(os.getpid()))
        await ui.screenshot("workers")


async def workers(api: httpx.AsyncClient) -> list[Any]:
    found: list[Any] = (await api.get("/ops/workers")).json()["workers"]
    return found


async def test_the_console_shows_and_allows_what_the_key_may(settings: Settings, browser: Browser) -> None:
    async with service(settings) as (base, api):
        ours = await submit(api, steps=1)
        async with httpx.AsyncClient(base_url=base, headers=headers("blue-writer")) as blue_api:
            theirs = await submit(blue_api, steps=1)
        async with console(browser, base, "reader") as ui:
            await expect(ui.row(ours)).to_be_visible()
            await expect(ui.row(theirs)).to_have_count(0)  # another team's
            await expect(ui.page.locator("header nav")).not_to_contain_text("Submit")
            await ui.open(f"/ui/jobs/{ours}")
            await expect(ui.page.locator(".actions button")).to_have_count(0)  # a reader may not cancel
            await ui.open(f"/ui/jobs/{theirs}")
            await expect(ui.page.locator("h1")).to_contain_text("404")
            # A form posted anyway, from the console's own origin with the session's token: the key decides.
            token = await ui.page.locator("input[name=csrf]").first.get_attribute("value")
            async with httpx.AsyncClient(base_url=base, cookies=ui_cookies(await ui.context.cookies())) as http:
                for action in ("cancel", "approve"):
                    forged = await http.post(f"/ui/jobs/{ours}/{action}", headers={"Origin": base},
                                             data={"csrf": token or "", "confirmed": "yes"})  # fmt: skip
                    assert forged.status_code == 403, action
                    assert "lacks the scope" in forged.text
        assert (await api.get(f"/ops/jobs/{ours}")).json()["status"] == "pending"


async def test_an_approver_approves_one_job_and_rejects_another_from_their_pages(
    settings: Settings, browser: Browser
) -> None:
    policy = ApprovalPolicy(job_type="noop", targets=("noop/prod/*",))
    approving = settings.model_copy(update={"approval_policies": (policy,)})
    async with service(approving) as (base, api), running_worker(approving):
        first = await submit(api, steps=1, target="prod/db-1")
        second = await submit(api, steps=1, target="prod/db-2")
        async with console(browser, base) as requester:  # the requester may not approve their own job
            await requester.open(f"/ui/jobs/{first}")
            await expect(requester.page.locator("h1 .status")).to_have_text("awaiting approval")
            await expect(requester.page.locator("button.a-approve")).to_have_count(0)
        async with console(browser, base, "approver") as ui:
            await ui.open(f"/ui/jobs/{first}")
            await expect(ui.page.locator("dl.facts")).to_contain_text("0 of 1")
            await ui.screenshot("job-awaiting-approval")
            await ui.page.click("button.a-approve")
            await expect(ui.page.locator("h1 .status")).to_have_text("success")  # approved, then run, live
            await expect(ui.page.locator("table.history")).to_contain_text("approved")

            await ui.open(f"/ui/jobs/{second}")
            await ui.page.click("button.a-reject")  # a page of its own, which asks why
            await expect(ui.page.locator("h1")).to_contain_text(f"Reject job {second}?")
            await ui.page.fill("#reason", "not during the freeze")
            await ui.page.click("button.a-reject")
            await expect(ui.page.locator("h1 .status")).to_have_text("rejected")
            await expect(ui.page.locator("pre.error")).to_contain_text("not during the freeze")
