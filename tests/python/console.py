"""Drives the admin console in Debian's headless Chromium (through ChromeDriver and
Selenium) against a running gateway: sign in, create a key and use it with curl, see its
spend, block it and see the proxy refuse it, create a team, look at upstreams and live
figures, then sign in as the viewer and find no write control (and a write refused).
A screenshot of each page goes to SHOTS. Prints one JSON line of what it saw; exits
non-zero on the first failed step."""

import json
import os
import subprocess
import sys
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

ADMIN = os.environ["ADMIN"]  # the admin listener's base URL
PROXY = os.environ["PROXY"]
MASTER = os.environ["MASTER"]
VIEWER = os.environ["VIEWER"]
SHOTS = os.environ["SHOTS"]
os.makedirs(SHOTS, exist_ok=True)

opts = webdriver.ChromeOptions()
opts.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
for arg in [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=1280,800",
    "--user-data-dir=" + tempfile.mkdtemp(prefix="tollgate-chromium-"),
]:
    opts.add_argument(arg)
driver = webdriver.Chrome(
    service=Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")), options=opts
)
# Tables are rebuilt after each action: an element found just before is then stale.
wait = WebDriverWait(driver, 15, ignored_exceptions=(StaleElementReferenceException,))
seen = {}


def by_id(i):
    return driver.find_element(By.ID, i)


def shot(name):
    driver.save_screenshot(os.path.join(SHOTS, name + ".png"))


def sign_in(key):
    driver.get(ADMIN + "/ui/")
    wait.until(EC.visibility_of_element_located((By.ID, "signin-key"))).send_keys(key)
    by_id("signin-form").submit()
    wait.until(EC.visibility_of_element_located((By.ID, "nav")))


def page(name):
    driver.find_element(By.CSS_SELECTOR, 'nav button[data-page="%s"]' % name).click()
    wait.until(EC.visibility_of_element_located((By.ID, "page-" + name)))


def curl_chat(secret):
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]})
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", PROXY + "/v1/chat/completions",
         "-H", "Authorization: Bearer " + secret, "-H", "content-type: application/json", "-d", body],
        capture_output=True, text=True, timeout=30, check=True,
    )
    return int(out.stdout)


def row(table, attr, value):
    return driver.find_elements(By.CSS_SELECTOR, '#%s tr[%s="%s"]' % (table, attr, value))


try:
    # A wrong key is refused on the sign-in form.
    driver.get(ADMIN + "/ui/")
    wait.until(EC.visibility_of_element_located((By.ID, "signin-key"))).send_keys("not-the-key")
    by_id("signin-form").submit()
    wait.until(lambda d: "not the master key" in by_id("status").text)
    assert not by_id("nav").is_displayed()
    shot("signin")

    sign_in(MASTER)
    assert "admin" in by_id("role").text
    wait.until(lambda d: row("keys-table", "data-key", "ops-config"))

    # Create a key with a budget; its secret is shown once.
    by_id("key-name").send_keys("console-alice")
    by_id("key-budget").send_keys("5")
    by_id("key-form").submit()
    wait.until(EC.visibility_of_element_located((By.ID, "secret-panel")))
    secret = by_id("secret-value").get_attribute("value")
    assert secret.startswith("tg-"), secret
    seen["secret_prefix"] = secret[:8]
    by_id("secret-copy").click()
    shot("keys-created")
    by_id("secret-done").click()
    assert by_id("secret-value").get_attribute("value") == ""
    wait.until(lambda d: row("keys-table", "data-key", "console-alice"))

    # Use it through the proxy.
    seen["statuses"] = [curl_chat(secret) for _ in range(3)]

    # Its spend appears (usage rows are written every flush_interval).
    page("spend")
    deadline = time.time() + 15
    while time.time() < deadline:
        driver.find_element(By.CSS_SELECTOR, "#spend-form button[type=submit]").click()
        time.sleep(0.5)
        cells = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#spend-table tbody tr")]
        hit = [c for c in cells if c.startswith("console-alice")]
        if hit:
            seen["spend_row"] = hit[0]
            break
    assert "spend_row" in seen, "no spend row for console-alice"
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#spend-chart rect.bar"))
    shot("spend")

    # Block it: the proxy refuses it.
    page("keys")
    wait.until(lambda d: row("keys-table", "data-key", "console-alice"))
    alice = row("keys-table", "data-key", "console-alice")[0]
    [b for b in alice.find_elements(By.TAG_NAME, "button") if b.text == "Block"][0].click()
    wait.until(lambda d: "blocked" in row("keys-table", "data-key", "console-alice")[0].text)
    seen["after_block"] = curl_chat(secret)
    by_id("key-search").send_keys("alice")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#keys-table tbody tr")) == 1
    shot("keys")

    # A team.
    page("teams")
    by_id("team-name").send_keys("platform")
    by_id("team-budget").send_keys("100")
    by_id("team-form").submit()
    wait.until(lambda d: row("teams-table", "data-team", "platform"))
    shot("teams")

    # Upstreams and live figures.
    page("upstreams")
    cooling = os.environ["COOLING"]
    state_of = lambda: row("upstreams-table", "data-server", cooling)[0].find_elements(By.TAG_NAME, "td")[2].text
    wait.until(lambda d: row("upstreams-table", "data-server", cooling))
    seen["cooling_before"] = state_of()
    seen["upstream_row"] = " | ".join(r.text for r in driver.find_elements(By.CSS_SELECTOR, "#upstreams-table tbody tr"))
    shot("upstreams")
    [b for b in row("upstreams-table", "data-server", cooling)[0].find_elements(By.TAG_NAME, "button") if b.text == "Clear cooldown"][0].click()
    wait.until(lambda d: state_of() == "up")
    seen["cooling_after"] = state_of()
    page("live")
    wait.until(lambda d: by_id("live-rps").text != "-")
    seen["live_total"] = by_id("live-total").text
    shot("live")

    # The key never went into the address bar, a cookie or local storage.
    assert secret not in driver.current_url and MASTER not in driver.current_url
    assert not driver.get_cookies()
    assert driver.execute_script("return window.localStorage.length") == 0

    # The viewer: reads everything, finds no write control, and a write is refused.
    by_id("signout").click()
    wait.until(EC.visibility_of_element_located((By.ID, "signin-key")))
    sign_in(VIEWER)
    assert "viewer" in by_id("role").text
    page("keys")
    wait.until(lambda d: row("keys-table", "data-key", "console-alice"))
    visible_writes = [e for e in driver.find_elements(By.CSS_SELECTOR, ".write") if e.is_displayed()]
    assert not visible_writes, [e.text for e in visible_writes]
    assert not [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text in ("Block", "Delete", "Rotate", "Edit", "Create key")]
    shot("keys-viewer")
    page("upstreams")
    page("teams")
    assert not by_id("team-form").is_displayed()
    seen["viewer_write_status"] = driver.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch('/admin/keys', {method: 'POST', headers: {'authorization': 'Bearer ' + sessionStorage.getItem('tollgate.key'),
          'content-type': 'application/json'}, body: JSON.stringify({name: 'sneaky'})}).then(r => done(r.status));"""
    )
    print(json.dumps(seen))
except Exception as e:  # one line the test shows, with a screenshot of where it stopped
    shot("failure")
    print(json.dumps({"error": repr(e), "seen": seen, "url": driver.current_url}))
    sys.exit(1)
finally:
    driver.quit()
