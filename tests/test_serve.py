"""Serving a converted model: the generation function, the OpenAI protocol, and Ray Serve.

The reference for every generated token is ``evaluate.decode_speed`` on a plain local session
(the decode loop the rest of the suite tests against Optimum's generate): greedy tokens are an
argmax over the same logits in the same process type, so they must match exactly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest

import serq_onnx
from serq_onnx import SerqError
from serq_onnx.completions import parse_request
from serq_onnx.converter import convert
from serq_onnx.evaluate import decode_speed
from serq_onnx.generate import (Generator, RequestError, SamplingParams, check_model_dir,
                                next_token)

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def served_dir(tiny_llama, tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    vocab = tiny_llama.config["vocab_size"]
    out = tmp_path_factory.mktemp("serve") / "tiny-serq"
    convert(tiny_llama.onnx_path, out, calib_ids=[rng.integers(0, vocab, 64) for _ in range(2)],
            rank=16, progress=False)
    return out


@pytest.fixture(scope="module")
def generator(served_dir) -> Generator:
    return Generator(served_dir, threads=1)


def _reference(served_dir: Path, ids: list[int], n: int) -> list[int]:
    return decode_speed(serq_onnx.session(served_dir / "model.onnx"), np.array(ids), n,
                        warmup=False)["tokens"]


# --- the generation function ---------------------------------------------------------------

def test_greedy_text_matches_decode_loop(generator, served_dir):
    c = generator.complete("The quick brown fox", GREEDY)
    assert c.prompt_token_ids == tuple(generator.encode("The quick brown fox"))
    assert list(c.token_ids) == _reference(served_dir, list(c.prompt_token_ids), 12)
    assert c.text == generator.decode(c.token_ids) and c.finish_reason == "length"


def test_stops_at_eos_and_stop_string(generator):
    ids = list(generator.complete("abc", GREEDY).token_ids)
    # Declaring the 4th greedy token end-of-sequence must cut the output just before it.
    g = Generator.__new__(Generator)
    g.__dict__.update(generator.__dict__, eos_ids=frozenset({ids[3]}))
    first = ids.index(ids[3])
    c = g.complete("abc", SamplingParams(max_tokens=12, temperature=0))
    assert list(c.token_ids) == ids[:first] and c.finish_reason == "stop"
    # A stop string: the text ends before its first occurrence, no later tokens generated.
    full = generator.decode(ids)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    c = generator.complete("abc", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                 stop=(stop,)))
    assert c.finish_reason == "stop" and c.text == full[:full.find(stop)]
    assert len(c.token_ids) < 12 and list(c.token_ids) == ids[:len(c.token_ids)]


def test_sampling_is_seeded_and_top_p_narrows_to_argmax(generator):
    hot = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    a, b = (generator.complete("seeded", hot).token_ids for _ in range(2))
    other = generator.complete("seeded", SamplingParams(max_tokens=12, temperature=1.0, seed=8,
                                                        ignore_eos=True)).token_ids
    assert a == b and a != other  # 12 draws over 320 tokens: equal by chance ~never
    # top_p below the largest probability leaves only the argmax: sampling becomes greedy.
    narrow = SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-9, seed=1, ignore_eos=True)
    assert generator.complete("seeded", narrow).token_ids == generator.complete(
        "seeded", GREEDY).token_ids


def test_next_token_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = np.bincount([next_token(logits, SamplingParams(temperature=1.0), rng)
                         for _ in range(4000)], minlength=4) / 4000
    # 4000 draws: each frequency within ~4 standard errors (sqrt(p(1-p)/n) <= 0.008)
    np.testing.assert_allclose(draws, [0.5, 0.3, 0.15, 0.05], atol=0.035)
    # top_p 0.7: the 0.5 and 0.3 tokens (0.5 < 0.7 before adding 0.3), renormalised 5:3
    draws = np.bincount([next_token(logits, SamplingParams(temperature=1.0, top_p=0.7), rng)
                         for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(draws, [0.625, 0.375, 0, 0], atol=0.035)
    assert next_token(logits, SamplingParams(temperature=0), rng) == 0


def test_request_errors(generator):
    with pytest.raises(RequestError, match="context of 2048"):
        generator.complete([5] * 2040, SamplingParams(max_tokens=16))
    with pytest.raises(RequestError, match="empty"):
        generator.complete("", GREEDY)
    with pytest.raises(RequestError, match=r"\[0, 320\)"):
        generator.complete([5, 999], GREEDY)
    with pytest.raises(RequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)


@pytest.mark.parametrize("body,words", [
    (b"{not json", ("not valid JSON",)),
    (b"[1, 2]", ("JSON object",)),
    (b"{}", ("no prompt",)),
    (b'{"prompt": 3}', ("prompt must be",)),
    (b'{"prompt": "x", "stream": true}', ("stream=true is not supported",)),
    (b'{"prompt": "x", "n": 2}', ("n=2",)),
    (b'{"prompt": "x", "best_of_n": 2}', ("unsupported field", "best_of_n")),
    (b'{"prompt": "x", "temperature": "hot"}', ("temperature must be a number",)),
    (b'{"prompt": "x", "max_tokens": 1.5}', ("max_tokens must be an integer",)),
    (b'{"prompt": "x", "top_p": 0}', ("top_p",)),
    (b'{"prompt": "x", "stop": [1]}', ("stop must be",)),
])
def test_bad_requests(body, words):
    with pytest.raises(RequestError) as err:
        parse_request(body)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_request_defaults_follow_openai():
    r = parse_request(b'{"prompt": ["a", "b"], "frequency_penalty": 0.0, "logprobs": null}')
    assert r.prompts == ("a", "b") and r.params.max_tokens == 16 and r.params.temperature == 1
    assert parse_request(b'{"prompt": [[1, 2], [3]]}').prompts == ((1, 2), (3,))


def test_model_dir_checks(served_dir, tmp_path):
    with pytest.raises(SerqError, match="no model.onnx"):
        check_model_dir(tmp_path)
    with pytest.raises(SerqError, match="not a folder"):
        check_model_dir(tmp_path / "missing")
    (tmp_path / "model.onnx").write_bytes((served_dir / "model.onnx").read_bytes())
    with pytest.raises(SerqError, match="tokenizer.json"):
        check_model_dir(tmp_path)


def test_routes_without_ray(served_dir):
    from serq_onnx.serve import CompletionServer

    server = CompletionServer(str(served_dir), "tiny", threads=1)
    call = lambda *a: asyncio.run(server.handle(*a))  # noqa: E731
    status, body = call("POST", "/v1/completions", json.dumps(
        {"prompt": [3, 4, 5], "max_tokens": 5, "temperature": 0, "ignore_eos": True}).encode())
    assert status == 200 and body["choices"][0]["token_ids"] == _reference(served_dir,
                                                                           [3, 4, 5], 5)
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert call("POST", "/v1/completions", b"{")[0] == 400
    status, body = call("POST", "/v1/completions", b'{"prompt": "x", "model": "other"}')
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert call("GET", "/v1/completions", b"")[0] == 405
    assert call("GET", "/nope", b"")[0] == 404
    assert call("GET", "/v1/models", b"")[1]["data"][0]["id"] == "tiny"


def test_unreachable_ray_address_fails_fast(served_dir):
    pytest.importorskip("ray", reason="the serve extra (ray[serve]) is not installed")
    from serq_onnx import serve

    t0 = time.perf_counter()
    with pytest.raises(SerqError, match="cannot reach a Ray cluster at 127.0.0.1"):
        serve.start(served_dir, ray_address=f"127.0.0.1:{_free_port()}")
    assert time.perf_counter() - t0 < 15


# --- Ray Serve ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes | dict, timeout: float = 60) -> tuple[int, dict, str | None]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/completions", data=data,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), r.headers.get("x-serq-replica")
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw), err.headers.get("x-serq-replica")
        except json.JSONDecodeError:
            return err.code, {"raw": raw.decode(errors="replace")}, None


REPLICAS = 2


@pytest.fixture(scope="module")
def ray_server(served_dir):
    ray = pytest.importorskip("ray", reason="the serve extra (ray[serve]) is not installed")
    from serq_onnx import serve

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        t0 = time.perf_counter()
        server = serve.start(served_dir, replicas=REPLICAS, port=_free_port(), threads=1,
                             max_ongoing_requests=2, model_name="tiny")
        server.start_seconds = time.perf_counter() - t0
        yield server
        server.stop()
    finally:
        ray.shutdown()


def test_concurrent_requests_on_replicas(ray_server, served_dir):
    n = 8
    prompts = [[3 + i, 40 + 7 * i, 100 + i] for i in range(n)]
    bodies = [{"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
              for p in prompts]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda b: _post(ray_server.url, b, timeout=60), bodies))
    seconds = time.perf_counter() - t0
    print(f"\n{n} concurrent requests on {REPLICAS} replicas: {seconds:.2f} s "
          f"(start {ray_server.start_seconds:.1f} s)")
    assert [r[0] for r in results] == [200] * n, results
    for p, (_, body, _) in zip(prompts, results):
        assert body["choices"][0]["token_ids"] == _reference(served_dir, p, 24)
    # Two in flight at most per replica, eight at once: both replicas must have served some.
    assert len({r[2] for r in results}) == REPLICAS
    assert seconds < 60


def test_every_replica_has_the_op_library(ray_server):
    seen = {}
    for _ in range(40):  # the router spreads requests; stop once every replica answered
        with urllib.request.urlopen(ray_server.url + "/health", timeout=10) as r:
            h = json.loads(r.read())
        seen[h["replica"]] = h
        if len(seen) == REPLICAS:
            break
    assert len(seen) == REPLICAS
    for h in seen.values():  # each replica opened its session with the library registered
        assert h["op_library"] == serq_onnx.get_library_path() and h["pid"] != os.getpid()


def test_text_prompt_and_bad_json_over_http(ray_server, generator):
    status, body, _ = _post(ray_server.url, {"prompt": "Once upon", "max_tokens": 6,
                                             "temperature": 0, "ignore_eos": True})
    local = generator.complete("Once upon", SamplingParams(max_tokens=6, temperature=0,
                                                           ignore_eos=True))
    assert status == 200 and body["choices"][0]["text"] == local.text
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    status, body, _ = _post(ray_server.url, b"{oops")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body, _ = _post(ray_server.url, {"prompt": "x", "max_tokens": 5000})
    assert status == 400 and body["error"]["param"] == "max_tokens"


def test_replica_that_fails_to_start(ray_server, served_dir, tmp_path):
    from serq_onnx import serve

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in served_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    model = onnx.load(str(broken / "model.onnx"))
    model.graph.node[0].op_type = "NoSuchOp"  # loads as a graph, fails in onnxruntime
    onnx.save(model, str(broken / "model.onnx"))
    port = int(ray_server.url.rsplit(":", 1)[1])
    t0 = time.perf_counter()
    with pytest.raises(SerqError, match="failed to start: onnxruntime cannot load"):
        serve.start(broken, port=port, cpus_per_replica=0, app_name="broken",
                    route_prefix="/broken", start_timeout=60)
    assert time.perf_counter() - t0 < 60


def _replica_pids(url: str) -> dict[str, int]:
    seen: dict[str, int] = {}
    for _ in range(40):  # the router spreads requests; stop once every replica answered
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            h = json.loads(r.read())
        seen[h["replica"]] = h["pid"]
        if len(seen) == REPLICAS:
            break
    return seen


def test_replicas_killed_mid_request(ray_server):
    """The request in flight gets an error status, not a hang; Serve replaces the replicas and
    the next request is answered. Runs last: it leaves every replica running again."""
    from ray import serve as ray_serve

    from serq_onnx import serve

    pids = _replica_pids(ray_server.url)
    assert len(pids) == REPLICAS
    long = {"prompt": [[5, 6, 7]] * 32, "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post, ray_server.url, long, 60)
        time.sleep(1.0)  # 32 x 1000 tokens take ~15 s: the request is on a replica now
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
        t0 = time.perf_counter()
        status, body, _ = pending.result(timeout=60)
    print(f"\nin-flight request on a killed replica: HTTP {status} after "
          f"{time.perf_counter() - t0:.1f} s: {body}")
    assert status >= 500, (status, body)
    t0 = time.perf_counter()
    status, _, replica = _post(ray_server.url, {"prompt": "x", "max_tokens": 2}, timeout=60)
    print(f"next request answered after {time.perf_counter() - t0:.1f} s")
    assert status == 200 and replica not in pids
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        app = ray_serve.status().applications[serve.APP_NAME]
        if sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values()) == REPLICAS:
            break
        time.sleep(0.5)
    else:
        pytest.fail("Serve did not replace the killed replicas within 60 s")


# --- the command line -----------------------------------------------------------------------

def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serq_onnx.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=tempfile.gettempdir())


def test_cli_errors(served_dir, tmp_path):
    proc = _cli("serve", str(tmp_path))
    assert proc.returncode == 2 and "no model.onnx" in proc.stderr and "Traceback" not in \
        proc.stderr
    proc = _cli("serve", str(served_dir), "--ray-address", f"127.0.0.1:{_free_port()}",
                timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("serq-onnx: error: cannot reach")
    proc = _cli("serve", str(served_dir), "--replicas", "0")
    assert proc.returncode == 2 and "--replicas must be >= 1" in proc.stderr
