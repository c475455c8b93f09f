"""Hostile and broken input at every edge (issue 14): LLM replies from a scripted
OpenAI-compatible server (tests/scripted_llm_server.py, real HTTP on loopback), server
errors, files and flags. Each ends in one clear line and its exit code, or in a bounded
recovery; never a traceback, a hang, or a wrong result with exit code 0."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from story_to_video.config import ConfigError, VideoSettings, load_settings
from story_to_video.llm import (
    LLMConfigError,
    LLMError,
    LLMReplyError,
    LLMUnavailable,
    OpenAICompatibleBackend,
)
from story_to_video.planner import Planner, plan_from_story
from story_to_video.run import InputError, RunFolder, RunSpec
from tests.fakes import bible_json, scenes_json
from tests.scripted_llm_server import (
    Reply,
    ScriptedLLMServer,
    chunk,
    completion,
    error,
    event,
    models,
    stream,
)

MSGS = [{"role": "user", "content": "a story please"}]
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}}
STORY = "Mara walks the pier at dusk and finds a whale singing under the boards."


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedLLMServer]:
    srv = ScriptedLLMServer().start()
    yield srv
    srv.stop()


def backend(server: ScriptedLLMServer, **kw: Any) -> OpenAICompatibleBackend:
    kw.setdefault("connect_retries", 2)
    kw.setdefault("call_deadline_s", 20)
    kw.setdefault("backoff_s", 0.01)
    return OpenAICompatibleBackend(server.url, **kw)


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120,
        encoding: str = "utf-8") -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STV_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "story_to_video", *args], cwd=cwd,
                          capture_output=True, encoding=encoding, timeout=timeout,
                          check=False, env=full_env)


def assert_one_clear_line(res: subprocess.CompletedProcess[str], code: int, start: str) -> None:
    """The exit code, exactly one `error:` line (the last one) starting as expected, and no
    traceback anywhere."""
    assert res.returncode == code, res.stderr[-3000:]
    assert "Traceback" not in res.stderr + res.stdout
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert errors[0].startswith(start), errors[0]


# -- the LLM backend against a scripted server ------------------------------------------------
@pytest.mark.parametrize(("replies", "err", "msg", "requests"), [
    ([error(500, "boom")] * 3, LLMUnavailable, "HTTP 500: boom (gave up after 3 tries)", 3),
    ([error(503, "loading", **{"Retry-After": "3600"})], LLMUnavailable,
     "it asks to retry after 3600s, longer than llm.retry_wait_max_s", 1),
    ([error(401, "invalid key sk-THE-SECRET")], LLMConfigError,
     "refused the request (HTTP 401): check the API key", 1),
    ([error(400, "prompt is too long")], LLMUnavailable, "(HTTP 400): prompt is too long", 1),
    ([Reply(body=b"<html><body>It works!</body></html>", content_type="text/html")],
     LLMReplyError, "something that is not JSON", 1),
    ([Reply(body=b'{"id": "x", "object": "chat.completion"}')], LLMReplyError,
     "the reply has no choices", 1),
    ([Reply(body=b'{"error": {"message": "CUDA error"}}')] * 3, LLMUnavailable,
     "the server reported an error: CUDA error (gave up after 3 tries)", 3),
    ([Reply(body=b"[" * 60_000 + b"]" * 60_000)], LLMReplyError, "nested too deeply", 1),
    ([stream(STORY, finish=None, done=False)] * 3, LLMUnavailable,
     "ended without a finish reason or [DONE]", 3),
    ([Reply(events=[event(chunk("a")), b"data: {not json\n\n"],
            content_type="text/event-stream")] * 3, LLMUnavailable,
     "an event that is not JSON", 3),
    ([Reply(events=[event({"error": {"message": "model unloaded"}})],
            content_type="text/event-stream")] * 3, LLMUnavailable,
     "error mid-stream: model unloaded", 3),
    ([stream("x" * 3_000_000, pieces=300)], LLMReplyError,
     "for a reply of at most 1000 tokens; it ignores max_tokens", 1),
])
def test_each_failure_is_one_typed_error(server: ScriptedLLMServer, replies: list[Reply],
                                         err: type[Exception], msg: str, requests: int) -> None:
    server.script(*replies)
    llm = backend(server, api_key="sk-THE-SECRET")
    with pytest.raises(err) as exc:
        llm.complete(MSGS, max_tokens=1000, temperature=0)
    assert msg in str(exc.value)
    assert "sk-THE-SECRET" not in str(exc.value)
    assert len(exc.value.args) == 1 and "\n" not in str(exc.value)
    assert len(server.chat_requests()) == requests


def test_429_waits_what_retry_after_says_then_goes_on(
        server: ScriptedLLMServer, caplog: pytest.LogCaptureFixture) -> None:
    server.script(error(429, "slow down", **{"Retry-After": "1"}), stream(STORY))
    with caplog.at_level(logging.WARNING):
        reply = backend(server).complete(MSGS, max_tokens=200, temperature=0)
    assert reply.text == STORY
    assert "HTTP 429: slow down; retry 1/2 in 1.0s" in caplog.text


def test_dropped_stream_is_retried(server: ScriptedLLMServer) -> None:
    server.script(stream(STORY, finish=None, done=False, drop=True), stream(STORY))
    assert backend(server).complete(MSGS, max_tokens=200, temperature=0).text == STORY
    assert len(server.chat_requests()) == 2


def test_retries_are_bounded_by_the_setting(server: ScriptedLLMServer) -> None:
    server.script(*[error(502, "bad gateway")] * 5)
    with pytest.raises(LLMUnavailable, match="gave up after 1 tries"):
        backend(server, connect_retries=0).complete(MSGS, max_tokens=50, temperature=0)
    assert len(server.chat_requests()) == 1


def test_trickling_server_is_stopped_by_the_call_deadline(server: ScriptedLLMServer) -> None:
    # One token every 0.1 s, forever: each read is quick, only the deadline can end it.
    server.script(Reply(events=[event(chunk("once"))], trickle=event(chunk(" more")),
                        delay_s=0.1, content_type="text/event-stream"))
    with pytest.raises(LLMUnavailable, match=r"did not finish the reply by the deadline "
                                             r"\(llm.call_deadline_s = 2s"):
        backend(server, call_deadline_s=2).complete(MSGS, max_tokens=10_000, temperature=0)


def test_stalled_server_is_stopped_by_the_read_timeout(server: ScriptedLLMServer) -> None:
    server.script(Reply(stall_s=30, body=b"{}"))
    with pytest.raises(LLMUnavailable, match=r"sent nothing for 1s \(llm.timeout_s\)"):
        backend(server, timeout_s=1).complete(MSGS, max_tokens=50, temperature=0)
    assert len(server.chat_requests()) == 1  # a stall is not retried


def test_stage_deadline_bounds_the_repairs(server: ScriptedLLMServer) -> None:
    # Every reply is slow and invalid: without a stage deadline, 10 tries of 0.8 s each.
    # The stage ends between tries (PlanningError) or in one (the call gets what is left).
    server.script(default_chat=lambda _: stream('{"scenes": "no"}', delay_s=0.1))
    planner = Planner(backend(server, stage_deadline_s=1.5), max_tries=10)
    with pytest.raises(LLMError, match=r"llm.stage_deadline_s"):
        planner.make_bible(STORY, "noir")
    assert len(server.chat_requests()) <= 2


def test_finish_reason_without_done_and_plain_json_bodies_are_accepted(
        server: ScriptedLLMServer) -> None:
    server.script(stream(STORY, done=False), completion(STORY))
    llm = backend(server)
    assert llm.complete(MSGS, max_tokens=200, temperature=0).text == STORY
    assert llm.complete(MSGS, max_tokens=200, temperature=0).text == STORY


def test_invalid_bytes_surrogates_and_escapes_are_cleaned(server: ScriptedLLMServer) -> None:
    raw = (b'data: {"choices": [{"delta": {"content": "bad \xff\xfe bytes, lone \\ud800, '
           b'title \\u001b]0;pwned\\u0007 and NUL \\u0000 end"}, "finish_reason": "stop"}]}'
           b"\n\n")
    server.script(Reply(events=[raw], content_type="text/event-stream"))
    text = backend(server).complete(MSGS, max_tokens=200, temperature=0).text
    assert text == "bad \ufffd\ufffd bytes, lone \ufffd, title ]0;pwned and NUL  end"
    text.encode("utf-8")  # writable as UTF-8


def test_models_endpoint_failures(server: ScriptedLLMServer) -> None:
    server.script(model_list=[error(500, "down")] * 3)
    with pytest.raises(LLMUnavailable, match="HTTP 500: down"):
        backend(server).model()
    server.script(model_list=[Reply(body=b"Not Found", status=404, content_type="text/plain")])
    with pytest.raises(LLMConfigError, match="HTTP 404 .*usually ending in /v1"):
        backend(server).model()
    server.script(model_list=[Reply(body=b'{"object": "list"}')])
    with pytest.raises(LLMReplyError, match="did not answer a model list"):
        backend(server).model()
    server.script(model_list=[models("\x1b]0;evil\x07model")])
    assert backend(server).model() == "]0;evilmodel"


def _formats(server: ScriptedLLMServer) -> list[str]:
    out = []
    for body in server.chat_requests():
        fmt = body.get("response_format")
        out.append("prompt" if fmt is None else
                   "json_schema" if fmt["type"] == "json_schema" else "json_object_schema")
    return out


def test_a_burst_of_server_errors_keeps_the_structured_mode(server: ScriptedLLMServer) -> None:
    server.script(*[error(500, "out of memory")] * 3, stream('{"n": 1}'), stream('{"n": 2}'))
    llm = backend(server)
    with pytest.raises(LLMUnavailable, match="out of memory"):
        llm.complete_json(MSGS, SCHEMA, max_tokens=50, temperature=0)
    assert llm.structured_mode == "json_schema"
    assert llm.complete_json(MSGS, SCHEMA, max_tokens=50, temperature=0).mode == "json_schema"
    assert _formats(server) == ["json_schema"] * 4


def test_a_format_rejection_moves_on_and_is_remembered(server: ScriptedLLMServer) -> None:
    # What llama-cpp-python's server answers for json_schema.
    rejection = error(500, "1 validation error: ('body', 'response_format', 'type') Input "
                           "should be 'text' or 'json_object'")
    server.script(rejection, stream('{"n": 1}'), stream('{"n": 2}'))
    llm = backend(server)
    assert llm.complete_json(MSGS, SCHEMA, max_tokens=50, temperature=0).mode == \
        "json_object_schema"
    assert llm.complete_json(MSGS, SCHEMA, max_tokens=50, temperature=0).text == '{"n": 2}'
    assert _formats(server) == ["json_schema", "json_object_schema", "json_object_schema"]


def test_deeply_nested_json_reply_is_repaired_not_a_crash(server: ScriptedLLMServer) -> None:
    nested = '{"style": ' + "[" * 5000 + "]" * 5000 + "}"
    server.script(stream(nested, pieces=1), stream(bible_json()))
    planner = Planner(backend(server), max_tries=3)
    bible = planner.make_bible(STORY, "noir")
    assert bible.characters[0].name == "Mara"
    assert planner.attempts[-1].errors == [
        ["not valid JSON: reply is JSON nested too deeply to be a plan"]]


# -- the CLI as a user runs it, against the scripted server -----------------------------------
def _plan_args(server: ScriptedLLMServer, target: str = "4") -> list[str]:
    return ["plan", "--idea", "a whale sings under the pier", "--scenes", "1",
            "--target-seconds", target, "--llm-backend", "openai-compatible",
            "--llm-url", server.url]


@pytest.mark.parametrize(("chat", "model_list", "env", "code", "start"), [
    ([error(500, "boom")] * 2, [], {"STV_LLM__CONNECT_RETRIES": "1"}, 3,
     "error: LLM server at http://127.0.0.1:{port}/v1: HTTP 500: boom (gave up after 2 tries)"),
    ([error(401, "no")], [], {}, 2, "error: LLM server at http://127.0.0.1:{port}/v1 refused "
                                    "the request (HTTP 401): check the API key"),
    ([error(429, "busy", **{"Retry-After": "7200"})], [], {}, 3,
     "error: LLM server at http://127.0.0.1:{port}/v1: HTTP 429: busy; it asks to retry after "
     "7200s"),
    ([], [error(500, "no models today")] * 2, {"STV_LLM__CONNECT_RETRIES": "1"}, 3,
     "error: LLM server at http://127.0.0.1:{port}/v1: HTTP 500: no models today"),
    ([Reply(body=b"\xff\xfe<html>", content_type="text/html")], [], {}, 3,
     "error: LLM server at http://127.0.0.1:{port}/v1: the server answered with something "
     "that is not JSON"),
    ([stream("x" * 5_000_000, pieces=100)], [], {}, 3,
     "error: LLM server at http://127.0.0.1:{port}/v1: the reply passed"),
    ([Reply(events=[event(chunk("a"))], trickle=event(chunk("b")), delay_s=0.05,
            content_type="text/event-stream")], [],
     {"STV_LLM__CALL_DEADLINE_S": "2"}, 3,
     "error: LLM server at http://127.0.0.1:{port}/v1 did not finish the reply by the deadline"),
])
def test_cli_plan_server_failures(server: ScriptedLLMServer, tmp_path: Path,
                                  chat: list[Reply], model_list: list[Reply],
                                  env: dict[str, str], code: int, start: str) -> None:
    server.script(*chat, model_list=model_list)
    res = cli(*_plan_args(server), cwd=tmp_path, env=env)
    assert_one_clear_line(res, code, start.replace("{port}", str(server.port)))
    assert res.stdout == ""


def test_cli_plan_shows_llm_text_as_data(server: ScriptedLLMServer, tmp_path: Path) -> None:
    story = ("\x1b]0;owned\x07\x1b[2J A whale <img src=x onerror=alert(1)> sings "
             "![t](http://evil.example/t.png) under the pier\x00 every night.")
    scenes = json.loads(scenes_json(1, 1))
    scenes["scenes"][0]["title"] = "Dusk \u001b]2;title\u0007 \u202e gnp.exe"
    server.script(stream(story), stream(bible_json()), stream(json.dumps(scenes)))
    res = cli(*_plan_args(server), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    for bad in ("\x1b", "\x07", "\x00", "\u202e"):
        assert bad not in res.stdout
    assert "A whale <img src=x onerror=alert(1)> sings" in res.stdout  # kept as plain text
    assert "Scene 1: Dusk ]2;title gnp.exe - a stone pier, dusk" in res.stdout


def test_cli_text_the_terminal_cannot_encode_is_replaced(server: ScriptedLLMServer,
                                                        tmp_path: Path) -> None:
    server.script(stream("A fox finds a \u6f22\u5b57 lantern in the caf\u00e9 at night."),
                  stream(bible_json()), stream(scenes_json(1, 1)))
    res = cli(*_plan_args(server), cwd=tmp_path, env={"PYTHONIOENCODING": "latin-1:strict"},
              encoding="latin-1")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "A fox finds a ?? lantern in the caf\u00e9 at night." in res.stdout


def test_cli_unreachable_target_stops_before_any_llm_call(server: ScriptedLLMServer,
                                                          tmp_path: Path) -> None:
    server.script()
    res = cli(*_plan_args(server, target="600"), cwd=tmp_path)
    assert_one_clear_line(res, 2, "error: target_seconds 600 cannot be reached: 1 scene(s) x "
                                  "at most 3 shots (video.max_shots_per_scene) x 241 frames at "
                                  "16 fps = 45.2s")
    assert server.requests == []


# -- files and flags ----------------------------------------------------------------------------
SECRET = "sk-live-0123456789abcdef"


@pytest.mark.parametrize(("files", "args", "env", "start"), [
    ({}, ["doctor"], {"STV_CONFIG": "nope.toml"},
     "error: config file from STV_CONFIG nope.toml does not exist"),
    ({"c.toml": f'[llm]\napi_key = "{SECRET}"\n'}, ["doctor", "--config", "c.toml"], {},
     "error: invalid setting llm.api_key (value not shown): Extra inputs are not permitted; "
     "this section has: backend, base_url"),
    ({}, ["doctor"], {"STV_LLM__API_KEY_ENV": SECRET},
     "error: invalid setting llm.api_key_env=(value not shown)"),
    ({}, ["run", "--idea", "x", "--llm-url", f"http://user:{SECRET}@localhost:1234/v1"], {},
     "error: invalid setting llm.base_url=(value not shown): Value error, must not hold a user"),
    ({}, ["plan", "--idea", "x", "--llm-url", "http://[::1/v1"], {},
     "error: invalid setting llm.base_url='http://[::1/v1': Value error, is not a valid URL"),
    ({}, ["plan", "--idea", "x", "--llm-url", "http://localhost:99999/v1"], {},
     "error: invalid setting llm.base_url='http://localhost:99999/v1': Value error, is not a "
     "valid URL (Port out of range"),
    ({"c.toml": "x"}, ["doctor", "--config", "."], {}, "error: config file . is not a file"),
    ({"b.jsonl": b"\xff\xfe{}"}, ["batch", "b.jsonl"], {},
     "error: batch file b.jsonl is not UTF-8 text (byte 0)"),
    ({"b.jsonl": '"   "\n{"idea": "\\u001b"}\n' + "[" * 100_000 + "\n"}, ["batch", "b.jsonl"],
     {}, "error: b.jsonl has no usable idea"),
    ({"b.yaml": "ideas: " + "[" * 1500}, ["batch", "b.yaml"], {},
     "error: batch file is YAML nested too deeply"),
    ({}, ["broker", "plan", "--model", "wan2.2-14b", "--frames", "81", "--width", "832",
          "--height", "480", "--budget-gib", "32", "--margin-gib", "-4"], {},
     "error: margin_gib must be at least 0, got -4"),
    ({}, ["broker", "plan", "--model", "wan2.2-14b", "--frames", "81", "--width", "832",
          "--height", "480", "--budget-gib", "32", "--llm-gib", "-1"], {},
     "error: llm_gib must be at least 0, got -1"),
    ({}, ["broker", "plan", "--model", "wan2.2-14b", "--frames", "81", "--width", "832",
          "--height", "480", "--budget-gib", "nan"], {},
     "error: budget_gib must be a finite number, got nan"),
])
def test_bad_files_and_flags(tmp_path: Path, files: dict[str, str | bytes], args: list[str],
                             env: dict[str, str], start: str) -> None:
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    res = cli(*args, cwd=tmp_path, env=env)
    assert_one_clear_line(res, 2, start)
    assert SECRET not in res.stderr + res.stdout
    assert not (tmp_path / "runs").exists()


def test_batch_warnings_name_each_broken_entry(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text('"   "\n{"idea": "x", "engine": "sora"}\n'
                                      + "[" * 100_000 + "\n")
    res = cli("batch", "b.jsonl", cwd=tmp_path)
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        "warning: b.jsonl: line 1: idea: String should have at least 1 character (skipped)",
        "warning: b.jsonl: line 2: engine: Input should be 'preview' or 'comfyui' (skipped)",
        "warning: b.jsonl: line 3: JSON nested too deeply (skipped)",
    ]


WORKFLOW = Path(__file__).resolve().parent.parent / "workflows" / "wan22_ti2v_5b.json"


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda wf, ids: wf[ids["decode"]]["inputs"].__setitem__("samples", [ids["decode"], 0]),
     "links form a cycle: {decode} -> {decode}"),
    (lambda wf, ids: wf[ids["sampler"]]["inputs"].__setitem__("model", [ids["decode"], 0]),
     "links form a cycle: "),
    (lambda wf, ids: wf[ids["decode"]]["inputs"].__setitem__("vae", ["999", 0]),
     "input vae links to missing node 999"),
    (lambda wf, ids: wf[ids["decode"]]["inputs"].__setitem__("vae", [ids["sampler"], -1]),
     "links to output -1 of node {sampler}; outputs count from 0"),
    (lambda wf, ids: wf[ids["seed"][0]]["inputs"].__setitem__(ids["seed"][1], "forty-two"),
     "binding seed: node {seed0} input '{seed1}' holds 'forty-two', not a number"),
    (lambda wf, ids: wf[ids["prompt"][0]]["inputs"].__setitem__(ids["prompt"][1],
                                                                 [ids["sampler"], 0]),
     "binding prompt: node {prompt0} input '{prompt1}' is a link to node {sampler}"),
    (lambda wf, ids: wf[ids["decode"]].__setitem__("class_type", 42),
     "node {decode}: class_type must be a class name, got 42"),
])
def test_workflows_check_rejects_what_cannot_run(tmp_path: Path, edit: Any, problem: str) -> None:
    from story_to_video.engines.comfyui.workflow import load_binding

    binding = load_binding(WORKFLOW.with_name("wan22_ti2v_5b.binding.toml"))
    wf = json.loads(WORKFLOW.read_text())
    sampler = next(i for i, n in wf.items() if "Sampler" in n["class_type"])
    ids: dict[str, Any] = {"decode": binding.nodes.decode, "sampler": sampler,
                           "seed": binding.inputs["seed"][0],
                           "prompt": binding.inputs["prompt"][0]}
    edit(wf, ids)
    (tmp_path / "w.json").write_text(json.dumps(wf))
    (tmp_path / "w.binding.toml").write_text(
        WORKFLOW.with_name("wan22_ti2v_5b.binding.toml").read_text())
    res = cli("workflows", "check", "w.json", cwd=tmp_path)
    want = problem.format(decode=ids["decode"], sampler=sampler, seed0=ids["seed"][0],
                          seed1=ids["seed"][1], prompt0=ids["prompt"][0],
                          prompt1=ids["prompt"][1])
    assert_one_clear_line(res, 2, "error: ")
    assert want in res.stderr


# -- run folders --------------------------------------------------------------------------------
def spec(out: Path, idea: str = "a fox finds a lantern", **kw: Any) -> RunSpec:
    base: dict[str, Any] = {"idea": idea, "scenes": 1, "target_seconds": 4.0,
                            "style": "noir", "engine": "preview", "output_dir": out}
    base.update(kw)
    return RunSpec(**base)


def test_two_ideas_never_share_a_run_folder(tmp_path: Path) -> None:
    first = RunFolder(spec(tmp_path, run_name="My Night!"))
    first.prepare()
    other = RunFolder(spec(tmp_path, idea="a snail races a train", run_name="my-night"))
    assert other.root == first.root  # the names reduce to one folder...
    with pytest.raises(InputError) as exc:
        other.prepare()  # ...which the second idea is refused
    assert str(exc.value) == (
        f"run folder {first.root} already holds another run: idea 'a fox finds a lantern' "
        "(1 scenes, 4s, style 'noir'); this run is idea 'a snail races a train' (1 scenes, 4s, "
        "style 'noir'). Give this run another --run-name (or none: the default folder name "
        "includes the idea and a hash of the inputs)")
    RunFolder(spec(tmp_path, run_name="my night")).prepare()  # the same run resumes


def test_cli_refuses_a_run_name_used_by_another_idea(tmp_path: Path) -> None:
    RunFolder(spec(tmp_path / "runs", style="cinematic", target_seconds=12.0, scenes=3,
                   run_name="night")).prepare()
    res = cli("run", "--idea", "a snail races a train", "--run-name", "Night", cwd=tmp_path)
    assert_one_clear_line(res, 2, "error: run folder runs/night already holds another run: "
                                  "idea 'a fox finds a lantern'")
    assert "a snail races a train" in res.stderr


def _plan(folder: RunFolder) -> None:
    from tests.fakes import ScriptedLLM

    s = folder.spec
    plan = plan_from_story(Planner(ScriptedLLM([bible_json(), scenes_json(1, 1)])), idea=s.idea,
                           story=STORY, style=s.style, scenes=s.scenes,
                           target_seconds=s.target_seconds, video=VideoSettings())
    folder.save_plan(plan)


@pytest.mark.parametrize("damage", [
    lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),  # cut off
    lambda p: p.write_bytes(b"\xff\xfe\x00garbage"),
    lambda p: p.write_text("[]"),
    lambda p: p.write_text("[" * 100_000),
])
def test_corrupt_plan_is_set_aside_and_planned_again(
        tmp_path: Path, damage: Any, caplog: pytest.LogCaptureFixture) -> None:
    folder = RunFolder(spec(tmp_path))
    folder.prepare()
    _plan(folder)
    damage(folder.plan_path)
    with caplog.at_level(logging.WARNING):
        assert folder.load_plan() is None
    aside = list(tmp_path.rglob("plan.json.corrupt-*"))
    assert len(aside) == 1 and not folder.plan_path.exists()
    assert f"{folder.plan_path} is corrupt" in caplog.text and aside[0].name in caplog.text
    _plan(folder)  # what the flow does next
    assert folder.load_plan() is not None


def test_plan_made_for_other_inputs_is_not_reused(tmp_path: Path) -> None:
    folder = RunFolder(spec(tmp_path))
    folder.prepare()
    _plan(folder)
    moved = RunFolder(spec(tmp_path, style="anime"))
    moved.root = folder.root  # as if someone copied another run's plan in
    assert moved.load_plan() is None
    assert list(tmp_path.rglob("plan.json.corrupt-*"))


def test_corrupt_record_story_manifest_and_identity(tmp_path: Path) -> None:
    from story_to_video.models import Shot

    folder = RunFolder(spec(tmp_path))
    folder.prepare()
    shot = Shot(id="s01_sh01", scene_index=0, shot_index=0, action="a", prompt="p",
                frames=33, fps=16, width=832, height=480, seed=1)
    clip, rec = folder.clip_path(shot, "k"), folder.record_path(shot, "k")
    clip.write_bytes(b"mp4")
    good = {"shot_id": shot.id, "clip": clip.name, "frames": 33, "fps": 16, "width": 832,
            "height": 480}
    rec.write_text(json.dumps(good))
    assert folder.finished_record(shot, "k") == good
    for bad in ('{"shot_id": "s01_sh01"', json.dumps({**good, "clip": "../../etc/passwd"}),
                json.dumps({**good, "frames": "many"})):
        rec.write_text(bad)
        assert folder.finished_record(shot, "k") is None  # rendered again, not trusted
        assert not rec.exists()
    assert len(list(folder.clips.glob("*.json.corrupt-*"))) == 3

    folder.story_path.write_bytes(b"\xff\xfe")
    assert folder.load_story() is None and not folder.story_path.exists()
    folder.manifest_path.write_text('{"final": ')
    folder.identity_path.write_text("not json")
    folder.prepare()  # the next run goes on
    assert not folder.manifest_path.exists()
    assert json.loads(folder.identity_path.read_text())["idea"] == "a fox finds a lantern"
    assert {p.name.split(".corrupt-")[0] for p in tmp_path.rglob("*.corrupt-*")} >= {
        "story.md", "manifest.json", "run.json"}


# -- what a run writes --------------------------------------------------------------------------
def test_report_and_subtitles_show_llm_text_as_data(tmp_path: Path) -> None:
    from markdown_it import MarkdownIt

    from story_to_video.assembly import srt
    from story_to_video.report import DiskLinks, render_markdown
    from tests.fakes import ScriptedLLM

    evil = ('<script>alert(1)</script> ![pixel](https://evil.example/p.png) '
            '<img src="https://evil.example/i.png"> [[click]](javascript:x) | pipe \x1b[31m')
    bible = json.loads(bible_json())
    bible["palette"] = evil
    bible["characters"][0]["look"] = "tall <b>bold</b> ![x](http://e/x.png)"
    plan = plan_from_story(Planner(ScriptedLLM([json.dumps(bible), scenes_json(1, 1,
                                                                               action=evil)])),
                           idea="# a fox <i>", story=f"Intro\n# not a heading\n- {evil}",
                           style="noir", scenes=1, target_seconds=4, video=VideoSettings())
    md = render_markdown(plan, [], root=tmp_path, links=DiskLinks(), sheet=None,
                         plot=None, run_info={"llm": "<img src=http://evil.example/m.png>"},
                         failure=f"shot failed: {evil}")
    html = MarkdownIt("commonmark").enable("table").render(md)
    assert "<img" not in html and "<script" not in html and "<b>" not in html
    assert "javascript:" not in html.replace("(javascript:x)", "")
    assert "\x1b" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # shown, not run
    assert "<h1>" in html and html.count("<h1>") == 1  # only the report's own title

    cues = srt([(evil + "\n\n2\n00:00:00,000 --> 00:00:09,000\nfake cue", 33, 16)])
    assert cues.count("-->") == 1 and "\x1b" not in cues and "<" not in cues


def test_env_and_file_configs_behave_the_same(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "c.toml").write_text('style = "noir"\n')
    monkeypatch.setenv("STV_CONFIG", str(tmp_path / "c.toml"))
    assert load_settings().style == "noir" == load_settings(tmp_path / "c.toml").style
    monkeypatch.setenv("STV_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="from STV_CONFIG .*missing.toml does not exist"):
        load_settings()


# -- the whole run, through Prefect, as a user starts it ---------------------------------------
def _run(server: ScriptedLLMServer, tmp_path: Path, idea: str,
         *extra: str) -> subprocess.CompletedProcess[str]:
    # Prefect's temporary server is a child process writing to the same stderr; offline (as
    # in CI) its telemetry heartbeat fails with a traceback of its own, so it is turned off.
    env = {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": "",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return cli("run", "--idea", idea, "--scenes", "1", "--target-seconds", "2",
               "--llm-backend", "openai-compatible", "--llm-url", server.url, *extra,
               cwd=tmp_path, env=env, timeout=300)


@pytest.mark.slow
def test_run_with_hostile_llm_text_writes_only_inert_files(server: ScriptedLLMServer,
                                                           tmp_path: Path) -> None:
    evil = ('\x1b]0;owned\x07 <script>alert(1)</script> ![t](https://evil.example/t.png) '
            '<img src="https://evil.example/i.png"> NUL\x00 end')
    bible = json.loads(bible_json())
    bible["palette"] = evil
    server.script(stream(f"A fox finds a lantern. {evil}"), stream(json.dumps(bible)),
                  stream(scenes_json(1, 1, action=f"Mara walks on. {evil}")))
    res = _run(server, tmp_path, "a fox finds a lantern", "--run-name", "Night")
    assert res.returncode == 0, res.stderr[-3000:]
    final = Path(res.stdout.strip().splitlines()[-1])
    root = tmp_path / final.parent
    assert final.name == "final.mp4" and root == tmp_path / "runs" / "night"

    from markdown_it import MarkdownIt

    html = MarkdownIt("commonmark").enable("table").render((root / "report.md").read_text())
    images = re.findall(r'<img src="([^"]*)"', html)
    assert images == ["contact-sheet.png"]  # the report's own; none from the LLM's text
    assert "<script" not in html and "&lt;script&gt;" in html and "evil.example" in html
    for name in ("report.md", "final.srt", "story.md", "plan.json", "manifest.json"):
        data = (root / name).read_bytes()
        assert b"\x1b" not in data and b"\x00" not in data and b"\\u001b" not in data, name
    assert "<" not in (root / "final.srt").read_text()

    # Another idea whose --run-name reduces to the same folder: refused before any work.
    before = (root / "final.mp4").stat().st_mtime_ns
    server.script()
    res = _run(server, tmp_path, "a snail races a train", "--run-name", "night!")
    assert_one_clear_line(res, 2, f"error: run folder runs{os.sep}night already holds another "
                                  "run: idea 'a fox finds a lantern'")
    assert server.requests == [] and (root / "final.mp4").stat().st_mtime_ns == before


@pytest.mark.slow
def test_run_with_a_failing_llm_server_is_one_line(server: ScriptedLLMServer,
                                                    tmp_path: Path) -> None:
    server.script(*[error(503, "model loading")] * 4)
    res = _run(server, tmp_path, "a kite over dunes")
    assert_one_clear_line(res, 3, f"error: LLM server at {server.url}: HTTP 503: model loading "
                                  "(gave up after 4 tries)")
    assert not list(tmp_path.rglob("*.mp4")) and not list(tmp_path.rglob("story.md"))


def test_an_unexpected_error_is_still_one_line(tmp_path: Path) -> None:
    code = ("import story_to_video.cli as cli\n"
            "def broken() -> None:\n"
            "    raise KeyError('no such thing')\n"
            "cli.app = broken\n"
            "cli.main()\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, check=False)
    assert_one_clear_line(res, 4, "error: unexpected KeyError: 'no such thing' (if it "
                                  "persists, run again with STV_DEBUG=1 and report the "
                                  "traceback)")
