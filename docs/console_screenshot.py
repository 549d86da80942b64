"""Makes docs/console.png: the web console over the shipped demo model, a synthetic camera being
pushed live, and a deep-linked question with its evidence.

    .venv/bin/python docs/console_screenshot.py [--out docs/console.png]

Starts a private Ray and Serve app (models/demo, a bearer token), pushes a generated stream as
MPEG-TS chunks in the background, opens /console?stream=lobby&ask=... in headless chromium
(apt-get install chromium chromium-driver) and saves the screenshot once the answer is in.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "console-demo-token"
FRAMES, FPS, CHUNKS = 480, 4.0, 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def encoded_stream(seed: int) -> tuple[bytes, str]:
    """A generated stream as one MPEG-TS, and a question about its first part."""
    from pipeline.video_io import write_video
    from synthetic.world import WorldConfig, generate_stream, questions

    stream = generate_stream(FRAMES, seed, WorldConfig())
    buf = io.BytesIO()
    write_video(buf, stream.frames, FPS, container_format="mpegts", gop_size=8)
    asked = [q for q in questions(stream, 16, seed, kinds=("attribute",)) if q.ask_at < FRAMES // 3]
    return buf.getvalue(), asked[0].text


def push_live(http: httpx.Client, stream_id: str, data: bytes, pause_s: float) -> None:
    size = -(-len(data) // CHUNKS)
    for seq in range(CHUNKS):
        http.post(f"/v1/streams/{stream_id}/chunks", params={"seq": seq}, content=data[seq * size:(seq + 1) * size],
                  headers={"Content-Type": "video/mp2t"})
        time.sleep(pause_s)
    http.post(f"/v1/streams/{stream_id}/close")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "console.png")
    args = parser.parse_args(argv)

    import ray
    from ray import serve
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    from deploy.app import build_app
    from pipeline.model import load_model
    from synthetic.demo import context_options

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model_dir": str(ROOT / "models" / "demo"), "api_token": TOKEN, "actor_cpus": 0.2,
                         "coordinator_name": "console-screenshot"}), name="console-screenshot", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    tokens = load_model(ROOT / "models" / "demo").dims.tokens_per_frame
    options = context_options("streamkv", 8, tokens)
    http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
    while httpx.get(f"{base}/healthz", timeout=60).status_code != 200:
        time.sleep(1)

    for name, seed in (("dock", 90007), ("parking", 90011)):  # finished uploads
        http.post("/v1/streams", json={"stream_id": name, "method": "rekv", "options": context_options("rekv", 8, tokens)})
        http.post(f"/v1/streams/{name}/chunks", content=encoded_stream(seed)[0][: 200_000],
                  headers={"Content-Type": "video/mp2t"})
        http.post(f"/v1/streams/{name}/close")
    data, question = encoded_stream(90001)
    http.post("/v1/streams", json={"stream_id": "lobby", "method": "streamkv", "options": options})
    feeder = threading.Thread(target=push_live, args=(http, "lobby", data, 1.0), daemon=True)
    feeder.start()
    while http.get("/v1/streams/lobby").json()["frames_ingested"] < FRAMES // 3:
        time.sleep(1)

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1440,1010",
                 "--force-device-scale-factor=1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"{base}/console")  # once it asks for the token
        WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.getElementById('token-dialog').open"))
        driver.execute_script("localStorage.setItem('streamkv.token', arguments[0])", TOKEN)
        driver.get(f"{base}/console?" + str(httpx.QueryParams({"stream": "lobby", "ask": question})))
        try:
            WebDriverWait(driver, 300).until(lambda d: d.find_elements("css selector", "#answer[data-state=done]"))
        finally:
            print(driver.find_element("id", "answer").get_property("textContent"), driver.current_url)
        time.sleep(8)  # a few polls for the charts and the timeline
        args.out.write_bytes(driver.get_screenshot_as_png())
        print(f"{args.out}: {question!r} -> {driver.find_element('id', 'answer').text!r}")
    finally:
        driver.quit()
        from deploy.ingest import stop_coordinator

        serve.delete("console-screenshot")
        stop_coordinator("console-screenshot")
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
