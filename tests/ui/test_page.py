"""`lorafit ui` in a real browser: headless Chromium driven by Playwright through the whole path on
the embedded model: set up (defaults, errors next to their fields, command line, YAML out and
back in), preview the data, train a tiny run and watch its curve, stop it (a checkpoint), reload the
page, resume it to the end, chat with base and fine-tune side by side.

The tests share one page and one server and run in file order, each starting where the last one
left the page. With LORAFIT_UI_SCREENSHOTS=docs/images each page state is saved as ui-<state>.png.
"""

from __future__ import annotations

import re

import pytest
import yaml

from lorafit.errors import UserError
from lorafit.models import EMBEDDED_MODEL
from lorafit.train.args import LoraArguments, parse_train_args

pytestmark = pytest.mark.slow

# A run of a few seconds a step on two CPU cores: short sequences, a small batch, few steps.
MAX_STEPS = 8
TRAINING = {"cutoff_len": "64", "per_device_train_batch_size": "2", "max_steps": str(MAX_STEPS),
            "logging_steps": "1", "lora_rank": "4", "target_modules": "q_proj,v_proj", "learning_rate": "0.001"}
TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
def page(browser, ui_server):
    url, _ = ui_server
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    opened = context.new_page()
    opened.set_default_timeout(60_000)
    opened.goto(url)
    opened.wait_for_selector("body[data-ready=true]")
    yield opened
    context.close()


def wait_until(page, condition: str, timeout: int = 60_000) -> None:
    """page.wait_for_function, and on timeout what the page showed (errors, run state, log)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(condition, timeout=timeout)
    except PlaywrightTimeout:
        shown = page.evaluate("""() => ({
            errors: Object.fromEntries([...document.querySelectorAll('[data-error-for]')]
                .filter((e) => e.textContent).map((e) => [e.dataset.errorFor, e.textContent])),
            general: document.querySelector('#general-error').textContent,
            run: document.querySelector('#run-state').textContent,
            log: document.querySelector('#run-log').textContent.slice(-2000),
            chat: document.querySelector('#chat-status').textContent + ' ' +
                  document.querySelector('#chat-error').textContent})""")
        raise AssertionError(f"timed out waiting for {condition}; the page shows {shown}") from None


def fill(page, name: str, value: str) -> None:
    page.fill(f"#f-{name}", value)


def error_for(page, name: str) -> str:
    return page.inner_text(f'[data-error-for="{name}"]').strip()


def cli_message(argv: list[str]) -> str:
    """What `lorafit train` says of these flags (the text after 'lorafit train: error: ')."""
    with pytest.raises(UserError) as refused:
        parse_train_args(argv)
    return str(refused.value)


def test_setup_shows_the_embedded_model_and_the_train_defaults(page, screenshot):
    assert page.input_value("#model-choice") == EMBEDDED_MODEL
    assert page.input_value("#f-lora_rank") == str(LoraArguments.lora_rank)
    assert page.input_value("#f-target_modules") == LoraArguments.target_modules
    assert page.input_value("#f-output_dir") == "outputs/lorafit"
    screenshot(page, "setup")


def test_bad_input_is_shown_next_to_its_field_with_the_cli_message_and_nothing_starts(page, ui_server, ui_data,
                                                                                     screenshot):
    _, ui = ui_server
    fill(page, "output_dir", str(ui.runs_dir / "tiny-run"))
    fill(page, "train_file", str(ui_data["good"]))
    fill(page, "lora_rank", "abc")
    page.click("#do-start")
    wait_until(page, "document.querySelector('[data-error-for=lora_rank]').textContent.length > 0")
    assert error_for(page, "lora_rank") == cli_message(["--lora_rank", "abc"])
    fill(page, "lora_rank", "-1")
    page.click("#do-start")
    wait_until(page, "document.querySelector('[data-error-for=lora_rank]').textContent.includes('-1')")
    assert error_for(page, "lora_rank") == cli_message(["--lora_rank", "-1"])

    fill(page, "lora_rank", "8")
    fill(page, "train_file", str(ui_data["bad"]))
    page.click("#do-start")
    wait_until(page, "document.querySelector('[data-error-for=train_file]').textContent.includes('bad record')")
    message = error_for(page, "train_file")
    assert message.startswith("2 bad records (fix them, or pass --on_bad_record skip):")
    assert f"{ui_data['bad']}:3:" in message and f"{ui_data['bad']}:5:" in message
    assert error_for(page, "lora_rank") == ""
    assert not any(ui.runs_dir.iterdir()) or [p.name for p in ui.runs_dir.iterdir()] == [".lorafit-ui"]
    screenshot(page, "errors")


def test_show_as_command_and_a_saved_yaml_loads_back(page, ui_data, tmp_path):
    fill(page, "train_file", str(ui_data["good"]))
    for name, value in TRAINING.items():
        fill(page, name, value)
    fill(page, "extra_args", "--save_strategy no")
    page.click("#do-command")
    page.wait_for_selector("#equivalent:not([hidden])")
    command = page.inner_text("#equivalent").strip()
    assert command.startswith(f"lorafit train --train_file {ui_data['good']}")
    assert "--lora_rank 4" in command and "--save_strategy no" in command and "--lora_alpha" not in command

    with page.expect_download() as download:
        page.click("#do-yaml")
    saved = tmp_path / "run.yaml"
    download.value.save_as(saved)
    assert yaml.safe_load(saved.read_text())["lora_rank"] == 4
    from lorafit.train.config_file import config_sections

    argv = command.split()[2:]
    assert config_sections(parse_train_args([str(saved)])) == config_sections(parse_train_args(argv))

    fill(page, "lora_rank", "32")
    fill(page, "extra_args", "")
    page.set_input_files("#load-yaml", str(saved))
    wait_until(page, "document.querySelector('#f-lora_rank').value === '4'")
    assert page.input_value("#f-extra_args") == "--save_strategy no"


def test_preview_shows_trained_spans_and_the_summary(page, ui_data, screenshot):
    page.click("#do-preview")
    page.wait_for_selector("#preview:not([hidden]) .example")
    assert page.locator(".example").count() == 5
    trained = page.locator(".example").first.locator(".trained").all_inner_texts()
    assert any("Kestrel" in text or "I am" in text for text in trained)
    summary = page.inner_text("#preview-summary")
    assert re.search(r"train examples\s+16", summary) and "padding efficiency" in summary
    assert "prompt_response" in page.inner_text("#preview-detected")
    screenshot(page, "preview")


def run_state(page) -> str:
    return page.inner_text("#run-state").strip()


def chart_points(page) -> int:
    return int(page.get_attribute("#chart-loss", "data-points") or 0)


def test_train_watch_the_curve_stop_reload_and_resume(page, ui_server, screenshot):
    _, ui = ui_server
    page.click('#tabs button[data-tab="setup"]')
    page.click("#do-start")
    page.wait_for_selector("#train:not([hidden])")
    wait_until(page, "Number(document.querySelector('#chart-loss').dataset.points || 0) >= 1",
                           timeout=TIMEOUT_MS)
    first = chart_points(page)
    wait_until(page, f"Number(document.querySelector('#chart-loss').dataset.points || 0) > {first}",
                           timeout=TIMEOUT_MS)  # the curve grows as the run logs
    assert run_state(page) == "training"
    assert page.inner_text("#run-loss") != "–" and page.inner_text("#run-lr") != "–"
    screenshot(page, "train")

    page.click("#run-stop")
    wait_until(page, "document.querySelector('#run-state').textContent === 'stopped'", timeout=TIMEOUT_MS)
    assert page.is_enabled("#run-resume")
    stopped_at = int(page.inner_text("#run-step"))
    assert stopped_at < MAX_STEPS
    assert (ui.runs_dir / "tiny-run" / f"checkpoint-{stopped_at}").is_dir()
    assert "resume with" in page.inner_text("#run-message")
    screenshot(page, "stopped")

    page.reload()  # the run is the server's, not the page's
    page.wait_for_selector("body[data-ready=true]")
    page.click('#tabs button[data-tab="train"]')
    wait_until(page, "document.querySelector('#run-state').textContent === 'stopped'")
    assert page.locator("#runs tbody tr").count() == 1
    assert chart_points(page) >= stopped_at

    page.click("#run-resume")
    wait_until(page, "document.querySelector('#run-state').textContent === 'finished'", timeout=TIMEOUT_MS)
    assert int(page.inner_text("#run-step")) == MAX_STEPS
    assert (ui.runs_dir / "tiny-run" / "adapter_model.safetensors").is_file()
    wait_until(page, f"Number(document.querySelector('#chart-loss').dataset.points) >= {MAX_STEPS}")
    screenshot(page, "finished")


def test_chat_with_the_base_model_and_the_fine_tune_side_by_side(page, screenshot):
    page.click("#run-try")
    page.wait_for_selector("#try:not([hidden])")
    page.click("#chat-load")
    wait_until(page, "document.querySelector('#chat-status').textContent === 'ready'", timeout=TIMEOUT_MS)
    page.fill('#gen-settings input[name="max_tokens"]', "24")
    page.fill("#chat-prompt", "Who are you?")
    page.click("#chat-send")
    for side in ("base", "adapter"):
        page.wait_for_selector(f'#chat-{side} .turn.assistant[data-done="true"]', timeout=TIMEOUT_MS)
        assert page.inner_text(f"#chat-{side} .turn.assistant").strip()
        assert page.inner_text(f"#chat-{side} .turn.user") == "Who are you?"
    assert page.inner_text("#chat-error") == ""
    assert page.is_enabled('[data-export="merge"]')
    screenshot(page, "chat")


def test_with_a_key_the_page_takes_it_from_the_address_and_drops_it(browser, tmp_path):
    from ui_helpers import serve_ui

    url, _, stop = serve_ui(tmp_path / "runs", api_key="s3cret")
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(url + "/")
        page.wait_for_selector("#key-box:not([hidden])")  # no key: the page asks for one
        assert "needs its key" in page.inner_text("#general-error")
        page = context.new_page()  # (a hash change alone would not load the page again)
        page.goto(url + "/#key=s3cret")
        page.wait_for_selector("body[data-ready=true]")
        assert "s3cret" not in page.url
        assert page.input_value("#f-lora_rank") == "8"
    finally:
        context.close()
        stop()
