"""The web console (deploy/console.py, deploy/console/) in a real headless browser: Debian's
chromium driven by selenium through chromium-driver, against the session's Serve app
(tests/plugins/serve_app.py, with bearer tokens).

STREAMKV_CONSOLE_SCREENSHOT=docs/console.png also saves the deep-link test's screenshot there.
"""

import base64
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.plugins.serve_app import MODEL_NAME, TOKEN_A, TOKEN_B, client
from tests.stages import scene_video as video
from tests.test_http_api import ask_body, mpegts, wait_ingested

QUESTION = "what color was the star?"
MAX_TOKENS = 64  # the console's
WAIT_S = 120


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("chromium and chromedriver not found (apt-get install chromium chromium-driver; make test does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1440,1000", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def until(driver, condition, what: str, timeout_s: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(condition, message=what)


def push_clip(http: httpx.Client, stream_id: str, frames: int, seed: int, close: bool = True) -> None:
    r = http.post("/v1/streams", json={"stream_id": stream_id, "options": {"top_k": 4, "n_local": 24}})
    assert r.status_code == 201, r.text
    r = http.post(f"/v1/streams/{stream_id}/chunks", params={"seq": 0}, content=mpegts(video(frames, seed=seed)),
                  headers={"Content-Type": "video/mp2t"})
    assert r.status_code == 202, r.text
    if close:
        assert http.post(f"/v1/streams/{stream_id}/close", params={"wait_s": 60}).status_code == 200
        assert wait_ingested(http, stream_id, frames)["frames_ingested"] == frames


@pytest.fixture(scope="module")
def lobby(server):
    """Token A's stream with 24 frames ingested, token B's own stream."""
    with client(server, TOKEN_A) as http:
        push_clip(http, "console-lobby", 24, seed=5)
    with client(server, TOKEN_B) as http:
        push_clip(http, "console-b", 8, seed=6)
    yield "console-lobby"
    for token in (TOKEN_A, TOKEN_B):  # the server is the session's: leave no stream to other modules
        with client(server, token) as http:
            for stream in http.get("/v1/streams").json()["data"]:
                if stream["stream_id"].startswith("console-"):
                    http.delete(f"/v1/streams/{stream['stream_id']}")


def dialog_open(driver) -> bool:
    return driver.execute_script("return document.getElementById('token-dialog').open")


def enter_token(driver, server: str, token: str) -> None:
    """A fresh page without a token: the dialog asks for one; it is entered."""
    driver.get(f"{server}/console")
    driver.execute_script("localStorage.clear()")
    driver.get(f"{server}/console")
    until(driver, dialog_open, "token dialog")
    driver.find_element("id", "token-input").send_keys(token)
    driver.find_element("id", "token-submit").click()


def sign_in(driver, server: str, token: str) -> None:
    enter_token(driver, server, token)
    until(driver, lambda d: not dialog_open(d) and d.find_element("id", "token-state").text == "token set", "signed in")


def stream_rows(driver) -> dict[str, list[str]]:
    """The streams table as the page shows it, read at once (the page updates it every poll)."""
    return driver.execute_script("""return Object.fromEntries([...document.querySelectorAll('#streams tbody tr')]
        .map((row) => [row.dataset.stream, [...row.cells].map((td) => td.textContent)]));""")


def test_the_token_is_entered_once_and_the_console_lists_a_live_stream(server, browser, lobby):
    sign_in(browser, server, TOKEN_A)
    until(browser, lambda d: lobby in stream_rows(d), "the stream listed")
    assert browser.execute_script("return localStorage.getItem('streamkv.token')") == TOKEN_A
    with client(server, TOKEN_A) as http:  # a stream fed while the page watches
        push_clip(http, "console-live", 16, seed=7, close=False)
        until(browser, lambda d: int(stream_rows(d).get("console-live", [0, 0, "0"])[2]) > 0, "its first frames shown")
        row = stream_rows(browser)["console-live"]
        assert row[1] == "live" and row[4] in ("running", "starting") and row[3].endswith(("KiB", "MiB"))
        assert http.post("/v1/streams/console-live/close", params={"wait_s": 60}).status_code == 200
        until(browser, lambda d: stream_rows(d)["console-live"][2] == "16", "all its frames, without a reload")
        assert stream_rows(browser)["console-live"][4] == "finished"
        browser.refresh()  # kept in the browser: no second prompt
        until(browser, lambda d: "console-live" in stream_rows(d), "listed after a reload")
        assert not dialog_open(browser)
        assert TOKEN_A not in browser.current_url and "console-b" not in stream_rows(browser)
        http.delete("/v1/streams/console-live")


def shows(driver, selector: str, jpegs: list[bytes]) -> bool:
    """Whether the matching <img>s show these JPEGs, in order: each decoded by the page next to
    the JPEG given, pixel for pixel (the page's CSP keeps scripts from fetching its blob: URLs)."""
    return driver.execute_async_script("""
        const [selector, jpegs, done] = arguments;
        const pixels = async (src) => {
          const img = new Image();
          img.src = src;
          await img.decode();
          const canvas = Object.assign(document.createElement("canvas"), { width: img.naturalWidth, height: img.naturalHeight });
          const context = canvas.getContext("2d");
          context.drawImage(img, 0, 0);
          return context.getImageData(0, 0, canvas.width, canvas.height).data.join(",");
        };
        const shown = [...document.querySelectorAll(selector)];
        Promise.all(shown.map(async (img, i) => i < jpegs.length
            && (await pixels(img.src)) === (await pixels("data:image/jpeg;base64," + jpegs[i]))))
          .then((same) => done(same.length === jpegs.length && same.every(Boolean)), () => done(false));""",
        selector, [base64.b64encode(j).decode() for j in jpegs])


def test_a_deep_link_shows_the_apis_answer_with_its_evidence_thumbnails(server, browser, lobby):
    with client(server, TOKEN_A) as http:
        api = http.post("/v1/chat/completions", json=ask_body(lobby, QUESTION, max_tokens=MAX_TOKENS)).json()
        evidence = api["evidence"]
        assert evidence, api
        middles = [(e["frames"][0] + e["frames"][1] - 1) // 2 for e in evidence]
        thumbs = [http.get(f"/v1/streams/{lobby}/thumbnails/{m}") for m in middles]
        assert all(r.status_code == 200 and r.headers["content-type"] == "image/jpeg" for r in thumbs)
        segments = http.get(f"/v1/streams/{lobby}/timeline").json()["data"]

    browser.get(f"{server}/console")
    if browser.execute_script("return localStorage.getItem('streamkv.token')") != TOKEN_A:
        sign_in(browser, server, TOKEN_A)
    link = f"{server}/console?" + httpx.QueryParams({"stream": lobby, "ask": QUESTION}).__str__()
    browser.get(link)
    answer = until(browser, lambda d: d.find_element("css selector", "#answer[data-state=done]"), "the answer")
    assert answer.get_property("textContent") == api["choices"][0]["message"]["content"]
    assert not dialog_open(browser)

    evidence = sorted(evidence, key=lambda e: -e["score"])  # the page shows the best first
    thumbs = [thumbs[i] for i in sorted(range(len(middles)), key=lambda i: -api["evidence"][i]["score"])]
    cards = browser.find_elements("css selector", ".evidence-item")
    assert [c.get_attribute("data-frames") for c in cards] == [",".join(map(str, e["frames"])) for e in evidence]
    assert [float(c.get_attribute("data-score")) for c in cards] == pytest.approx([e["score"] for e in evidence])
    assert sum(c.is_displayed() for c in cards) == min(6, len(evidence))  # the rest behind "show all"
    assert all(browser.execute_script("return arguments[0].naturalWidth", img) > 0
               for img in browser.find_elements("css selector", ".evidence-item img"))
    assert shows(browser, ".evidence-item img", [r.content for r in thumbs])  # the API's thumbnails

    until(browser, lambda d: len(d.find_elements("css selector", "#timeline .segment")) == len(segments), "timeline")
    tiles = browser.find_elements("css selector", "#timeline .segment")
    assert [int(t.get_attribute("data-segment")) for t in tiles] == [s["segment"] for s in segments]
    assert shows(browser, "#timeline .segment img", [base64.b64decode(s["thumbnail"]["jpeg_base64"]) for s in segments])
    if len({s["thumbnail"]["jpeg_base64"] for s in segments}) > 1:  # (and it tells them apart)
        assert not shows(browser, "#timeline .segment img", [base64.b64decode(s["thumbnail"]["jpeg_base64"])
                                                             for s in segments[::-1]])
    marked = {int(t.get_attribute("data-segment")) for t in tiles if "evidence" in t.get_attribute("class")}
    assert marked == {s["segment"] for s in segments
                      if any(e["frames"][0] < s["frames"][1] and s["frames"][0] < e["frames"][1] for e in evidence)}
    assert marked
    time.sleep(1.0)  # a poll or two for the charts
    shot = browser.get_screenshot_as_png()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("STREAMKV_CONSOLE_SCREENSHOT"):
        Path(os.environ["STREAMKV_CONSOLE_SCREENSHOT"]).write_bytes(shot)


def test_delete_in_the_console_removes_the_stream(server, browser, lobby):
    with client(server, TOKEN_A) as http:
        push_clip(http, "console-doomed", 4, seed=8)
        browser.get(f"{server}/console")
        if browser.execute_script("return localStorage.getItem('streamkv.token')") != TOKEN_A:
            sign_in(browser, server, TOKEN_A)
        until(browser, lambda d: "console-doomed" in stream_rows(d), "listed")
        row = browser.find_element("css selector", "#streams tr[data-stream='console-doomed']")
        row.find_element("css selector", "button.delete").click()
        browser.find_element("css selector", "#streams tr[data-stream='console-doomed'] button.delete").click()  # confirm
        until(browser, lambda d: "console-doomed" not in stream_rows(d), "gone from the list")
        assert http.get("/v1/streams/console-doomed").status_code == 404
        assert lobby in stream_rows(browser)  # the others stay


def test_another_token_never_sees_the_first_tokens_streams(server, browser, lobby):
    enter_token(browser, server, "not-a-token")
    until(browser, lambda d: dialog_open(d) and "refused" in d.find_element("id", "token-error").text, "refused")
    browser.find_element("id", "token-input").send_keys(TOKEN_B)
    browser.find_element("id", "token-submit").click()
    until(browser, lambda d: "console-b" in stream_rows(d), "B's own stream")
    browser.get(f"{server}/console?stream={lobby}&ask=hello")  # A's stream, by name
    until(browser, lambda d: "console-b" in stream_rows(d), "listed again")
    time.sleep(2 * 1.5)  # two polls
    assert set(stream_rows(browser)) == {"console-b"}
    assert browser.find_element("id", "detail").get_attribute("hidden") is not None
    assert lobby not in browser.find_element("id", "streams").text
    assert TOKEN_B not in browser.current_url
    r = httpx.get(f"{server}/v1/streams/{lobby}/timeline", headers={"Authorization": f"Bearer {TOKEN_B}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "UnknownStreamError"
    assert httpx.get(f"{server}/v1/streams/{lobby}/thumbnails/0").status_code == 401
    assert MODEL_NAME in browser.find_element("id", "model").text


def test_create_by_uploading_a_file_and_a_bad_source_is_a_clear_error(server, browser, lobby, tmp_path):
    with client(server, TOKEN_A) as http:  # what the API itself answers to the same request
        refused = http.post("/v1/streams", json={"stream_id": "console-bad", "source": "ftp://example.invalid/clip.ts"})
    assert refused.status_code == 400, refused.text
    kind = refused.json()["error"]["type"]
    browser.get(f"{server}/console")
    if browser.execute_script("return localStorage.getItem('streamkv.token')") != TOKEN_A:
        sign_in(browser, server, TOKEN_A)
    until(browser, lambda d: lobby in stream_rows(d), "listed")
    browser.find_element("id", "new-id").send_keys("console-bad")
    browser.find_element("id", "new-source").send_keys("ftp://example.invalid/clip.ts")
    browser.find_element("css selector", "#create button[type=submit]").click()
    until(browser, lambda d: kind in d.find_element("id", "create-status").text, "the API's error shown")
    assert "console-bad" not in stream_rows(browser)

    clip = tmp_path / "clip.ts"
    clip.write_bytes(mpegts(video(12, seed=9)))
    browser.find_element("id", "new-id").clear()
    browser.find_element("id", "new-id").send_keys("console-upload")
    browser.find_element("id", "new-source").clear()
    browser.find_element("id", "new-file").send_keys(str(clip))
    browser.find_element("css selector", "#create button[type=submit]").click()
    until(browser, lambda d: stream_rows(d).get("console-upload", ["", "", ""])[2] == "12", "its frames, uploaded")
    assert stream_rows(browser)["console-upload"][4] == "finished"
    assert browser.find_element("id", "detail-title").text == "console-upload"  # opened
    with client(server, TOKEN_A) as http:
        status = http.get("/v1/streams/console-upload").json()
        assert status["frames_ingested"] == 12 and status["mode"] == "push"
        assert http.get("/v1/streams/console-bad").status_code == 404
        http.delete("/v1/streams/console-upload")
