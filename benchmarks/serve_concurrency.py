"""Concurrent throughput of `ebt serve`: C clients (the official `openai` client) on 127.0.0.1 send
completions in a loop for D seconds; prints requests, errors, p50/p99 latency and generated tokens/s.

    python benchmarks/serve_concurrency.py EXPORT_DIR --clients 16 --seconds 10 --max-tokens 8

Without EXPORT_DIR it trains configs/experiments/test_tiny.yaml for 2 steps and exports it to a temp dir.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import openai

from pretrain.export import export_checkpoint, load_export
from pretrain.serve import Limits, serve


def tiny_export(root: Path) -> Path:
    from pretrain.config import load_config
    from pretrain.trainer import train

    train(load_config(["test_tiny"], [f"run_dir={root / 'run'}", f"data.cache_dir={root / 'cache'}",
                                      "train.max_steps=2", "model.max_seq_len=64"]))
    return export_checkpoint(root / "run", root / "export", log=lambda *_: None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir", nargs="?")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = Path(args.export_dir) if args.export_dir else tiny_export(Path(tmp))
        httpd = serve(load_export(export_dir), "127.0.0.1", 0, Limits(max_concurrent=args.clients), quiet=True)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        port = httpd.server_address[1]
        latencies, tokens, errors = [], [], []
        stop_at = time.monotonic() + args.seconds

        def worker(i: int) -> None:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                try:
                    r = client.completions.create(model="m", prompt=f"Client {i} says", max_tokens=args.max_tokens)
                except Exception as err:  # noqa: BLE001 - counted
                    errors.append(repr(err))
                    continue
                latencies.append(time.perf_counter() - t0)
                tokens.append(r.usage.completion_tokens)

        start = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        wall = time.perf_counter() - start
        httpd.shutdown()
        httpd.server_close()
    lat = sorted(latencies)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")
    print("| clients | max_tokens | requests | errors | p50 latency s | p99 latency s | tokens/s | requests/s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.clients} | {args.max_tokens} | {len(lat)} | {len(errors)} | "
          f"{statistics.median(lat) if lat else float('nan'):.3f} | {p99:.3f} | {sum(tokens) / wall:.1f} | "
          f"{len(lat) / wall:.2f} |")


if __name__ == "__main__":
    main()
