"""The allocation service under load (issue 15): plan requests per second and latency at 1, 8 and
64 concurrent clients against one stored SmolLM2 profile, the server's memory, and the time
from ``POST /v1/profiles`` to done against the same profile made by the CLI.

Starts a real ``bitalloc serve`` on a loopback ephemeral port (a fresh state dir), uploads
the profile, then for each concurrency level sends

* ``fresh`` requests: every request a budget not asked before (2.5-4.5 bpw in small steps),
  so each one is a real ILP solve (HiGHS) on the stored profile;
* ``stored`` requests: the same few requests again, answered from the content-addressed
  plan store (what a team asking for the usual budgets gets).

    python experiments/service_benchmark.py --profile /tmp/smollm2-profile.json
    python experiments/service_benchmark.py --profile P.json --job-include 'model.layers.2[7-9].*'   # smaller job
    python experiments/service_benchmark.py --profile P.json --job-full    # the default SmolLM2 profile (minutes)

Writes ``experiments/results/service/service_benchmark.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

OUT = Path(__file__).resolve().parent / "results" / "service"


def start_server(state: Path) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-m", "bitalloc.allocator.cli", "serve", "--port", "0", "--state-dir", str(state)],
                         stdout=subprocess.PIPE, stderr=open(state.parent / "server.log", "ab"), text=True)
    line = p.stdout.readline()
    if "listening on" not in line:
        p.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return p, line.split("listening on ")[1].split()[0]


def rss_mb(pid: int) -> dict:
    proc = psutil.Process(pid)
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next((int(x.split()[1]) / 1024 for x in status.splitlines() if x.startswith("VmHWM")), None)
    return {"rss_mb": round(proc.memory_info().rss / 2**20, 1), "peak_rss_mb": round(hwm, 1) if hwm else None}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


async def load(url: str, bodies: list[dict], clients: int) -> dict:
    """``clients`` concurrent clients, each sending its share of ``bodies`` one after another."""
    lat: list[float] = []
    codes: dict[int, int] = {}
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        async def client() -> None:
            while True:
                try:
                    b = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t = time.perf_counter()
                r = await http.post("/v1/plans", json=b)
                lat.append(time.perf_counter() - t)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(bodies), "wall_s": round(wall, 3), "req_per_s": round(len(bodies) / wall, 2),
            "p50_ms": round(1000 * statistics.median(lat), 1), "p99_ms": round(1000 * pct(lat, 0.99), 1),
            "max_ms": round(1000 * max(lat), 1), "status": codes}


def plan_benchmark(url: str, pid: str, levels: list[int], fresh_n: dict, stored_n: dict) -> list[dict]:
    rows = []
    k = 0
    for c in levels:
        bodies = []
        for _ in range(fresh_n[c]):
            bodies.append({"profile": pid, "budget": f"{2.5 + 0.0007 * k:.4f}bpw"})
            k += 1
        r = asyncio.run(load(url, bodies, c))
        rows.append({"mode": "fresh (ILP solve)", **r})
        print(rows[-1], flush=True)
        common = [{"profile": pid, "budget": b} for b in ("3bpw", "3.5bpw", "4bpw", "4.5bpw")]
        asyncio.run(load(url, common, 1))  # solved once before timing: these are the stored answers
        bodies = [common[i % len(common)] for i in range(stored_n[c])]
        r = asyncio.run(load(url, bodies, c))
        rows.append({"mode": "stored (same request)", **r})
        print(rows[-1], flush=True)
    return rows


def job_benchmark(url: str, args: list[str], request: dict, work: Path) -> dict:
    """CLI wall time of `bitalloc profile ARGS`, then POST /v1/profiles -> done for the same request."""
    import resource

    out = work / "cli-profile.json"
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bitalloc.allocator.cli", "--quiet", "profile", *args, "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    cli_s = time.perf_counter() - t
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cli_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    http = httpx.Client(base_url=url, timeout=60)
    t = time.perf_counter()
    job = http.post("/v1/profiles", json=request).json()
    while True:
        j = http.get(f"/v1/jobs/{job['id']}").json()
        if j["state"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.5)
    svc_s = time.perf_counter() - t
    if j["state"] != "done":
        raise SystemExit(f"service job failed: {j}")
    svc = http.get(f"/v1/artifacts/{j['result']['profile_id']}").json()
    cli = json.loads(out.read_text())
    same = all(svc[k] == cli[k] for k in ("tables", "proxy", "ref_values", "cost_bits", "schemes", "layers"))
    w = j["result"].get("worker") or {}
    return {"cli_s": round(cli_s, 1), "service_s": round(svc_s, 1), "overhead_s": round(svc_s - cli_s, 1),
            "cli_cpu_s": round(cli_cpu, 1), "service_worker_cpu_s": w.get("cpu_s"),
            "service_worker_wall_s": w.get("wall_s"), "service_worker_peak_rss_mb": w.get("peak_rss_mb"),
            "cli_peak_rss_mb": round(ru1.ru_maxrss / 1024, 1),
            "same_tables": same, "cli_args": args, "request": request, "n_layers": len(cli["layers"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", required=True, help="a SmolLM2 profile JSON (bitalloc profile --model smollm2)")
    ap.add_argument("--levels", default="1,8,64")
    ap.add_argument("--job-include", default="model.layers.2[7-9].*",
                    help="layers of the profiling-job comparison (default: the last 3 blocks, the cheapest to "
                         "measure: a layer's KL replays only the blocks from its own on)")
    ap.add_argument("--job-full", action="store_true", help="compare the default SmolLM2 profile (all layers)")
    ap.add_argument("--job-model", default="smollm2",
                    help="model of the profiling-job comparison (e.g. random:llama-tiny with --job-include '')")
    ap.add_argument("--skip-job", action="store_true")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--name", default=None, help="results file name (default service_benchmark[_full_job].json)")
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    fresh_n = {c: max(16, 2 * c) for c in levels}
    stored_n = {c: max(200, 10 * c) for c in levels}
    work = Path(tempfile.mkdtemp(prefix="bitalloc-svc-bench-"))
    proc, url = start_server(work / "state")
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": os.uname().nodename,
                 "cpus": os.cpu_count(), "profile": a.profile, "command": " ".join(sys.argv)}
    try:
        http = httpx.Client(base_url=url, timeout=600)
        res["memory_idle"] = rss_mb(proc.pid)
        import bitalloc

        body = bitalloc.load_profile(a.profile).to_json_bytes()  # the self-contained form (a CLI file's sidecar inline)
        t = time.perf_counter()
        up = http.post("/v1/profiles/upload", content=body, headers={"content-type": "application/json"})
        up.raise_for_status()
        pid = up.json()["id"]
        res["upload_s"] = round(time.perf_counter() - t, 3)
        res["profile_bytes"] = len(body)
        t = time.perf_counter()
        first = http.post("/v1/plans", json={"profile": pid, "budget": "3.25bpw"})
        first.raise_for_status()
        res["first_plan_s"] = round(time.perf_counter() - t, 3)  # loads the profile into the cache, then solves
        res["first_plan_solver_s"] = first.json()["solver"]["solve_time_s"]
        res["plans"] = plan_benchmark(url, pid, levels, fresh_n, stored_n)
        res["memory_after_plans"] = rss_mb(proc.pid)
        if not a.skip_job:
            sub = not a.job_full and a.job_include
            args = ["--model", a.job_model] + (["--include", a.job_include] if sub else [])
            request = {"model": a.job_model, **({"include": [a.job_include]} if sub else {})}
            res["profile_job"] = job_benchmark(url, args, request, work)
            print(res["profile_job"], flush=True)
            res["memory_after_job"] = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = a.name or ("service_benchmark.json" if not a.job_full else "service_benchmark_full_job.json")
    (out / name).write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nplan requests against one stored SmolLM2 profile ({res['profile_bytes'] / 1e6:.1f} MB; "
          f"upload {res['upload_s']:.2f}s, first plan {res['first_plan_s']:.2f}s)")
    print(f"{'mode':<24}{'clients':>8}{'requests':>9}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for r in res["plans"]:
        print(f"{r['mode']:<24}{r['clients']:>8}{r['requests']:>9}{r['req_per_s']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}")
    print(f"server memory: idle {res['memory_idle']}, after plans {res['memory_after_plans']}"
          + (f", after the job {res.get('memory_after_job')}" if "memory_after_job" in res else ""))
    if "profile_job" in res:
        j = res["profile_job"]
        print(f"profile job ({j['n_layers']} layers): CLI {j['cli_s']}s wall / {j['cli_cpu_s']} CPU-s, "
              f"POST /v1/profiles -> done {j['service_s']}s wall (worker {j['service_worker_cpu_s']} CPU-s), "
              f"same tables: {j['same_tables']}")
    print(f"-> {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
