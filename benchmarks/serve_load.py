"""``losa serve`` under load: 1, 4 and 16 concurrent streaming clients against one server.

Run (budget: under 4 minutes on 2 cores once the kernel is built, most of it the 16-client level):
    OMP_WAIT_POLICY=PASSIVE python benchmarks/serve_load.py --model runs/r70/export

The server is ``losa serve`` in a process of its own (as a user runs it; its Python threads do not share
this process's interpreter lock), bound to 127.0.0.1 on a free port, packed int8 by default.  Without
``--model`` it serves SmolLM2-135M pruned to 70% by magnitude (each block linear's smallest weights)
in memory and saved to a temporary folder.  Each client is a thread with its own official ``openai``
client; at each level all clients start together and each sends ``--requests`` streamed completions
of a fixed prompt of ``--prompt-tokens`` token ids (a different slice of ``wiki-sample.txt`` per
request), greedy, ``--max-tokens`` new tokens.  Reported per level: completion tokens per second over
the level's wall time, time to first token and whole-request latency (p50/p90/p99), failed requests
(must be 0), and the CPU seconds the server process used per second of wall time.  The server
generates one request at a time, so with more clients the throughput stays and the latency grows with
the queue.  Writes benchmarks/results/serve_load.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from common import SHARED_DATA, environment, write_json

RESULTS = Path(__file__).parent / "results" / "serve_load.json"
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder to serve (default: SmolLM2-135M, 70%% magnitude, temp folder)")
    parser.add_argument("--kernel", default="int8", choices=("int8", "bf16", "fp32", "off"))
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="the server's CPU threads")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per client at each level (default: 16 / 8 / 4 for 1 / 4 / 16 clients)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        model = args.model or pruned_smollm(Path(tmp) / "smollm2-135m-magnitude70")
        prompts = prompt_ids(model, args.prompt_tokens, sum(c * requests_at(c, args.requests) for c in levels) + 2)
        port = free_port()
        log_path = Path(tmp) / "server.log"
        with open(log_path, "w") as log:
            server = start_server(model, port, args, log)
            try:
                rows, load = run_levels(f"http://127.0.0.1:{port}/v1", server.pid, levels, prompts, args)
            finally:
                server.send_signal(signal.SIGINT)  # Ctrl-C: the server's normal way to stop
                server.wait(30)
        server_log = log_path.read_text()
    stopped = [line for line in server_log.splitlines() if line.startswith("stopped:")]
    command = ("OMP_WAIT_POLICY=PASSIVE python benchmarks/serve_load.py"
               + (f" --model {args.model}" if args.model else "")
               + f" --kernel {args.kernel} --threads {args.threads} --clients {args.clients}"
               + (f" --requests {args.requests}" if args.requests else "")
               + f" --prompt-tokens {args.prompt_tokens} --max-tokens {args.max_tokens}")
    env = environment()
    write_json(RESULTS, {"command": command, "model": args.model or "SmolLM2-135M, magnitude 70% (temp folder)",
                         "kernel": args.kernel, "server_threads": args.threads, "prompt_tokens": args.prompt_tokens,
                         "max_tokens": args.max_tokens, "rows": rows, "load_average": load,
                         "server_stopped": stopped[-1] if stopped else None, "environment": env})
    print(f"{env['machine']['cpu']}, {env['machine']['cores']} cores; server: {args.kernel} kernel, "
          f"{args.threads} threads; load average {load['before'][0]:.2f} before, {load['after'][0]:.2f} after")
    print(f"{command}\n")
    print(markdown(rows))
    if stopped:
        print(f"\nserver: {stopped[-1]}")


def requests_at(clients: int, requests: int | None) -> int:
    """Requests per client (default: 16 alone, else 32 shared out but at least 4 each): bounded work per level."""
    return requests if requests else 16 if clients == 1 else max(4, 32 // clients)


def pruned_smollm(folder: Path) -> str:
    """SmolLM2-135M with 70% of each block linear's weights zeroed by magnitude, saved to ``folder``."""
    import torch

    from losa_cli.core.modeling import load_model

    loaded = load_model("smollm2-135m")
    with torch.no_grad():
        for name, module in loaded.model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                weight = module.weight
                cut = weight.abs().flatten().kthvalue(int(0.7 * weight.numel())).values
                weight.masked_fill_(weight.abs() <= cut, 0.0)
    loaded.model.save_pretrained(folder, safe_serialization=True)
    loaded.tokenizer.save_pretrained(folder)
    return str(folder)


def prompt_ids(model: str, length: int, count: int) -> list[list[int]]:
    """``count`` prompts of exactly ``length`` token ids: consecutive slices of the evaluation text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = (SHARED_DATA / "wiki-sample.txt").read_text(encoding="utf-8")[: 8 * length * count]  # ~4 chars a token
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < length * count:
        raise SystemExit(f"wiki-sample.txt holds {len(ids)} tokens; {count} prompts of {length} need more")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, port: int, args: argparse.Namespace, log) -> subprocess.Popen:
    """``losa serve`` in its own process; returns once /health answers (the kernel may build first)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", "from losa_cli.cli import main; main()", "serve", model, "--port", str(port),
               "--kernel", args.kernel, "--threads", str(args.threads), "--max-queue", "64", "--model-name", "bench"]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"losa serve exited with {server.returncode}; its log: {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if json.load(answer)["status"] == "ok":
                    return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("losa serve did not answer within 10 minutes")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_request(client, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion: seconds to the first text and to the end, and the completion tokens."""
    started = time.perf_counter()
    first, tokens = None, 0
    stream = client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - started
    return {"ttft_s": first if first is not None else total, "latency_s": total, "tokens": tokens}


def client(url: str):
    import openai

    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)


def run_levels(url: str, pid: int, levels: list[int], prompts: list[list[int]],
               args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Each level in turn, after two warm-up requests (cache allocation, first touches); and the load average
    before and after."""
    warm = client(url)
    for prompt in prompts[:2]:
        one_request(warm, prompt, args.max_tokens)
    queue = iter(prompts[2:])
    rows = []
    load_before = os.getloadavg()
    for clients in levels:
        per_client = requests_at(clients, args.requests)
        work = [[next(queue) for _ in range(per_client)] for _ in range(clients)]
        rows.append(run_level(url, pid, work, args.max_tokens))
    return rows, {"before": load_before, "after": os.getloadavg()}


def run_level(url: str, pid: int, work: list[list[list[int]]], max_tokens: int) -> dict:
    """One thread per client, all released together, each sending its prompts one after another."""
    results: list[dict] = []
    failures: list[str] = []
    gate = threading.Barrier(len(work) + 1)

    def run(mine: list[list[int]]) -> None:
        own = client(url)
        gate.wait()
        for prompt in mine:
            try:
                results.append(one_request(own, prompt, max_tokens))
            except Exception as exc:  # noqa: BLE001 - counted and reported, the level goes on
                failures.append(f"{type(exc).__name__}: {exc}"[:200])

    threads = [threading.Thread(target=run, args=(mine,)) for mine in work]
    for thread in threads:
        thread.start()
    cpu_before = cpu_seconds(pid)
    gate.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return level_row(len(work), len(work[0]), results, failures, wall, cpu_seconds(pid) - cpu_before)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (``q`` in 0..100) of ``values``; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, -(-len(ordered) * q // 100) - 1))]


def level_row(clients: int, per_client: int, results: list[dict], failures: list[str], wall: float,
              cpu: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    row = {"clients": clients, "requests": clients * per_client, "failed": len(failures),
           "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
           "server_cpu_per_wall_s": cpu / wall, "failures": failures[:3]}
    for name in ("ttft_s", "latency_s"):
        values = [r[name] for r in results]
        for q in (50, 90, 99):
            row[f"{name[:-2]}_p{q}_ms"] = percentile(values, q) * 1000
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| clients | requests | failed | tokens/s | TTFT p50 / p90 / p99 (ms) | latency p50 / p90 / p99 (ms) "
             "| server CPU (cores) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['failed']} | {r['tokens_per_s']:.1f} "
                     f"| {r['ttft_p50_ms']:.0f} / {r['ttft_p90_ms']:.0f} / {r['ttft_p99_ms']:.0f} "
                     f"| {r['latency_p50_ms']:.0f} / {r['latency_p90_ms']:.0f} / {r['latency_p99_ms']:.0f} "
                     f"| {r['server_cpu_per_wall_s']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
