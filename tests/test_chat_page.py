"""The chat page `ossrt serve` serves at /, in a real headless Chromium (the distribution's chromium and
chromedriver, driven by Selenium) against live servers on scripted tiny models: streaming, reasoning, Stop,
conversations in localStorage, Markdown and HTML in model output, the API key, phone width, dark mode, screenshots.
"""

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="the chat page tests drive Chromium with selenium")
Image = pytest.importorskip("PIL.Image", reason="the screenshot tests read PNGs with Pillow")

from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

import ossrt  # noqa: E402
from server_support import live_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

KEY = "page-sekrit"
# The reasoning is a header without <|message|> (a scripted token has one successor, and <|message|> starts the
# answer); the answer is Markdown with a code block, whose fence the end of the text closes (a second ``` would
# need a second successor too).
ANSWER_TEXT = "Hello **there**, friend!\n\n```python\nprint(42)"
ANSWER = f"<|channel|>analysis Thinking it over.<|end|><|start|>final<|message|>{ANSWER_TEXT}<|return|>"
ENDLESS_ANSWER = "<|channel|>final<|message|>one two three four five "
ENDLESS_REASONING = "<|channel|>analysis<|message|>pondering the question deeply "
INJECTION_TEXT = "Look: <img src=x onerror=alert(1)>; also<script>document.title='pwned';</script>."
INJECTION = f"<|channel|>final<|message|>{INJECTION_TEXT}<|return|>"
WAIT = 30  # seconds: a bound for a failing test on a loaded machine, not a measurement
SCREENSHOTS = Path(tempfile.gettempdir()) / "ossrt-screenshots"


def serving(path, **options):
    return live_server(ossrt.load(path, context_length=4096), model_id="gpt-oss-test", **options)


@pytest.fixture(scope="module")
def answer(scripted_gguf):
    with serving(scripted_gguf(ANSWER)) as live:
        yield live


@pytest.fixture(scope="module")
def keyed(scripted_gguf):
    with serving(scripted_gguf(ANSWER), api_key=KEY) as live:
        yield live


@pytest.fixture(scope="module")
def injection(scripted_gguf):
    with serving(scripted_gguf(INJECTION)) as live:
        yield live


@pytest.fixture(scope="module")
def endless(scripted_gguf):
    """text -> a live server on a model that writes `text` forever (answer or reasoning)."""
    with serving(scripted_gguf(ENDLESS_ANSWER, loop=True), parallel=1) as answer_live, \
            serving(scripted_gguf(ENDLESS_REASONING, loop=True), parallel=1) as reasoning_live:
        yield {"answer": answer_live, "reasoning": reasoning_live}


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads):
    """One headless Chromium for the module; each test opens its own server's page (its own origin, so its own
    localStorage)."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs the system's chromium and chromedriver (apt-get install chromium chromium-driver); "
                    "no browser is downloaded")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for page errors
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser):
    """The browser, reset to a desktop-sized light page after the test."""
    yield browser
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


def wait(driver, condition, timeout=WAIT):
    return WebDriverWait(driver, timeout).until(lambda d: condition())


def open_page(driver, live, ready=True):
    driver.get(live.url + "/")
    if ready:
        wait(driver, lambda: driver.execute_script("return document.body.dataset.ready === 'true'"))


def send(driver, text):
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def answers(driver):
    return driver.find_elements(By.CSS_SELECTOR, "article.message.assistant")


def finished_answer(driver):
    """The last answer, once its stats line is shown."""
    wait(driver, lambda: answers(driver) and answers(driver)[-1].find_element(By.CLASS_NAME, "stats").text)
    return answers(driver)[-1]


def chat_titles(driver):
    return [b.text for b in driver.find_elements(By.CSS_SELECTOR, "#chats button")]


def stored(driver):
    return json.loads(driver.execute_script("return localStorage.getItem('ossrt-chat.conversations') || '[]'"))


def test_page_and_assets_are_served_with_a_strict_policy(answer):
    r = httpx.get(answer.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    policy = r.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "default-src 'none'" in policy and "unsafe" not in policy
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "http://" not in r.text and "https://" not in r.text  # nothing from another origin
    for path, kind in [("chat.js", "text/javascript"), ("chat.css", "text/css"), ("vendor/marked.esm.js",
                       "text/javascript"), ("vendor/purify.min.js", "text/javascript"), ("icon.svg", "image/svg")]:
        r = httpx.get(f"{answer.url}/static/{path}", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
        assert r.headers["content-security-policy"] == policy
    for path in ("vendor/README.md", "../page.py", "%2e%2e/page.py", "nothing.js"):
        r = httpx.get(f"{answer.url}/static/{path}", timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path


def console_errors(driver):
    """The console's errors since the last call (a script error, a blocked resource, a failed request)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_answer_with_reasoning_markdown_and_stats(page, answer):
    console_errors(page)
    open_page(page, answer)
    assert page.find_element(By.ID, "model").text == "gpt-oss-test"
    before = dict(answer.server.counts)
    send(page, "Say hello")
    reply = finished_answer(page)
    assert page.find_element(By.CSS_SELECTOR, "article.message.user").text == "Say hello"
    reasoning = reply.find_element(By.CLASS_NAME, "reasoning")
    assert reasoning.is_displayed() and reasoning.get_attribute("open") is None  # collapsed once the answer is done
    reasoning.find_element(By.TAG_NAME, "summary").click()
    assert reasoning.find_element(By.CLASS_NAME, "reasoning-text").text == "Thinking it over."
    content = reply.find_element(By.CLASS_NAME, "content")
    assert content.find_element(By.TAG_NAME, "strong").text == "there"
    assert content.find_element(By.CSS_SELECTOR, "pre > code").text == "print(42)"
    assert "Thinking" not in content.text
    tokens = answer.server.counts["completion_tokens"] - before["completion_tokens"]
    stats = reply.find_element(By.CLASS_NAME, "stats").text
    assert stats.endswith(f" · {tokens} tokens · stop") and " tokens/s · " in stats, stats
    assert float(stats.split(" tokens/s")[0]) > 0
    assert page.find_element(By.ID, "send").is_displayed() and not page.find_element(By.ID, "stop").is_displayed()
    assert console_errors(page) == []


def test_settings_go_with_the_request_and_stay_with_the_chat(page, answer):
    open_page(page, answer)
    page.find_element(By.ID, "new-chat").click()
    prompt_tokens = answer.server.counts["prompt_tokens"]
    send(page, "Plain")
    finished_answer(page)
    plain = answer.server.counts["prompt_tokens"] - prompt_tokens

    page.find_element(By.ID, "new-chat").click()
    page.find_element(By.CSS_SELECTOR, "#settings summary").click()
    system = "You answer every question in the voice of a lighthouse keeper."
    page.find_element(By.ID, "system").send_keys(system)
    effort = page.find_element(By.ID, "effort")
    effort.find_element(By.CSS_SELECTOR, "option[value=high]").click()
    prompt_tokens = answer.server.counts["prompt_tokens"]
    send(page, "Plain")
    finished_answer(page)
    assert answer.server.counts["prompt_tokens"] - prompt_tokens > plain + 10  # the system prompt went along

    temperature = page.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0.4", Keys.TAB)
    # A message longer than the context (4096 tokens): the server's error is shown, and the chat goes on.
    page.execute_script("document.getElementById('input').value = arguments[0]", "word " * 5000)
    page.find_element(By.ID, "input").send_keys(Keys.ENTER)
    wait(page, lambda: len(answers(page)) == 2)
    stats = finished_answer(page).find_element(By.CLASS_NAME, "stats")
    assert stats.text.startswith("error: ") and "context" in stats.text, stats.text
    assert "error" in stats.get_attribute("class")
    error = stats.text

    page.refresh()
    wait(page, lambda: page.find_element(By.ID, "system").get_attribute("value") == system)
    assert page.find_element(By.ID, "effort").get_attribute("value") == "high"
    assert page.find_element(By.ID, "temperature").get_attribute("value") == "0.4"
    assert stored(page)[0]["settings"] == {"effort": "high", "temperature": 0.4, "system": system}
    assert answers(page)[-1].find_element(By.CLASS_NAME, "stats").text == error
    send(page, "Still here?")
    wait(page, lambda: len(answers(page)) == 3)
    assert "Hello there, friend!" in finished_answer(page).text  # the question that failed is not sent again


@pytest.mark.parametrize("part", ["answer", "reasoning"])
def test_stop_ends_generation_on_the_server(page, endless, part):
    live = endless[part]
    open_page(page, live)
    disconnected = live.server.counts["disconnected"]
    send(page, "Go on forever")
    shown = f"article.message.assistant .{'content' if part == 'answer' else 'reasoning-text'}"
    first = wait(page, lambda: len(page.find_element(By.CSS_SELECTOR, shown).text) > 20 and
                 page.find_element(By.CSS_SELECTOR, shown).text)
    wait(page, lambda: len(page.find_element(By.CSS_SELECTOR, shown).text) > len(first) + 20)  # it streams
    if part == "reasoning":
        assert page.find_element(By.CLASS_NAME, "reasoning").get_attribute("open") is not None  # open while it grows
        assert page.find_element(By.CSS_SELECTOR, "article.message.assistant .content").text == ""
    assert live.server.running
    page.find_element(By.ID, "stop").click()
    assert live.server.wait_until(lambda: not live.server.running and
                                  live.server.counts["disconnected"] == disconnected + 1, WAIT)
    reply = finished_answer(page)
    assert reply.find_element(By.CLASS_NAME, "stats").text.endswith(" · stopped")
    text = page.find_element(By.CSS_SELECTOR, shown).get_attribute("textContent")  # shown or folded away
    assert text.startswith(first)
    time.sleep(0.5)
    assert page.find_element(By.CSS_SELECTOR, shown).get_attribute("textContent") == text  # nothing more arrives
    assert page.find_element(By.ID, "send").is_displayed()


def test_conversations_are_kept_renamed_exported_and_deleted(page, answer, downloads):
    open_page(page, answer)
    page.execute_script("localStorage.clear()")
    open_page(page, answer)
    assert chat_titles(page) == []
    prompt_tokens = answer.server.counts["prompt_tokens"]
    send(page, "First question")
    finished_answer(page)
    first_prompt = answer.server.counts["prompt_tokens"] - prompt_tokens
    send(page, "And a second one")
    wait(page, lambda: len(answers(page)) == 2)
    finished_answer(page)
    assert chat_titles(page) == ["First question"]

    page.refresh()
    wait(page, lambda: chat_titles(page) == ["First question"])
    assert [m.text for m in page.find_elements(By.CSS_SELECTOR, "article.message.user")] == ["First question",
                                                                                            "And a second one"]
    assert "Hello there, friend!" in answers(page)[1].text

    page.find_element(By.ID, "rename").click()
    dialog = page.switch_to.alert
    dialog.send_keys("Greetings")
    dialog.accept()
    wait(page, lambda: chat_titles(page) == ["Greetings"])
    assert page.find_element(By.ID, "title").text == "Greetings"

    page.find_element(By.ID, "export").click()
    exported = downloads / "Greetings.json"
    wait(page, exported.exists)
    chat = json.loads(exported.read_text())
    assert chat["title"] == "Greetings"
    assert [(m["role"], m["content"]) for m in chat["messages"]] == [
        ("user", "First question"), ("assistant", ANSWER_TEXT), ("user", "And a second one"), ("assistant", ANSWER_TEXT)]
    assert chat["messages"][1]["reasoning"] == "Thinking it over." and chat["messages"][1]["stats"]["stopReason"] == "stop"

    # A new chat sends only its own messages: the same first question costs the same prompt as before.
    page.find_element(By.ID, "new-chat").click()
    assert page.find_elements(By.CSS_SELECTOR, "article.message") == []
    prompt_tokens = answer.server.counts["prompt_tokens"]
    send(page, "First question")
    finished_answer(page)
    assert answer.server.counts["prompt_tokens"] - prompt_tokens == first_prompt
    assert chat_titles(page) == ["First question", "Greetings"]

    page.find_element(By.ID, "delete").click()
    page.switch_to.alert.accept()
    wait(page, lambda: chat_titles(page) == ["Greetings"])
    assert page.find_element(By.ID, "title").text == "Greetings"
    page.refresh()
    wait(page, lambda: chat_titles(page) == ["Greetings"])
    assert [c["title"] for c in stored(page)] == ["Greetings"]


def test_html_in_model_output_is_shown_as_text(page, injection):
    open_page(page, injection)
    send(page, "Show me some HTML")
    content = finished_answer(page).find_element(By.CLASS_NAME, "content")
    assert content.text == INJECTION_TEXT
    assert content.find_elements(By.CSS_SELECTOR, "img, script") == []
    assert page.find_elements(By.CSS_SELECTOR, "#messages img, #messages script") == []
    assert page.title == "ossrt chat"
    with pytest.raises(NoAlertPresentException):
        page.switch_to.alert.text
    page.refresh()  # the same text rendered again from localStorage
    content = finished_answer(page).find_element(By.CLASS_NAME, "content")
    assert "<img src=x onerror=alert(1)>" in content.text and content.find_elements(By.CSS_SELECTOR, "img") == []


def enter_key(driver, key, remember=False):
    dialog = driver.find_element(By.ID, "key-dialog")
    wait(driver, dialog.is_displayed)
    field = driver.find_element(By.ID, "key-input")
    field.send_keys(key)
    if remember:
        driver.find_element(By.ID, "key-remember").click()
    field.send_keys(Keys.ENTER)


def test_the_page_asks_for_the_api_key(page, keyed):
    open_page(page, keyed, ready=False)
    page.execute_script("localStorage.clear()")
    open_page(page, keyed, ready=False)
    dialog = page.find_element(By.ID, "key-dialog")
    wait(page, dialog.is_displayed)
    assert page.find_element(By.ID, "key-reason").text == "This server needs an API key."
    page.find_element(By.ID, "key-input").send_keys(Keys.ESCAPE)  # dismissed: the page says why it cannot chat
    wait(page, lambda: page.find_element(By.ID, "model").text == "not connected: this server needs an API key")
    send(page, "Hello with a key")  # sending asks again
    enter_key(page, "wrong")
    wait(page, lambda: page.find_element(By.ID, "key-reason").text == "The key was refused: incorrect API key")
    enter_key(page, KEY)
    wait(page, lambda: page.find_element(By.ID, "model").text == "gpt-oss-test")
    assert page.find_element(By.ID, "input").get_attribute("value") == "Hello with a key"  # kept, not sent
    assert answers(page) == []
    page.find_element(By.ID, "input").send_keys(Keys.ENTER)
    assert "Hello there, friend!" in finished_answer(page).text
    assert KEY not in json.dumps(page.execute_script("return [{...localStorage}, {...sessionStorage}]"))

    page.refresh()  # not remembered: asked again
    enter_key(page, KEY, remember=True)
    wait(page, lambda: page.find_element(By.ID, "model").text == "gpt-oss-test")
    assert page.execute_script("return localStorage.getItem('ossrt-chat.api-key')") == KEY
    page.refresh()
    wait(page, lambda: page.find_element(By.ID, "model").text == "gpt-oss-test")
    assert not page.find_element(By.ID, "key-dialog").is_displayed()
    page.execute_script("localStorage.clear()")


def background_luminance(driver) -> float:
    r, g, b = driver.execute_script(
        "return getComputedStyle(document.body).backgroundColor.match(/\\d+/g).slice(0, 3).map(Number)")
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


def in_view(driver, element_id) -> bool:
    return driver.execute_script(
        "const r = document.getElementById(arguments[0]).getBoundingClientRect();"
        "return r.width > 0 && r.left >= 0 && r.right <= innerWidth && r.top >= 0 && r.bottom <= innerHeight",
        element_id)


def test_phone_width_and_dark_mode(page, answer):
    page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                         {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    open_page(page, answer)
    send(page, "A long " + "word" * 40 + " on a small screen")
    finished_answer(page)
    assert page.execute_script("return innerWidth") == 390
    assert page.execute_script("return document.documentElement.scrollWidth <= innerWidth")
    for control in ("input", "send", "toggle-chats", "rename", "export", "delete", "settings"):
        assert in_view(page, control), control
    assert not page.find_element(By.ID, "sidebar").is_displayed()
    page.find_element(By.ID, "toggle-chats").click()
    assert in_view(page, "new-chat") and page.find_element(By.CSS_SELECTOR, "#chats button").is_displayed()
    page.find_element(By.CSS_SELECTOR, "#chats button").click()
    assert not page.find_element(By.ID, "sidebar").is_displayed()

    assert background_luminance(page) > 0.9
    page.execute_cdp_cmd("Emulation.setEmulatedMedia",
                         {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    assert background_luminance(page) < 0.15
    text = page.execute_script("return getComputedStyle(document.body).color.match(/\\d+/g).map(Number)")
    assert sum(text[:3]) / 3 > 180  # light text on it


def screenshot(driver, name: str, capsys) -> Path:
    """A PNG of the page, saved under SCREENSHOTS (its path printed), that must not be blank: many colours and
    enough contrast."""
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    with capsys.disabled():
        print(f"\nscreenshot: {path}")
    with Image.open(path) as image:
        colours = len(image.convert("RGB").getcolors(maxcolors=1 << 24))
        gray = np.asarray(image.convert("L"), dtype=np.float64)
    contrast, variance = gray.max() - gray.min(), gray.var()
    assert colours > 50 and contrast > 100 and variance > 50, (path, colours, contrast, variance)
    return path


@pytest.mark.parametrize("look", ["desktop-light", "phone-dark"])
def test_screenshots_show_the_conversation(page, answer, look, capsys):
    if look == "phone-dark":
        page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                             {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
        page.execute_cdp_cmd("Emulation.setEmulatedMedia",
                             {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    open_page(page, answer)
    if look == "phone-dark":
        page.find_element(By.ID, "toggle-chats").click()
    page.find_element(By.ID, "new-chat").click()
    send(page, "Show me Markdown")
    reply = finished_answer(page)
    reply.find_element(By.TAG_NAME, "summary").click()
    visible = page.find_element(By.TAG_NAME, "body").text
    assert "Show me Markdown" in visible and "Hello there, friend!" in visible and "print(42)" in visible
    screenshot(page, f"chat-{look}", capsys)


def test_a_blank_page_fails_the_screenshot_check(page, answer, capsys):
    open_page(page, answer)
    page.execute_script("document.body.replaceChildren()")
    with pytest.raises(AssertionError):
        screenshot(page, "blank", capsys)
