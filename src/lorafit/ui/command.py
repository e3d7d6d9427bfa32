"""`lorafit ui`: a web page to set up, preview, train, watch and try a fine-tune.

    lorafit ui                                  # http://127.0.0.1:7860/, runs in ./outputs
    lorafit ui --port 8080 --runs_dir runs --api_key secret    # open http://127.0.0.1:8080/#key=secret

The page is served by FastAPI on uvicorn, like `lorafit serve`, from files inside the package
(no asset from the internet). Training runs are `lorafit train` child processes; they keep going
when `lorafit ui` stops, and the page lists them again when it starts (see docs/ui.md).
"""

from __future__ import annotations

import argparse
import os
import sys

from lorafit.errors import UserError

DEFAULT_PORT = 7860  # Gradio's, LlamaBoard's: where people look for a fine-tuning page
DEFAULT_MAX_UPLOAD_MB = 1024  # larger data files are better given by their path on the machine


def build_parser() -> argparse.ArgumentParser:
    from lorafit.train.args import LorafitTrainingArguments

    default_runs = os.path.dirname(LorafitTrainingArguments.output_dir) or "."  # outputs/lorafit -> outputs
    parser = argparse.ArgumentParser(
        prog="lorafit ui",
        description="A web page to prepare a fine-tune (the lorafit train arguments, as a command line or YAML), "
                    "preview its data as lorafit data inspect shows it, run lorafit train and watch its curve, "
                    "stop and resume it, and chat with the adapter beside its base model.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to "
                             "the network: then set --api_key)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--api_key", default=os.environ.get("LORAFIT_API_KEY") or None,
                        help="require this key (default: $LORAFIT_API_KEY, else none); open the page as "
                             "http://HOST:PORT/#key=KEY")
    parser.add_argument("--runs_dir", default=default_runs,
                        help=f"the folder whose runs the page lists (default: {default_runs}, where "
                             "lorafit train's default --output_dir is)")
    parser.add_argument("--max_upload_mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest data file the page may upload, in MiB (default: {DEFAULT_MAX_UPLOAD_MB:g}); "
                             "a larger one can be given by its path on this machine")
    parser.add_argument("--log_level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def main(argv: list[str]) -> int:
    import uvicorn

    from lorafit.infer.serve import bind, is_loopback
    from lorafit.ui.app import UiState, create_app

    args = build_parser().parse_args(argv)
    if os.path.exists(args.runs_dir) and not os.path.isdir(args.runs_dir):
        raise UserError(f"--runs_dir {args.runs_dir}: not a folder")
    if not is_loopback(args.host) and not args.api_key:
        print(f"warning: listening on {args.host} without --api_key: anyone who can reach this port can train "
              "and read files on this machine", file=sys.stderr)
    sock = bind(args.host, args.port)
    if args.max_upload_mb <= 0:
        raise UserError(f"--max_upload_mb must be more than 0, got {args.max_upload_mb:g}")
    ui = UiState(args.runs_dir, max_upload_mb=args.max_upload_mb)
    app = create_app(ui, api_key=args.api_key)
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    key = f"#key={args.api_key}" if args.api_key else ""
    print(f"lorafit ui: open http://{shown_host}:{port}/{key}  (runs in {os.path.abspath(args.runs_dir)})",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        ui.chat.close()
        running = [run["name"] for run in ui.runs.listing() if run["running"]]
        if running:
            print(f"lorafit ui: still training, in their own processes: {', '.join(running)} "
                  "(the page lists them again when you restart it)", file=sys.stderr)
    return 0
