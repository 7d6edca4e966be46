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
from serq_onnx.evaluate import decode_speed
from serq_onnx.generate import (Generator, RequestError, SamplingParams, check_model_dir,
                                next_token)

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def served_dir(tiny_serq) -> Path:
    return tiny_serq


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


def test_app_builder_for_rays_own_tools(served_dir):
    pytest.importorskip("ray", reason="the serve extra (ray[serve]) is not installed")
    from serq_onnx.serve import app_builder

    app = app_builder({"model_dir": str(served_dir), "replicas": "3", "threads": "1"})
    d = app._bound_deployment  # what `serve run serq_onnx.serve:app_builder ...` deploys
    assert d.num_replicas == 3 and d.init_args == (str(served_dir.resolve()), served_dir.name, 1)
    with pytest.raises(SerqError, match="unknown argument"):
        app_builder({"model_dir": str(served_dir), "replica": "2"})
    with pytest.raises(SerqError, match="--replicas must be >= 1"):
        app_builder({"model_dir": str(served_dir), "replicas": "0"})


def test_without_ray_a_clear_error(served_dir, monkeypatch):
    from serq_onnx import serve

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the serve extra were not installed
    with pytest.raises(SerqError, match=r"pip install 'serq-onnx\[serve\]'"):
        serve.start(served_dir)


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


class _Cli:
    """``serq-onnx serve`` in a subprocess, its output collected by reader threads."""

    def __init__(self, args: list[str]):
        import threading

        self.out: list[str] = []
        self.err: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "serq_onnx.cli", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=tempfile.gettempdir())
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, ls=lines: ls.extend(iter(s.readline, "")),
                             daemon=True).start()

    def wait_for(self, where: list[str], text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((ln for ln in list(where) if text in ln), None)
            if hit is not None:
                return hit
            if self.proc.poll() is not None:
                time.sleep(0.5)  # let the readers drain
                pytest.fail(f"serq-onnx serve exited {self.proc.returncode}: "
                            f"{''.join(self.err[-20:])}")
            time.sleep(0.2)
        pytest.fail(f"no {text!r} from serq-onnx serve within {timeout:.0f} s: "
                    f"{''.join(self.err[-20:])}")


@pytest.fixture(scope="module")
def ray_server(served_dir):
    """``serq-onnx serve`` with 2 replicas on a local 2-CPU Ray instance, on loopback."""
    pytest.importorskip("ray", reason="the serve extra (ray[serve]) is not installed")
    port = _free_port()
    t0 = time.perf_counter()
    cli = _Cli(["serve", str(served_dir), "--replicas", str(REPLICAS), "--num-cpus", "2",
                "--threads", "1", "--port", str(port), "--max-ongoing-requests", "2",
                "--model-name", "tiny"])
    try:
        line = cli.wait_for(cli.out, "serving", timeout=180)
        cli.start_seconds = time.perf_counter() - t0
        cli.url = f"http://127.0.0.1:{port}"
        assert f"{cli.url}/v1/completions" in line and "2 replicas" in line
        cli.ray_address = line.split("Ray cluster at ", 1)[1].split(")", 1)[0]
        yield cli
    finally:
        if cli.proc.poll() is None:
            cli.proc.send_signal(signal.SIGINT)
            try:
                cli.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                cli.proc.kill()
                cli.proc.wait(timeout=30)


def test_concurrent_requests_on_replicas(ray_server, served_dir):
    n = 8
    prompts = [[3 + i, 40 + 7 * i, 100 + i] for i in range(n)]
    bodies = [{"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
              for p in prompts]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda b: _post(ray_server.url, b, timeout=60), bodies))
    seconds = time.perf_counter() - t0
    print(f"\n{n} concurrent requests of 24 tokens on {REPLICAS} replicas: {seconds:.2f} s "
          f"(serve started in {ray_server.start_seconds:.1f} s)")
    assert [r[0] for r in results] == [200] * n, results
    for p, (_, body, _) in zip(prompts, results):
        assert body["choices"][0]["token_ids"] == _reference(served_dir, p, 24)
    # Two in flight at most per replica, eight at once: both replicas must have served some.
    assert len({r[2] for r in results}) == REPLICAS
    assert seconds < 60


def _replicas(url: str) -> dict[str, dict]:
    seen: dict[str, dict] = {}
    for _ in range(40):  # the router spreads requests; stop once every replica answered
        with urllib.request.urlopen(url + "/health", timeout=30) as r:
            h = json.loads(r.read())
        seen[h["replica"]] = h
        if len(seen) == REPLICAS:
            break
    return seen


def test_every_replica_has_the_op_library(ray_server):
    seen = _replicas(ray_server.url)
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


def test_replica_that_fails_to_start_on_an_existing_cluster(ray_server, served_dir, tmp_path):
    """`serq-onnx serve --ray-address` on the fixture's cluster: a model that fails in
    onnxruntime gives the replica's own error in bounded time, and the running model is left
    alone; a port other than the running Serve's is refused with the one to use."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in served_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    model = onnx.load(str(broken / "model.onnx"))
    model.graph.node[0].op_type = "NoSuchOp"  # loads as a graph, fails in onnxruntime
    onnx.save(model, str(broken / "model.onnx"))
    port = ray_server.url.rsplit(":", 1)[1]
    # The fixture's Ray listens on 127.0.0.1 only, and uses Ray's token authentication.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    t0 = time.perf_counter()
    proc = _cli("serve", str(broken), "--ray-address", ray_server.ray_address, "--port", port,
                "--cpus-per-replica", "0", "--route-prefix", "/broken", "--start-timeout", "60",
                timeout=120, env=env)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("serq-onnx: error: the serving replicas failed to start: "
                           "onnxruntime cannot load"), proc.stderr[-3000:]
    assert seconds < 90
    proc = _cli("serve", str(served_dir), "--ray-address", ray_server.ray_address, "--port",
                str(_free_port()), timeout=120, env=env)
    assert proc.returncode == 2 and f"listens on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert _post(ray_server.url, {"prompt": "x", "max_tokens": 2})[0] == 200


def test_replicas_killed_mid_request(ray_server):
    """The request in flight gets an error status, not a hang; the CLI says so, Serve
    replaces the replicas and the next request is answered."""
    before = _replicas(ray_server.url)
    assert len(before) == REPLICAS
    long = {"prompt": [[5, 6, 7]] * 32, "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post, ray_server.url, long, 60)
        time.sleep(1.0)  # 32 x 1000 tokens take ~15 s: the request is on a replica now
        for h in before.values():
            os.kill(h["pid"], signal.SIGKILL)
        t0 = time.perf_counter()
        status, body, _ = pending.result(timeout=60)
    print(f"\nin-flight request on a killed replica: HTTP {status} after "
          f"{time.perf_counter() - t0:.1f} s: {body}")
    assert status >= 500, (status, body)
    ray_server.wait_for(ray_server.err, "replica(s) died", timeout=30)
    t0 = time.perf_counter()
    status, _, replica = _post(ray_server.url, {"prompt": "x", "max_tokens": 2}, timeout=60)
    print(f"next request answered after {time.perf_counter() - t0:.1f} s")
    assert status == 200 and replica not in before


def test_ctrl_c_stops_the_server(ray_server):
    t0 = time.perf_counter()
    ray_server.proc.send_signal(signal.SIGINT)
    assert ray_server.proc.wait(timeout=60) == 130
    print(f"\nstopped in {time.perf_counter() - t0:.1f} s")
    with pytest.raises(OSError):  # nothing listens any more
        urllib.request.urlopen(ray_server.url + "/health", timeout=5)


# --- the command line -----------------------------------------------------------------------

def _cli(*args: str, timeout: float = 120, env: dict | None = None
         ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serq_onnx.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=tempfile.gettempdir(), env=env)


def test_cli_errors(served_dir, tmp_path):
    pytest.importorskip("ray", reason="the serve extra (ray[serve]) is not installed")
    proc = _cli("serve", str(tmp_path))
    assert proc.returncode == 2 and "no model.onnx" in proc.stderr and "Traceback" not in \
        proc.stderr
    proc = _cli("serve", str(served_dir), "--ray-address", f"127.0.0.1:{_free_port()}",
                timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("serq-onnx: error: cannot reach")
    proc = _cli("serve", str(served_dir), "--replicas", "0")
    assert proc.returncode == 2 and "--replicas must be >= 1" in proc.stderr
