"""`wsseg review`: the page lists every mask with a confidence, least confident first, and a real browser
(headless Chromium) renders that many cards in that order."""

import json
import re
import shutil
import subprocess

import pytest

from conftest import tiny_demo_overrides
from wsseg.cli.main import main
from wsseg.confidence import read_confidence


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("review") / "run"
    overrides = tiny_demo_overrides(("gradcam",)) + ["segment.masks=gradcam", "export.enabled=false",
                                                     "pseudo_masks.variants=[]", "segment.self_training_rounds=0"]
    assert main(["recipe", "run", "demo", "--out", str(out), *overrides]) == 0
    return out


def _expected_order(run, producers):
    pairs = [(value, producer, stem) for producer in producers
             for stem, value in read_confidence(run / "masks" / producer).items()]
    return [(producer, stem) for value, producer, stem in sorted(pairs)]


def test_the_page_embeds_every_mask_least_confident_first(finished_run, tmp_path):
    page = tmp_path / "page.html"
    assert main(["review", str(finished_run), "--out", str(page)]) == 0
    text = page.read_text()
    entries = json.loads(re.search(r"const ENTRIES = (.*);\n", text).group(1).replace("<\\/", "</"))
    assert [(e["producer"], e["stem"]) for e in entries] == _expected_order(finished_run, ["gradcam", "unet"])
    assert all(e["image"].startswith("data:image/jpeg;base64,") for e in entries)  # nothing to fetch
    assert all("map" in e for e in entries if e["producer"] == "gradcam") and \
        not any("map" in e for e in entries if e["producer"] == "unet")
    assert all(0 <= e["dice"] <= 1 for e in entries)
    assert main(["review", str(finished_run), "--producer", "nope"]) == 2


def test_headless_chromium_shows_the_cards_in_order(finished_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium package is not installed (.ci/run installs it)")
    page = tmp_path / "page.html"
    assert main(["review", str(finished_run), "--producer", "unet", "--out", str(page)]) == 0
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    cards = re.findall(r'class="card[^"]*" data-stem="([^"]+)" data-producer="([^"]+)"', dom)
    expected = _expected_order(finished_run, ["unet"])
    assert [(producer, stem) for stem, producer in cards] == expected
    assert f"{len(expected)} of {len(expected)} masks" in dom
    assert dom.count('class="card selected"') == 1
