"""The chat page in headless Chromium (Debian's chromium + chromium-driver, via Selenium):
type a message, watch the reply stream in, switch language, start a new chat, and check that
model text cannot inject HTML. Saves a screenshot in the test's tmp folder; the README's is
made with a trained model:

    CHITCHAT_SCREENSHOT=1 CHITCHAT_SCREENSHOT_MODEL=model/demo \
        python -m pytest tests/test_serve_browser.py       # writes docs/img/web_chat.png
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver; "
                ".ci/run does this in CI)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from chitchat.serving.app import create_app  # noqa: E402
from chitchat.serving.options import ServerOptions  # noqa: E402
from serve_support import LiveServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a live server and headless Chromium


@pytest.fixture(scope="module")
def page_url(tiny_model_dir):
    from chitchat.chat import Chatbot

    model = os.environ.get("CHITCHAT_SCREENSHOT_MODEL") or tiny_model_dir
    bot = Chatbot.from_pretrained(model, device="cpu", max_len=20, min_len=2, seed=1)
    with LiveServer(create_app(bot, ServerOptions())) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--window-size=900,640", "--lang=zh-CN",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(arg)
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, timeout: float = 30):
    return WebDriverWait(driver, timeout)


def send(driver, text: str):
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def replies(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def test_chat_page_streams_a_reply(browser, page_url, tmp_path):
    browser.get(page_url)
    wait(browser).until(EC.text_to_be_present_in_element((By.ID, "model"), "chitchat"))
    if browser.find_element(By.ID, "lang").text != "English":  # start from the Chinese UI
        browser.find_element(By.ID, "lang").click()
    assert browser.find_element(By.ID, "send").text == "发送"
    assert not browser.find_element(By.ID, "key-form").is_displayed()  # no --api_key here
    assert not browser.find_element(By.ID, "stop").is_displayed()
    send(browser, "你好")
    wait(browser).until(lambda d: len(replies(d)) == 1
                        and replies(d)[0].get_attribute("data-state") == "done")
    reply = replies(browser)[0].text
    assert reply.strip() and browser.find_element(By.ID, "status").text == ""
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "你好"

    send(browser, "今天天气怎么样")  # the second request carries the whole history
    wait(browser).until(lambda d: len(replies(d)) == 2
                        and replies(d)[1].get_attribute("data-state") == "done")
    history = browser.execute_script("return state.history")
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[1]["content"] == reply

    shot = ROOT / "docs" / "img" / "web_chat.png" if os.environ.get("CHITCHAT_SCREENSHOT") \
        else tmp_path / "web_chat.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000

    browser.find_element(By.ID, "lang").click()
    assert browser.find_element(By.ID, "send").text == "Send"
    assert browser.find_element(By.ID, "new-chat").text == "New chat"
    browser.find_element(By.ID, "new-chat").click()
    assert replies(browser) == [] and browser.execute_script("return state.history") == []
    assert browser.find_element(By.ID, "empty").is_displayed()


def test_model_text_cannot_inject_html(browser, page_url):
    """The page's fetch is replaced by one streaming hostile 'model output' over SSE."""
    browser.get(page_url)
    wait(browser).until(EC.presence_of_element_located((By.ID, "input")))
    evil = ['<img src=x onerror="window.pwned=1">', "<script>window.pwned=2</script>",
            "</div><b>bold</b>", "&lt;ok&gt;"]
    sse = "".join("data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": p},
                                                       "finish_reason": None}]}) + "\n\n"
                  for p in evil) + "data: [DONE]\n\n"
    browser.execute_script("""
        const body = arguments[0];
        window.fetch = async () => new Response(new ReadableStream({
            start(c) {  // in two uneven pieces, as a network would deliver it
                const bytes = new TextEncoder().encode(body);
                c.enqueue(bytes.slice(0, 37)); c.enqueue(bytes.slice(37)); c.close();
            }}), {status: 200, headers: {"Content-Type": "text/event-stream"}});
    """, sse)
    send(browser, "<i>hi</i>")
    wait(browser).until(lambda d: replies(d) and replies(d)[-1].get_attribute("data-state")
                        == "done")
    bubble = replies(browser)[-1]
    assert bubble.text == "".join(evil)
    assert bubble.find_elements(By.XPATH, "./*") == []  # text only, no elements
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "<i>hi</i>"
    assert browser.execute_script("return window.pwned === undefined")


def test_page_asks_for_the_api_key(browser, tiny_model_dir):
    from chitchat.chat import Chatbot

    bot = Chatbot.from_pretrained(tiny_model_dir, device="cpu", max_len=5)
    with LiveServer(create_app(bot, ServerOptions(api_key="k3y"))) as url:
        browser.get(url)
        browser.execute_script("sessionStorage.clear()")
        browser.get(url)
        wait(browser).until(EC.presence_of_element_located((By.ID, "input")))
        send(browser, "你好")
        wait(browser).until(EC.visibility_of_element_located((By.ID, "key-form")))
        assert replies(browser) == [] and browser.find_element(By.ID, "status").text
        assert browser.find_element(By.ID, "input").get_attribute("value") == "你好"
        browser.find_element(By.ID, "key").send_keys("k3y")
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        browser.find_element(By.ID, "send").click()
        wait(browser).until(lambda d: replies(d) and replies(d)[-1].get_attribute("data-state")
                            == "done")
        assert browser.find_element(By.ID, "status").text == ""
        assert [m["role"] for m in browser.execute_script("return state.history")] == \
            ["user", "assistant"]
