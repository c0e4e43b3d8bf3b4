"""Overload, soak and video cancel over HTTP, bounded in requests and time, against a server on this machine.

    python -m loadtests.overload --serve --duration-s 600 --out out/overload     # starts its own server
    python -m loadtests.overload --url http://127.0.0.1:8000 --pid 1234 --queue-size 32 --max-batch-size 4 --out ...

Phases, one after the other:

1. burst: `burst-factor` x (queue_size + max_batch_size) image requests at once. Counts 200 / 429 / other;
   time to 429 from the server's access log (its JSON line per request: id and `ms`), client-side when there is
   no log; lost = no response; duplicated = a request id the server answered (logged) or echoed more than once.
2. soak: `max_batch_size` clients in a closed loop for `duration-s`, sampling the server process's RSS, open file
   descriptors and threads from /proc/<pid> (needs `--serve` or `--pid`).
3. video cancel (when a text-to-video model is served): full jobs give the time per step (gaps between progress
   updates); then `video-cancels` jobs are deleted after their first progress. The device counts as busy until the
   server's `accel_run_seconds_count` for the model moves; that time is given in steps and compared with the time
   the job's steps left would have taken.

The server exposes neither its queue size nor its batch size, so they come from flags (`--serve` starts the server
with them). Writes `report.json` and `report.md` to `--out`; exit status 1 when a check fails. Only HTTP: imports
neither `server` nor `accel` (`--serve` runs `python -m server` as a child process on a free loopback port).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from loadtests.__main__ import percentile, scrape

SERVE_MODELS = [{"id": "tiny-flux", "source": "tiny-flux"}, {"id": "tiny-wan", "source": "tiny-wan"}]
PROMPTS = ["a red circle", "a blue square on the left", "a green triangle"]


# -- the server: started here (--serve) or given (--url) ---------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """`python -m server` on a free loopback port with the tiny models, its log (JSON lines) in `log_path`."""

    def __init__(self, args, log_path: Path):
        port = free_port()
        self.url, self.log_path = f"http://127.0.0.1:{port}", log_path
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE",
               "ACCEL_MODELS": json.dumps(SERVE_MODELS), "ACCEL_QUEUE_SIZE": str(args.queue_size),
               "ACCEL_MAX_BATCH_SIZE": str(args.max_batch_size), "ACCEL_LOG_LEVEL": "info"}
        if args.api_key:
            env["ACCEL_API_KEYS"] = json.dumps([args.api_key])
        self.log = open(log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port)],
                                        env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid

    def wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited ({self.process.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"the server was not ready after {timeout:g} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def access_log(path: Path | None) -> dict[str, list[dict]]:
    """The server's access-log lines (`{"event": "request", "id": ..., "status": ..., "ms": ...}`) by request id."""
    lines: dict[str, list[dict]] = {}
    if path is None or not path.exists():
        return lines
    for text in path.read_text(errors="replace").splitlines():
        if text.startswith("{") and '"event": "request"' in text:
            try:
                line = json.loads(text)
            except ValueError:
                continue
            lines.setdefault(line.get("id"), []).append(line)
    return lines


def proc_sample(pid: int) -> dict:
    """RSS (MB), open file descriptors and threads of a process on this machine, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"t": time.time(), "rss_mb": round(int(status["VmRSS"].split()[0]) / 1024, 1),
            "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": int(status["Threads"])}


# -- requests ----------------------------------------------------------------------------------------------------
async def image_request(client: httpx.AsyncClient, request_id: str, body: dict) -> dict:
    """One image request with its own `x-request-id`; status 0 = no response (lost)."""
    start = time.perf_counter()
    try:
        response = await client.post("/v1/images/generations", json=body, headers={"x-request-id": request_id})
    except httpx.HTTPError as exc:
        return {"id": request_id, "status": 0, "ms": (time.perf_counter() - start) * 1000, "error": repr(exc)}
    ok = response.status_code != 200 or bool(response.json().get("data"))
    return {"id": request_id, "status": response.status_code, "ms": (time.perf_counter() - start) * 1000,
            "echo": response.headers.get("x-request-id"), "retry_after": response.headers.get("retry-after"),
            "error": None if ok else "200 without images"}


def image_body(args, i: int) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "model": args.image_model, "size": args.size,
            "num_inference_steps": args.steps, "seed": i, "acceleration": "off"}


def tally(results: list[dict], log: dict[str, list[dict]], logged: bool) -> dict:
    """Statuses, lost and duplicated answers of a set of requests (client results plus the server's log)."""
    statuses = Counter(r["status"] for r in results)
    echoed = Counter(r.get("echo") for r in results if r.get("echo"))
    duplicated = sum(1 for r in results if echoed[r["id"]] > 1 or len(log.get(r["id"], [])) > 1)
    return {"requests": len(results), "status_counts": {str(k): v for k, v in sorted(statuses.items())},
            "served": statuses.get(200, 0), "rejected_429": statuses.get(429, 0),
            "other": sum(n for s, n in statuses.items() if s not in (200, 429, 0)),
            "server_errors": sum(n for s, n in statuses.items() if s >= 500),
            "lost": statuses.get(0, 0), "duplicated": duplicated,
            "misrouted": sum(1 for r in results if r.get("echo") not in (None, r["id"])),
            "bad_bodies": sum(1 for r in results if r.get("error") == "200 without images"),
            "unlogged": sum(1 for r in results if r["id"] not in log) if logged else None}


def ms_stats(values: list[float]) -> dict:
    return {"p50": _round(percentile(values, 0.5)), "p99": _round(percentile(values, 0.99)), "n": len(values)}


def _round(value, digits=1):
    return None if value is None else round(value, digits)


# -- phases ------------------------------------------------------------------------------------------------------
async def burst(args, client: httpx.AsyncClient, log_path: Path | None) -> dict:
    capacity = args.queue_size + args.max_batch_size
    n = args.burst_factor * capacity
    start = time.perf_counter()
    results = await asyncio.gather(*(image_request(client, f"{args.tag}-burst-{i}", image_body(args, i))
                                     for i in range(n)))
    wall = time.perf_counter() - start
    await asyncio.sleep(0.5)  # the server logs a request after its response: let the last lines reach the file
    log = access_log(log_path)
    out = {"capacity": capacity, "factor": args.burst_factor, "wall_s": round(wall, 2),
           **tally(results, log, log_path is not None)}
    rejected = [r for r in results if r["status"] == 429]
    server_ms = [line["ms"] for r in rejected for line in log.get(r["id"], []) if line.get("status") == 429]
    out["time_to_429_ms"] = {"source": "server access log" if log_path is not None else "client (no server log)",
                             **ms_stats(server_ms if log_path is not None else [r["ms"] for r in rejected])}
    out["time_to_429_client_ms"] = ms_stats([r["ms"] for r in rejected])
    out["served_latency_ms"] = ms_stats([r["ms"] for r in results if r["status"] == 200])
    out["missing_retry_after"] = sum(1 for r in rejected if not r.get("retry_after"))
    return out


async def soak(args, client: httpx.AsyncClient, pid: int | None, log_path: Path | None) -> dict:
    end = time.time() + args.duration_s
    results: list[dict] = []
    samples: list[dict] = []

    async def worker(w: int) -> None:
        i = 0
        while time.time() < end:
            results.append(await image_request(client, f"{args.tag}-soak-{w}-{i}", image_body(args, i)))
            i += 1

    async def sampler() -> None:
        while time.time() < end:
            samples.append(proc_sample(pid))
            await asyncio.sleep(min(args.sample_s, max(0.0, end - time.time())))
        samples.append(proc_sample(pid))

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(args.max_batch_size)), *([sampler()] if pid else []))
    wall = time.perf_counter() - start
    await asyncio.sleep(0.5)  # the server logs a request after its response: let the last lines reach the file
    out = {"duration_s": args.duration_s, "wall_s": round(wall, 2), "concurrency": args.max_batch_size,
           "sample_s": args.sample_s,
           **tally(results, access_log(log_path), log_path is not None),
           "images_per_s": round(sum(1 for r in results if r["status"] == 200) / wall, 3),
           "latency_ms": ms_stats([r["ms"] for r in results if r["status"] == 200])}
    if samples:
        first, last = samples[0], samples[-1]
        out["process"] = {key: {"start": first[key], "end": last[key], "max": max(s[key] for s in samples),
                                "growth": round(last[key] - first[key], 1)} for key in ("rss_mb", "fds", "threads")}
        out["samples"] = [{**s, "t": round(s["t"] - first["t"], 1)} for s in samples]
    else:
        out["process"] = None  # no pid: --url without --pid
    return out


async def metric_sum(client: httpx.AsyncClient, name: str, model: str) -> tuple[float, float]:
    samples = await asyncio.to_thread(scrape, str(client.base_url), dict(client.headers))
    return samples.get(f'{name}_count{{model="{model}"}}', 0.0), samples.get(f'{name}_sum{{model="{model}"}}', 0.0)


async def run_count(client: httpx.AsyncClient, args) -> float:
    return (await metric_sum(client, "accel_run_seconds", args.video_model))[0]


async def video_job(client: httpx.AsyncClient, args, steps: int, seed: int, cancel: bool) -> dict:
    """Create a job and poll it every 10 ms: to its end, or until its first progress, then DELETE it and wait until
    the server's run counter for the model moves (the device is free). `run_s`: the server's pipeline time."""
    count0, sum0 = await metric_sum(client, "accel_run_seconds", args.video_model)
    body = {"prompt": "a ball rolls", "model": args.video_model, "num_inference_steps": steps, "seed": seed,
            "acceleration": "off"}
    response = await client.post("/v1/videos", json=body)
    if response.status_code != 200:
        return {"steps": steps, "error": f"create: {response.status_code} {response.text[:200]}"}
    job_id, seen, out = response.json()["id"], {}, {"steps": steps}
    deadline = time.time() + args.request_timeout_s
    while time.time() < deadline:
        polled = await client.get(f"/v1/videos/{job_id}")
        now = time.perf_counter()
        if polled.status_code != 200:
            out["error"] = f"poll: {polled.status_code} {polled.text[:200]}"
            break
        job = polled.json()
        seen.setdefault(job.get("progress", 0), now)
        if job["status"] in ("completed", "failed", "cancelled"):
            out["status"] = job["status"]
            break
        if cancel and job.get("progress", 0) > 0:
            out["step_at_delete"] = round(job["progress"] * steps / 100)  # last seen: the true step may be later
            deleted = time.perf_counter()
            out["delete_status"] = (await client.delete(f"/v1/videos/{job_id}")).status_code
            while time.time() < deadline and (await run_count(client, args)) == count0:
                await asyncio.sleep(0.01)
            out["busy_after_delete_ms"] = round((time.perf_counter() - deleted) * 1000, 1)
            out["get_after_delete"] = (await client.get(f"/v1/videos/{job_id}")).status_code
            break
        await asyncio.sleep(0.01)
    else:
        out["error"] = f"job {job_id} not finished after {args.request_timeout_s:g} s"
    count1, sum1 = await metric_sum(client, "accel_run_seconds", args.video_model)
    out["run_s"] = round(sum1 - sum0, 4) if count1 > count0 else None
    progress = sorted((round(p * steps / 100), t) for p, t in seen.items() if 0 < p < 100)
    gaps = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(progress, progress[1:]) if s1 > s0]
    out["client_step_ms"] = _round(percentile(gaps, 0.5) * 1000 if gaps else None)
    return out


async def video_cancel(args, client: httpx.AsyncClient) -> dict:
    """Device-busy time after a DELETE, in steps: reference jobs run to the end give the time per step (the median
    gap between progress updates); each cancelled job's busy time after its DELETE is divided by it and compared
    with the time its steps left would have taken."""
    steps = args.video_steps
    refs = [await video_job(client, args, steps, seed=1, cancel=False) for _ in range(args.video_refs)]
    cancels = [await video_job(client, args, steps, seed=2 + i, cancel=True) for i in range(args.video_cancels)]
    step_ms = percentile([r["client_step_ms"] for r in refs if r.get("client_step_ms")], 0.5)
    out = {"model": args.video_model, "steps": steps, "step_ms": step_ms, "references": refs, "cancels": cancels,
           "full_run_s": percentile([r["run_s"] for r in refs if r.get("run_s")], 0.5)}
    for c in cancels:
        if step_ms and c.get("busy_after_delete_ms") is not None:
            c["busy_steps"] = round(c["busy_after_delete_ms"] / step_ms, 1)
            c["steps_left_at_delete"] = steps - c.get("step_at_delete", 0)
            c["steps_left_ms"] = round(c["steps_left_at_delete"] * step_ms, 1)
    busy = [c["busy_steps"] for c in cancels if "busy_steps" in c]
    out["busy_steps"] = {"median": percentile(busy, 0.5), "max": max(busy, default=None)}
    return out


# -- the run and the reports -------------------------------------------------------------------------------------
def checks(report: dict, args) -> dict[str, bool]:
    phases = [report["burst"], report["soak"]]
    out = {"lost = 0": all(p["lost"] == 0 for p in phases),
           "duplicated = 0": all(p["duplicated"] == 0 and p["misrouted"] == 0 for p in phases),
           "no 5xx": all(p["server_errors"] == 0 for p in phases),
           "burst: only 200 or 429": report["burst"]["other"] == 0 and report["burst"]["bad_bodies"] == 0,
           "burst: every 429 has Retry-After": report["burst"]["missing_retry_after"] == 0,
           "soak: all 200": report["soak"]["served"] == report["soak"]["requests"] > 0}
    if report["server_log"]:
        out["server logged every request"] = all(p["unlogged"] == 0 for p in phases)
    process = report["soak"]["process"]
    if process:
        out[f"soak: fd growth <= {args.max_fd_growth}"] = process["fds"]["growth"] <= args.max_fd_growth
        out[f"soak: thread growth <= {args.max_thread_growth}"] = process["threads"]["growth"] <= args.max_thread_growth
    video = report.get("video_cancel")
    if video:
        cancels = video["cancels"]
        out["video: reference jobs completed"] = all(j.get("status") == "completed" for j in video["references"])
        out["video: DELETE 200, then 404"] = all(c.get("delete_status") == 200 and c.get("get_after_delete") == 404
                                                 for c in cancels)
        out["video: device free before the steps left would have run"] = all(
            c.get("steps_left_ms") is not None and c["busy_after_delete_ms"] < c["steps_left_ms"] for c in cancels)
    return out


def _fmt(value) -> str:
    return "-" if value is None else str(value)


def markdown(report: dict) -> str:
    b, s, v = report["burst"], report["soak"], report.get("video_cancel")
    t429 = b["time_to_429_ms"]
    lines = [f"# Overload and soak: {report['url']}", "",
             f"queue_size {report['queue_size']}, max_batch_size {report['max_batch_size']}, image model "
             f"`{report['image_model']}` at {report['size']}, {report['steps']} steps.", "",
             "## Burst", "",
             "| requests | served (200) | 429 | other | lost | duplicated | time to 429 p50 ms | p99 ms | source "
             "| served p50 ms | served p99 ms | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| {b['requests']} ({b['factor']}x {b['capacity']}) | {b['served']} | {b['rejected_429']} | {b['other']} "
             f"| {b['lost']} | {b['duplicated']} | {_fmt(t429['p50'])} | {_fmt(t429['p99'])} | {t429['source']} "
             f"| {_fmt(b['served_latency_ms']['p50'])} | {_fmt(b['served_latency_ms']['p99'])} | {b['wall_s']} |",
             "", "## Soak", "",
             "| duration s | clients | requests | 200 | other | lost | duplicated | images/s | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| {s['duration_s']:g} | {s['concurrency']} | {s['requests']} | {s['served']} "
             f"| {s['requests'] - s['served'] - s['lost']} | {s['lost']} | {s['duplicated']} | {s['images_per_s']} "
             f"| {_fmt(s['latency_ms']['p50'])} | {_fmt(s['latency_ms']['p99'])} |"]
    if s["process"]:
        before = report.get("process_before_burst") or {}
        lines += ["", f"Server process before the burst: RSS {before.get('rss_mb')} MB, {before.get('fds')} fds, "
                      f"{before.get('threads')} threads. During the soak (sampled every {s['sample_s']:g} s):", "",
                      "| server process | start | end | max | growth |", "|---|---|---|---|---|"]
        for key, label in (("rss_mb", "RSS MB"), ("fds", "open fds"), ("threads", "threads")):
            p = s["process"][key]
            lines.append(f"| {label} | {p['start']} | {p['end']} | {p['max']} | {p['growth']} |")
    else:
        lines += ["", "No server pid (use --serve or --pid): RSS, fds and threads not sampled."]
    if v:
        lines += ["", "## Video cancel", "",
                  f"`{v['model']}`, {v['steps']} steps, {_fmt(_round(v['step_ms']))} ms per step (median gap between "
                  f"progress updates of {len(v['references'])} full job(s), {_fmt(v['full_run_s'])} s each on the "
                  "server); each job below was deleted after its first progress.", "",
                  "| cancel | DELETE at step | busy after DELETE ms | = steps | steps left | their time ms "
                  "| cancelled run s (server) | GET after DELETE |",
                  "|---|---|---|---|---|---|---|---|"]
        for i, c in enumerate(v["cancels"], 1):
            lines.append(f"| {i} | {_fmt(c.get('step_at_delete'))} | {_fmt(c.get('busy_after_delete_ms'))} "
                         f"| {_fmt(c.get('busy_steps'))} | {_fmt(c.get('steps_left_at_delete'))} "
                         f"| {_fmt(c.get('steps_left_ms'))} | {_fmt(c.get('run_s'))} "
                         f"| {_fmt(c.get('get_after_delete'))} |")
        lines += ["", "Busy after DELETE: client time from sending the DELETE until the server's "
                      "`accel_run_seconds_count` for the model moves (polled every 10 ms): the step in flight, the "
                      "VAE decode of the partial latents that the pipeline still runs, and the poll's lag. The server "
                      "exposes no count of the steps run after a cancel, so this is time, divided by the step time."]
    else:
        lines += ["", f"Video cancel skipped: {report.get('video_skipped')}."]
    lines += ["", "## Checks", ""] + [f"- [{'x' if ok else ' '}] {name}" for name, ok in report["checks"].items()]
    return "\n".join(lines) + "\n"


async def run(args, url: str, pid: int | None, log_path: Path | None) -> dict:
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=args.max_batch_size * 2)
    timeout = args.request_timeout_s
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as client:
        models = (await client.get("/v1/models")).raise_for_status().json()["data"]
        by_task = {}
        for m in models:
            by_task.setdefault(m["task"], m["id"])
        args.image_model = args.image_model or by_task.get("text-to-image")
        args.video_model = args.video_model or by_task.get("text-to-video")
        if args.image_model is None:
            raise SystemExit(f"no text-to-image model is served at {url}: {[m['id'] for m in models]}")
        report = {"url": url, "queue_size": args.queue_size, "max_batch_size": args.max_batch_size,
                  "image_model": args.image_model, "size": args.size, "steps": args.steps,
                  "server_log": str(log_path) if log_path else None}
        if pid:
            report["process_before_burst"] = proc_sample(pid)
        report["burst"] = await burst(args, client, log_path)
        report["soak"] = await soak(args, client, pid, log_path)
        if args.video_model:
            report["video_cancel"] = await video_cancel(args, client)
        else:
            report["video_skipped"] = "no text-to-video model is served"
    report["checks"] = checks(report, args)
    report["ok"] = all(report["checks"].values())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.overload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server on this machine, e.g. http://127.0.0.1:8000")
    where.add_argument("--serve", action="store_true", help="start `python -m server` (tiny-flux, tiny-wan) here")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--duration-s", type=float, default=600.0, help="soak length")
    parser.add_argument("--sample-s", type=float, default=None, help="soak sampling period (default duration/60)")
    parser.add_argument("--queue-size", type=int, default=32, help="the server's ACCEL_QUEUE_SIZE")
    parser.add_argument("--max-batch-size", type=int, default=4, help="the server's ACCEL_MAX_BATCH_SIZE")
    parser.add_argument("--burst-factor", type=int, default=10)
    parser.add_argument("--pid", type=int, default=None, help="with --url: the server's process id, for /proc")
    parser.add_argument("--server-log", type=Path, default=None, help="with --url: the server's JSON log file")
    parser.add_argument("--image-model", default=None, help="default: the first text-to-image model served")
    parser.add_argument("--video-model", default=None, help="default: the first text-to-video model served")
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--steps", type=int, default=4, help="image steps")
    parser.add_argument("--video-steps", type=int, default=50, help="video steps (at most 50: progress is in %%)")
    parser.add_argument("--video-cancels", type=int, default=3, help="video jobs deleted after their first progress")
    parser.add_argument("--video-refs", type=int, default=1, help="full jobs that give the time per step")
    parser.add_argument("--request-timeout-s", type=float, default=300.0)
    parser.add_argument("--ready-timeout-s", type=float, default=300.0)
    parser.add_argument("--max-fd-growth", type=int, default=16)
    parser.add_argument("--max-thread-growth", type=int, default=8)
    parser.add_argument("--api-key", default=os.environ.get("LOADTEST_API_KEY"))
    args = parser.parse_args(argv)
    args.sample_s = args.sample_s or max(1.0, args.duration_s / 60)
    args.tag = f"overload-{secrets.token_hex(4)}"  # request ids unique across runs that share one server log
    if not 2 <= args.video_steps <= 50:
        parser.error("--video-steps must be 2..50")
    if args.url and httpx.URL(args.url).host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("--url must be on this machine (127.0.0.1 or localhost)")
    args.out.mkdir(parents=True, exist_ok=True)
    served = None
    if args.serve:
        served = Served(args, args.out / "server.log")
        served.wait_ready(args.ready_timeout_s)
    try:
        url, pid = (served.url, served.pid) if served else (args.url.rstrip("/"), args.pid)
        log_path = served.log_path if served else args.server_log
        report = asyncio.run(run(args, url, pid, log_path))
    finally:
        if served:
            served.stop()
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    (args.out / "report.md").write_text(markdown(report))
    print((args.out / "report.md").read_text())
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
