"""The page's server over real HTTP (uvicorn on 127.0.0.1, httpx): its assets, the key, uploads,
the checks that keep a bad form from starting anything (each with the CLI's message), the preview,
the export commands, and the chat endpoint streaming from a tiny adapter."""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import pytest

from lorafit import cli
from lorafit.ui import exports
from lorafit.ui.app import STATIC
from lorafit.ui.form import default_values
from lorafit.ui.runs import RUN_STATE
from ui_helpers import cli_error, serve_ui


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    url, ui, stop = serve_ui(tmp_path_factory.mktemp("ui-app-runs"))
    yield httpx.Client(base_url=url, timeout=120), ui
    stop()


def test_the_page_loads_nothing_from_the_internet():
    external = re.compile(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|from\s+["']https?:|"""
                          r"""fetch\(\s*["']https?:|@import""")
    for asset in STATIC.iterdir():
        assert not external.search(asset.read_text(encoding="utf-8")), asset.name


def test_page_assets_and_the_form_schema_are_served(server):
    client, _ = server
    page = client.get("/")
    assert page.status_code == 200 and '<script type="module" src="/static/app.js">' in page.text
    for asset in ("app.js", "setup.js", "train.js", "chat.js", "chart.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    schema = client.get("/api/form").json()
    assert schema["values"]["lora_rank"] == "8" and schema["embedded_model"] == "smollm2-135m-instruct"
    assert schema["exports"][0] == "merge"


def test_with_a_key_the_api_needs_it_and_the_page_does_not(tmp_path):
    url, _, stop = serve_ui(tmp_path / "runs", api_key="s3cret")
    try:
        assert httpx.get(url + "/").status_code == 200
        refused = httpx.get(url + "/api/form")
        assert refused.status_code == 401 and "#key=" in refused.json()["error"]
        assert httpx.get(url + "/api/form", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url + "/api/form", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    finally:
        stop()


def test_an_upload_is_saved_under_its_own_name_only(server):
    client, ui = server
    saved = client.post("/api/upload", params={"filename": "../../etc/my data.jsonl"}, content=b'{"a": 1}\n').json()
    assert saved["path"] == str(ui.state_dir / "uploads" / "my_data.jsonl")
    assert (ui.state_dir / "uploads" / "my_data.jsonl").read_bytes() == b'{"a": 1}\n'

    limit, ui.max_upload_bytes = ui.max_upload_bytes, 64  # over the limit: refused, the saved file untouched
    try:
        refused = client.post("/api/upload", params={"filename": "my data.jsonl"}, content=b"x" * 200)
    finally:
        ui.max_upload_bytes = limit
    assert refused.status_code == 413 and "larger than the upload limit" in refused.json()["error"]
    assert (ui.state_dir / "uploads" / "my_data.jsonl").read_bytes() == b'{"a": 1}\n'
    assert sorted(p.name for p in (ui.state_dir / "uploads").iterdir()) == ["my_data.jsonl"]


def form(tiny_model_dir, output_dir, **changes) -> dict:
    return {**default_values(), "model_name_or_path": tiny_model_dir, "output_dir": str(output_dir),
            "max_steps": "2", **changes}


def start(client, values) -> httpx.Response:
    return client.post("/api/runs", json={"values": values})


def test_a_missing_data_file_is_refused_with_the_cli_message_and_nothing_starts(server, tiny_model_dir, tmp_path):
    client, _ = server
    values = form(tiny_model_dir, tmp_path / "out", train_file=str(tmp_path / "missing.jsonl"))
    refused = start(client, values)
    assert refused.status_code == 422
    assert not (tmp_path / "out").exists()  # (the CLI below writes its lorafit_config.yaml there first)
    assert refused.json()["errors"] == {"train_file": cli_error(*form_argv_of(values))}


def form_argv_of(values):
    from lorafit.ui.form import form_argv

    return form_argv(values)


def test_bad_records_are_listed_by_line_next_to_the_data_file(server, tiny_model_dir, ui_data, tmp_path):
    client, _ = server
    values = form(tiny_model_dir, tmp_path / "out", train_file=str(ui_data["bad"]))
    refused = client.post("/api/preview", json={"values": values})
    assert refused.status_code == 422
    body = refused.json()
    assert body["errors"] == {"train_file": cli_error(*form_argv_of(values))}
    assert [r["source"] for r in body["bad_records"]] == [f"{ui_data['bad']}:3", f"{ui_data['bad']}:5"]
    skipped = client.post("/api/preview", json={"values": {**values, "on_bad_record": "skip"}}).json()
    assert skipped["summary"]["rejected"] == 2 and len(skipped["bad_records"]) == 2


def test_a_folder_holding_a_run_and_a_missing_model_are_refused_like_the_cli(server, tiny_model_dir, ui_data,
                                                                              tmp_path):
    client, _ = server
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "metrics.jsonl").write_text("{}\n")
    values = form(tiny_model_dir, taken, train_file=str(ui_data["good"]))
    refused = start(client, values)
    assert refused.json()["errors"] == {"output_dir": cli_error(*form_argv_of(values))}
    assert not (taken / RUN_STATE).exists()
    values = form(str(tmp_path / "no-model"), tmp_path / "o2", train_file=str(ui_data["good"]))
    refused = start(client, values)
    assert refused.json()["errors"] == {"model_name_or_path": cli_error(*form_argv_of(values))}


def test_the_preview_is_data_inspect_as_data(server, tiny_model_dir, ui_data, smol_tokenizer, tmp_path):
    client, _ = server
    values = form(tiny_model_dir, tmp_path / "out", train_file=str(ui_data["good"]), cutoff_len="48")
    shown = client.post("/api/preview", json={"values": values, "limit": 3}).json()
    assert len(shown["examples"]) == 3 and shown["formats"] == {str(ui_data["good"]): "prompt_response"}
    example = shown["examples"][0]
    assert example["source"] == f"{ui_data['good']}:1"
    assert any(run["trained"] for run in example["runs"]) and not example["runs"][0]["trained"]
    assert shown["summary"]["train_examples"] == 16 and shown["summary"]["truncated"] > 0
    assert shown["summary_text"].startswith("data summary") and "padding efficiency" in shown["summary_text"]
    assert shown["bad_records"] == []


def test_export_commands_are_lorafit_merge_and_export():
    assert exports.export_args("merge", exports.Path("/r")) == [
        "merge", "--adapter", "/r", "--output_dir", "/r/merged", "--overwrite_output_dir"]
    assert ("gguf" in exports.available_exports()) == ("export" in cli.COMMANDS)
    if "export" in cli.COMMANDS:
        from lorafit.export.command import build_parser

        build_parser().parse_args(exports.export_args("gguf", exports.Path("/r"))[1:])  # flags it takes


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_model_dir, ui_data):
    from lorafit.train import run

    output_dir = tmp_path_factory.mktemp("tiny-adapter")
    assert run.main(["--model_name_or_path", tiny_model_dir, "--train_file", str(ui_data["good"]), "--output_dir",
                     str(output_dir), "--overwrite_output_dir", "--max_steps", "2", "--save_strategy", "no",
                     "--per_device_train_batch_size", "4", "--disable_tqdm", "true"]) == 0
    return output_dir


def test_the_chat_streams_base_and_adapter_answers_and_checks_settings(server, tiny_adapter):
    client, _ = server
    loaded = client.post("/api/chat/load", json={"adapter": str(tiny_adapter)}).json()
    assert loaded["loaded"] and loaded["adapter"] == str(tiny_adapter)
    for side in ("base", "adapter"):
        request = {"model": side, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                   "temperature": 0, "stream": True}
        with client.stream("POST", f"/api/chat/{side}", json=request) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    # one model holds both sides: each answers as the base and the adapter loaded on their own would
    from lorafit.data.render import render_prompt
    from lorafit.infer.generate import generate
    from lorafit.infer.loading import load_for_inference
    from lorafit.infer.options import GenerationOptions

    tuned = load_for_inference(adapter=str(tiny_adapter))
    plain = load_for_inference(json.loads((tiny_adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    prompt = render_prompt(tuned.tokenizer, [{"role": "user", "content": "Name a colour."}])
    for side, alone in (("base", plain), ("adapter", tuned)):
        (want,) = generate(alone.model, [prompt], GenerationOptions(temperature=0, max_new_tokens=8),
                           stop_token_ids=tuned.stop_token_ids, pad_token_id=tuned.tokenizer.pad_token_id,
                           tokenizer=tuned.tokenizer)
        got = client.post(f"/api/chat/{side}", json={"model": side, "max_tokens": 8, "temperature": 0,
                                                      "messages": [{"role": "user", "content": "Name a colour."}]})
        assert got.json()["text"] == want.text, side
    bad = client.post("/api/chat/adapter", json={"model": "adapter", "messages": [{"role": "user", "content": "x"}],
                                                  "temperature": 5})
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]
    assert client.post("/api/chat/load", json={"adapter": "/no/such"}).json()["error"] == "--adapter /no/such: no such folder"


def test_merge_from_the_page_is_lorafit_merge_in_a_child_process(server, tiny_adapter):
    client, _ = server
    started = client.post("/api/export", json={"path": str(tiny_adapter), "kind": "merge"}).json()
    assert started["command"].startswith(f"lorafit merge --adapter {tiny_adapter}")
    state = started
    for _ in range(600):
        if state["state"] != "running":
            break
        time.sleep(0.5)
        state = client.get("/api/export", params={"path": str(tiny_adapter), "kind": "merge"}).json()
    assert state["state"] == "done", state["log_tail"]
    assert (tiny_adapter / "merged" / "config.json").is_file()
    refused = client.post("/api/export", json={"path": str(tiny_adapter), "kind": "zip"})
    assert refused.status_code == 400 and "unknown export 'zip'" in refused.json()["error"]


def test_lorafit_ui_refuses_a_taken_port_and_a_file_as_runs_dir(tmp_path):
    from lorafit.errors import UserError
    from lorafit.ui import command

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        with pytest.raises(UserError, match="cannot listen on 127.0.0.1"):
            command.main(["--port", str(taken.getsockname()[1]), "--runs_dir", str(tmp_path)])
    finally:
        taken.close()
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a folder"):
        command.main(["--runs_dir", str(tmp_path / "file")])
    assert command.build_parser().parse_args([]).runs_dir == "outputs"  # where lorafit train writes by default
