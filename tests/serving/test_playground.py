"""The playground page at / in a real headless Chromium (Debian's chromium and chromium-driver,
driven by Selenium through serving.browser), against the package's endpoint
(tests/serving/conftest.py): four real models, toy2d (two budgets), text, binary digits and molecules. What
the page shows is checked against the API's own answers."""

import re

import pytest

from serving.browser import Playground, find_browser
from tests.serving.conftest import DIGITS, MOLECULES, TEXT, TOY, wait_for


@pytest.fixture(scope="module")
def page(server):
    """(page, client): a headless Chromium on the endpoint's page."""
    found = find_browser()
    if isinstance(found, str):
        pytest.skip(found)
    client = server[0]
    wait_for(lambda: client.get("/readyz").status_code == 200, 120, "/readyz")
    with Playground(client.url) as playground:
        yield playground, client


def served(client) -> dict[str, dict]:
    return {m["name"]: m for m in client.get("/v1/models").json()["models"]}


def test_the_page_and_everything_it_loads_come_from_the_endpoint(page):
    _, client = page
    html = client.get("/")
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assets = [a for a in re.findall(r'(?:src|href)="([^"]+)"', html.text) if not a.startswith("data:")]  # inline
    assert assets and all(a.startswith("/") for a in assets), f"an asset from elsewhere: {assets}"  # offline
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    # the page adds no API: the documented paths are the API's, and the page is not one of them
    assert set(client.get("/openapi.json").json()["paths"]) == {"/v1/generate", "/v1/models", "/healthz", "/readyz"}


def test_a_budget_generates_and_the_page_shows_the_answer_the_api_gives(page):
    playground, client = page
    toy = served(client)[TOY]
    T = max(int(t) for t in toy["budgets"])
    playground.open()
    playground.choose("a", TOY, T)
    playground.set_samples(16, 7)
    assert playground.generate("a") == {"a": "done"}, playground.error("a")
    answer = client.generate(model=TOY, steps=T, num_samples=16, seed=7)
    shown = playground.shown("a")
    assert (shown["version"], shown["alias"], shown["answered-steps"]) == (answer["version"], answer["alias"], str(T))
    assert answer["version"] == toy["budgets"][str(T)]
    version = next(v for v in toy["versions"] if v["version"] == answer["version"])
    assert shown["parameterization"] == f"{version['parameterization']} ({version['dataset']})"
    assert shown["nelbo"].startswith(f"{version['test_nelbo_bits']:.4f} ± ")
    assert "ms in the server" in shown["latency"]
    # the density drawn is the API's samples: one filled cell per distinct (x0, x1) pair
    K = version["card"]["vocab_size"]
    filled = playground.driver.execute_script("""
        const canvas = arguments[0].querySelector('[data-role=samples] canvas');
        const K = arguments[1], cell = canvas.width / K, ctx = canvas.getContext('2d');
        let n = 0;
        for (let i = 0; i < K; i++) for (let j = 0; j < K; j++) {
          if (ctx.getImageData(i * cell + cell / 2, j * cell + cell / 2, 1, 1).data[0] < 255) n++;
        }
        return n;""", playground.panel("a"), K)
    assert filled == len({tuple(row) for row in answer["tokens"]})


def test_images_and_text_render_for_their_data(page):
    playground, client = page
    playground.open()
    playground.set_samples(6, 3)
    playground.choose("a", DIGITS)
    assert playground.generate("a") == {"a": "done"}, playground.error("a")
    images = playground.field("a", "samples").find_elements("css selector", "img")
    assert len(images) == 6
    assert all(playground.driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth === 8", img)
               for img in images)  # decoded PNGs of 8 x 8 digits
    playground.choose("a", TEXT)
    assert playground.field("a", "prefix-row").is_displayed() and not playground.field("a", "clamp-row").is_displayed()
    playground.field("a", "prefix").send_keys("the ")
    assert playground.generate("a") == {"a": "done"}, playground.error("a")
    expected = client.generate(model=TEXT, num_samples=6, seed=3, prefix="the ", format="text")["samples"]
    text = playground.field("a", "samples").find_element("css selector", "pre").get_attribute("textContent")
    assert text == "\n".join(expected) and all(line.startswith("the ") for line in expected)
    # molecules: SMILES lines, with the validity and FCD the gate recorded beside the NELBO
    playground.choose("a", MOLECULES)
    playground.field("a", "prefix").clear()  # the text's "the " is no SMILES
    assert playground.generate("a") == {"a": "done"}, playground.error("a")
    expected = client.generate(model=MOLECULES, num_samples=6, seed=3, format="text")["samples"]
    text = playground.field("a", "samples").find_element("css selector", "pre").get_attribute("textContent")
    assert text == "\n".join(expected)
    (version,) = served(client)[MOLECULES]["versions"]
    assert f"validity {version['test_sample_scores']['validity']:.3f}" in playground.shown("a")["nelbo"]


def test_api_errors_show_as_readable_messages(page):
    playground, _ = page
    playground.open()
    playground.choose("a", TOY)
    # a budget that is not served: the select offers only served ones, so add one as a stale page would have
    playground.driver.execute_script("arguments[0].add(new Option('T=99', '99')); arguments[0].value = '99';",
                                     playground.field("a", "steps"))
    assert playground.generate("a") == {"a": "error"}
    message = playground.error("a")
    assert message.startswith("HTTP 422: steps: 99: not a served step budget"), message
    assert playground.field("a", "error").is_displayed() and not playground.field("a", "answer").is_displayed()
    # a quality target no champion meets: the API's message names the best value available
    playground.field("a", "by-quality").click()
    playground.field("a", "quality-max").send_keys("0.001")
    assert playground.generate("a") == {"a": "error"}
    message = playground.error("a")
    assert message.startswith("HTTP 422: quality: ") and "best" in message, message


def test_two_budgets_side_by_side_on_the_same_seed(page):
    playground, client = page
    budgets = sorted(int(t) for t in served(client)[TOY]["budgets"])
    assert len(budgets) >= 2, budgets
    playground.open()
    assert not playground.panel("b").is_displayed()
    playground.choose("a", TOY, budgets[0])
    playground.compare()
    assert playground.panel("b").is_displayed()
    # by default the other panel shows the same model at another budget
    assert playground.field("b", "model").get_attribute("value") == TOY
    assert playground.field("b", "steps").get_attribute("value") == str(budgets[1])
    playground.set_samples(8, 11)
    assert playground.generate("a", "b") == {"a": "done", "b": "done"}
    for key, T in (("a", budgets[0]), ("b", budgets[1])):
        answer = client.generate(model=TOY, steps=T, num_samples=8, seed=11)
        shown = playground.shown(key)
        assert (shown["version"], shown["answered-steps"]) == (answer["version"], str(T))
        assert "8 sample(s), seed 11" in playground.field(key, "samples").text
    # no seed given: one drawn for the click, the same in both panels
    playground.driver.execute_script("document.getElementById('seed').value = ''")
    assert playground.generate("a", "b") == {"a": "done", "b": "done"}
    seeds = {re.search(r"seed (\d+)", playground.field(key, "samples").text).group(1) for key in ("a", "b")}
    assert len(seeds) == 1 and seeds != {"11"}, seeds


def test_a_clamped_position_is_sent_for_a_masking_model(page):
    playground, client = page
    playground.open()
    playground.set_samples(4, 5)
    playground.choose("a", DIGITS)
    assert playground.field("a", "clamp-row").is_displayed() and not playground.field("a", "prefix-row").is_displayed()
    playground.field("a", "positions").send_keys("0, 63")
    playground.field("a", "tokens").send_keys("1, 1")
    assert playground.generate("a") == {"a": "done"}, playground.error("a")
    clamp = {"positions": [0, 63], "tokens": [1, 1]}
    assert all(row[0] == 1 and row[63] == 1
               for row in client.generate(model=DIGITS, num_samples=4, seed=5, conditioning=clamp)["tokens"])
    sources = [img.get_attribute("src") for img in playground.field("a", "samples").find_elements("css selector", "img")]
    expected = client.generate(model=DIGITS, num_samples=4, seed=5, format="png", conditioning=clamp)["samples"]
    assert sources == [f"data:image/png;base64,{png}" for png in expected]
    playground.field("a", "tokens").send_keys(", 1")  # three tokens for two positions: the API's message, on the page
    assert playground.generate("a") == {"a": "error"}
    assert "must have the same length" in playground.error("a")
