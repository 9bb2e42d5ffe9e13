"""The web UI shows the Models tab's controls to admins only, and its handlers check again (a hidden
button is not a permission)."""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import expect

from tests.security.conftest import gradio_call


def open_models_tab(page, url: str) -> None:
    page.goto(url)
    expect(page.locator("#ui-loaded")).to_have_text("loaded")
    page.get_by_role("tab", name="Models").click()
    page.wait_for_selector("#model-table table")


def test_strangers_see_the_pool_but_not_its_controls(page, public_server, artifacts):
    open_models_tab(page, public_server.url)
    assert "smollm2-135m" in page.inner_text("#model-table")
    assert page.locator("#load-model").count() == 0 or not page.locator("#load-model").is_visible()
    page.screenshot(path=str(artifacts / "models-tab-stranger.png"))


def test_the_owner_on_this_machine_sees_the_controls(page, local_server):
    open_models_tab(page, local_server.url)
    assert page.locator("#load-model").is_visible()


def test_the_hidden_model_actions_refuse_strangers_anyway(public_server):
    config = httpx.get(f"{public_server.url}/config").json()
    ids = {c["id"]: c for c in config["components"]}
    load_button = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "load-model")
    index = next(dep.get("id", i) for i, dep in enumerate(config["dependencies"])
                 if any(t[0] == load_button for t in dep.get("targets", [])))
    assert ids[load_button]
    message = gradio_call(public_server.url, index, ["smollm2-135m"])
    assert not message["success"]
    assert "admin" in str(message["output"].get("error", "")).lower()


def test_gradio_client_model_endpoints_are_for_admins(public_server, local_server):
    from gradio_client import Client
    stranger = Client(public_server.url, verbose=False)
    with pytest.raises(Exception, match="(?i)admin"):
        stranger.predict("smollm2-135m", api_name="/unload_model")
    assert httpx.get(f"{public_server.url}/v1/models/smollm2-135m").json()["state"] == "ready"
    owner = Client(local_server.url, verbose=False)
    assert owner.predict("smollm2-135m", api_name="/load_model")["state"] == "ready"
