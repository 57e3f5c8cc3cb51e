"""The memory page at /ui in headless Chromium, against a real memlane with two keyed users.

Needs Debian's Chromium (`apt-get install -y chromium`) and playwright from PyPI; playwright's
own browser download is not used. With MEMLANE_UI_SCREENSHOTS=1 the test also saves the
screenshots that docs/ui.md shows into docs/images/.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import Server, start_server
from tests.e2e.fake_upstream import FakeUpstream

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ALICE, BOB = "sk-alice-ui", "sk-bob-ui"
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "images"
HOSTILE = '<img src=x onerror="window.__pwned = 1"> The user likes <b>bold</b> text.'

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=(
    "needs Debian's Chromium at /usr/bin/chromium: apt-get install -y chromium chromium-driver"))
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory, fake_upstream: FakeUpstream) -> Iterator[Server]:
    config = (
        f'[[keys]]\nuser = "alice"\nkey = "{ALICE}"\n'
        f'[[keys]]\nuser = "bob"\nkey = "{BOB}"\n'
        "[[routes]]\n"
        f'match = "gpt-*"\nprovider = "openai"\napi_base = "{fake_upstream.base_url}"\n'
        'api_key_env = "OPENAI_API_KEY"\n'
    )
    server = start_server(tmp_path_factory.mktemp("ui"), config=config, env={
        "OPENAI_API_KEY": "sk-upstream-test", "MEMLANE_EMBEDDER": "hash", "MEMLANE_PRELOAD_LOCAL_MODEL": "false"})
    seed(server)
    yield server
    server.terminate()


def api(server: Server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def seed(server: Server) -> None:
    with api(server, ALICE) as alice, api(server, BOB) as bob:
        for content, extra in (
            ("The user is allergic to peanuts.", {"importance": 0.9, "tags": ["health"]}),
            ("The user lives in Lisbon.", {}),
            ("The user prefers metric units.", {"tags": ["units"]}),
        ):
            alice.post("/v1/memories", json={"content": content, **extra}).raise_for_status()
        bob.post("/v1/memories", json={"content": "The user keeps a secret diary about peanuts."}).raise_for_status()
    for key, text in ((ALICE, "Which city do I live in?"), (BOB, "bob's private question")):
        openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": text}])
    deadline = time.monotonic() + 30  # the learner writes the log in the background
    with api(server, ALICE) as alice:
        while not alice.get("/v1/interactions").json()["data"]:
            assert time.monotonic() < deadline, "the interaction was never logged"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, ui_server: Server):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: dialog.accept())  # the delete confirmation
    page.set_default_timeout(15_000)
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page, name: str) -> None:
    if os.environ.get("MEMLANE_UI_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def sign_in(page, server: Server, key: str) -> None:
    page.goto(f"{server.url}/ui")
    page.locator("#key").fill(key)
    page.locator("#key-form button[type=submit]").click()
    page.locator("tr.memory").first.wait_for()


def row(page, text: str):
    return page.locator("tr.memory", has_text=text)


def test_key_form_then_list_shows_only_own_memories(page, ui_server: Server):
    page.goto(f"{ui_server.url}/ui")
    page.locator("#login").wait_for()
    assert page.locator("tr.memory").count() == 0  # nothing is shown before a key is given
    shot(page, "ui-key")
    page.locator("#key").fill("sk-wrong")
    page.locator("#key-form button[type=submit]").click()
    page.locator("#status.error", has_text="Incorrect API key").wait_for()

    sign_in(page, ui_server, ALICE)
    contents = page.locator("tr.memory .content").all_text_contents()
    assert "The user is allergic to peanuts." in contents and "The user lives in Lisbon." in contents
    assert len(contents) == 3
    assert "secret diary" not in page.content()  # bob's memory never reaches alice's page
    peanuts = row(page, "allergic to peanuts")
    assert peanuts.locator(".tier").text_content() in ("SHORT_TERM", "LONG_TERM", "PERSISTENT")
    assert float(peanuts.locator("td.num").first.text_content()) > 0  # confidence
    assert peanuts.locator(".label").text_content() == "health"
    # The key lives in this tab's session storage, not in a cookie or in local storage.
    assert page.evaluate("sessionStorage.getItem('memlane.key')") == ALICE
    assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []
    shot(page, "ui-memories")


def test_memory_text_is_shown_as_text_never_as_html(page, ui_server: Server):
    with api(ui_server, ALICE) as alice:
        added = alice.post("/v1/memories", json={"content": HOSTILE})
        try:
            sign_in(page, ui_server, ALICE)
            hostile = row(page, "The user likes")
            assert hostile.locator(".content").text_content() == HOSTILE
            assert hostile.locator("img, b").count() == 0
            assert page.evaluate("window.__pwned") is None
        finally:
            alice.delete(f"/v1/memories/{added.json()['id']}").raise_for_status()


def test_search_shows_score_explanation(page, ui_server: Server):
    sign_in(page, ui_server, ALICE)
    page.locator("#q").fill("peanuts allergy")
    page.locator("#search-form button[type=submit]").click()
    page.locator("#memories-caption", has_text="best matches").wait_for()  # (no wait_for_function: the CSP forbids eval)
    first = page.locator("tr.memory").first
    assert "allergic to peanuts" in first.locator(".content").text_content()
    assert "secret diary" not in page.content()  # bob also has a peanut memory
    first.locator("details.score summary").click()
    parts = dict(zip(first.locator(".part-name").all_text_contents(),
                     map(float, first.locator(".part-value").all_text_contents()), strict=True))
    assert set(parts) == {"vector", "text", "recency", "importance", "confidence", "frequency", "tier", "link"}
    assert parts["text"] > 0 and parts["importance"] == 0.9
    total = float(first.locator("details.score summary").text_content())
    assert 0 < total <= 1
    shot(page, "ui-search")


def test_edit_and_delete(page, ui_server: Server):
    sign_in(page, ui_server, ALICE)
    row(page, "metric units").locator("button.edit").click()
    page.locator("textarea.edit-content").fill("The user prefers metric units and 24-hour time.")
    page.locator("select.edit-tier").select_option("PERSISTENT")
    shot(page, "ui-edit")
    page.locator("button.save").click()
    edited = row(page, "24-hour time")
    edited.wait_for()
    assert edited.locator(".tier").text_content() == "PERSISTENT"
    with api(ui_server, ALICE) as alice:
        stored = {m["content"]: m for m in alice.get("/v1/memories").json()["data"]}
    assert stored["The user prefers metric units and 24-hour time."]["tier"] == "PERSISTENT"

    row(page, "lives in Lisbon").locator("button.delete").click()
    row(page, "lives in Lisbon").wait_for(state="detached")
    assert "Deleted" in page.locator("#status").text_content()
    with api(ui_server, ALICE) as alice:
        assert all("Lisbon" not in m["content"] for m in alice.get("/v1/memories").json()["data"])
    page.reload()  # what the page shows after a reload comes from the store
    page.locator("tr.memory").first.wait_for()
    assert row(page, "lives in Lisbon").count() == 0 and row(page, "24-hour time").count() == 1


def test_export_downloads_own_memories(page, ui_server: Server):
    sign_in(page, ui_server, ALICE)
    with page.expect_download() as download:
        page.locator("#export").click()
    text = Path(download.value.path()).read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert records and {r["user_id"] for r in records} == {"alice"}
    assert any("allergic to peanuts" in r["content"] for r in records)


def test_interaction_log_and_adapters_panel(page, ui_server: Server):
    sign_in(page, ui_server, ALICE)
    page.locator("#tabs button[data-tab=interactions]").click()
    page.locator("tr.interaction").first.wait_for()
    first = page.locator("tr.interaction").first
    assert "Which city do I live in?" in first.text_content()
    assert "You said: Which city do I live in?" in first.text_content()
    assert "bob's private question" not in page.content()
    shot(page, "ui-interactions")

    page.locator("#tabs button[data-tab=adapters]").click()
    with api(ui_server, ALICE) as alice:
        has_endpoint = alice.get("/v1/adapters").status_code != 404
    if not has_endpoint:
        page.get_by_text("adapters: none yet").wait_for()


def test_forget_key_returns_to_the_key_form(page, ui_server: Server):
    sign_in(page, ui_server, ALICE)
    page.locator("#logout").click()
    page.locator("#login").wait_for()
    assert page.evaluate("sessionStorage.getItem('memlane.key')") is None
    page.reload()
    page.locator("#login").wait_for()
    assert page.locator("tr.memory").count() == 0


def test_open_mode_opens_without_a_key(browser, proxied: Server):
    """With no keys configured (one local person) the page skips the key form."""
    added = httpx.post(f"{proxied.base_url}/memories", json={"content": "The user reads the page in open mode."})
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{proxied.url}/ui")
        row(page, "reads the page in open mode").wait_for(timeout=15_000)
        assert page.locator("#login").is_hidden()
        assert "open mode" in page.locator("#who").text_content()
    finally:
        context.close()
        httpx.delete(f"{proxied.base_url}/memories/{added.json()['id']}")  # the server is shared with other tests
