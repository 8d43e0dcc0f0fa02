"""`ebt export`, `ebt generate` and `ebt serve`: the serving side of the command line."""
from __future__ import annotations

import argparse
import sys


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    export_checkpoint(args.source, args.out)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .export import load_export
    from .generate import EBTInference

    export = load_export(args.export_dir)
    tokenizer = export.tokenizer()
    engine = EBTInference(export.model, export.thinking)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("--prompt encodes to no tokens")
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    emitted: list = []
    shown = ""
    for token in engine.generate_iter(
        ids, args.max_tokens, steps=args.steps, num_samples=args.samples, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, step_size=args.step_size,
        early_stop_tol=args.early_stop_tol, mode=args.mode,
    ):
        emitted.append(token)
        text = tokenizer.decode(emitted)  # decode the whole tail: BPE pieces may merge
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .export import load_export
    from .serve import Limits, serve

    limits = Limits(max_tokens=args.max_tokens, max_concurrent=args.max_concurrent,
                    request_timeout_s=args.request_timeout)
    httpd = serve(load_export(args.export_dir), args.host, args.port, limits)
    host, port = httpd.server_address[:2]
    print(f"serve: listening on http://{host}:{port} (GET /health, GET /v1/models, POST /v1/completions)",
          flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
    return 0


def add_inference_subcommands(sub) -> None:
    p = sub.add_parser("export", help="consolidate a checkpoint into a verified serving export",
                       description="Writes model.safetensors, config.json, thinking.json, tokenizer.json, the Hugging Face "
                       "files (remote code, tokenizer_config.json, generation_config.json) and export.json to --out, "
                       "then reloads them and checks the checksums and probe energies.")
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("--out", required=True, help="new folder for the export")
    p.set_defaults(func=cmd_export)

    def thinking_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--steps", type=int, default=None, help="thinking steps per token (default: the export's)")
        p.add_argument("--samples", type=int, default=None, help="best-of-G by final energy (default: 1)")
        p.add_argument("--step-size", type=float, default=None, help="override the learned step size alpha")
        p.add_argument("--early-stop-tol", type=float, default=None, help="stop thinking when energy falls less")

    p = sub.add_parser("generate", help="generate text from an export with thinking",
                       description="Streams a continuation of --prompt; every token is found by energy descent.")
    p.add_argument("export_dir", metavar="EXPORT_DIR")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    thinking_args(p)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=["kv", "recompute", "reference"], default="kv",
                   help="kv: KV cache (default); recompute: context re-run every step; reference: the public "
                   "reference's full recompute (same tokens, slower)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve an export over an OpenAI-compatible HTTP API (POST /v1/completions)",
                       description="OpenAI-compatible completions (stream, n, best_of = best-of-G by energy) plus "
                       "the EBT fields thinking_steps, step_size, early_stop_tol; see docs/serving.md.")
    p.add_argument("export_dir", metavar="EXPORT_DIR")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-concurrent", type=int, default=32, help="requests generated at once (more get 429)")
    p.add_argument("--request-timeout", type=float, default=120.0,
                   help="seconds a request may run; then it ends with the tokens so far")
    p.set_defaults(func=cmd_serve)
