"""A person in a real browser: Playwright drives Debian's chromium against a live server."""

import os
import shutil

from labeling_util import CHROMIUM, TASK, LiveServer, comparison, require

from rlhf_jax.labeling.store import LabelStore

try:
    from playwright import sync_api
except ImportError:  # the test extra installs it; CI fails instead of skipping (require)
    sync_api = None

SCREENS = "/tmp/labeling_screens"
SCRIPT = "<script>window.__pwned = 1; alert('pwned')</script>"


def test_a_labeler_labels_with_mouse_and_keyboard_and_the_admin_sees_it(tmp_path):
    require(os.path.exists(CHROMIUM), f"chromium ({CHROMIUM}; apt-get install chromium)")
    require(sync_api is not None, "playwright (pip install playwright)")
    url = f"sqlite:///{tmp_path / 'labels.sqlite'}"
    store = LabelStore(url)
    store.enqueue([comparison(0, query="She opened the door. The garden was full of light.",
                              samples=["The flowers were beautiful and she smiled.",
                                       f"A sample with markup {SCRIPT} in it.",
                                       "It started to rain again.",
                                       "He said nothing at all."])]
                  + [comparison(i) for i in range(1, 5)], TASK)
    alice, admin = store.add_labeler("alice"), store.add_labeler("admin", admin=True)
    dialogs = []
    with LiveServer(url, tmp_path / "server.log", gold_every=0) as server, \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-dev-shm-usage", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 860})
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(server.url + "/label")
        page.fill("#token", alice)
        page.click("button.primary")
        page.wait_for_selector("#label-form")
        # The sample with <script> shows as text, and the script never ran.
        assert SCRIPT in page.inner_text("button.sample[data-key='2']")
        assert page.evaluate("window.__pwned") is None
        shot = tmp_path / "label_page.png"
        page.screenshot(path=str(shot), full_page=True)
        os.makedirs(SCREENS, exist_ok=True)
        shutil.copy(shot, os.path.join(SCREENS, "label_page.png"))

        def current():
            return page.get_attribute("input[name=comparison_id]", "value")

        first = current()
        page.click("button.sample[data-key='1']")  # mouse
        page.wait_for_selector("text=Saved. Here is the next one.")
        second = current()
        assert second != first and page.inner_text("#my-count") == "1"
        page.keyboard.press("3")  # keyboard
        page.wait_for_function(f"document.querySelector('input[name=comparison_id]').value != '{second}'")
        third = current()
        page.keyboard.press("s")  # skip
        page.wait_for_selector("text=Skipped.")
        fourth = current()
        assert fourth != third
        page.keyboard.press("f")  # flag, then pick with the keyboard
        assert page.is_checked("#flag")
        page.keyboard.press("4")
        page.wait_for_function(f"document.querySelector('input[name=comparison_id]').value != '{fourth}'")
        assert page.inner_text("#my-count") == "3"

        page.goto(server.url + "/logout")
        page.goto(server.url + "/login?next=/admin")
        page.fill("#token", admin)
        page.click("button.primary")
        page.wait_for_selector("#labels-total")
        assert page.inner_text("#labels-total") == "3"
        rows = page.inner_text("#labelers")
        assert "alice\t3" in rows
        page.screenshot(path=str(tmp_path / "admin_page.png"), full_page=True)
        shutil.copy(tmp_path / "admin_page.png", os.path.join(SCREENS, "admin_page.png"))
        browser.close()
    assert dialogs == []
    labels = store.labels_after(0, 10)
    assert [(r["comparison_id"], r["best"]) for r in labels] == [
        (int(first), 0), (int(second), 2), (int(fourth), 3)]
    assert store.counts()["flags"] == 1
    store.close()
