"""`python -m serve_app --checkpoint CKPT --index DIR --data DIR [--store DIR] [--port 8000] [--ingress direct]`.

Serves on 127.0.0.1. Starts an embedded local Ray when no cluster is running; Ctrl-C shuts Serve down cleanly.
`--ingress direct` starts that Ray in Serve's throughput-optimized mode (serve_app/deploy.py) and prints the ingress
replicas' own addresses, which answer faster than the proxy's port (the proxy keeps working too).
"""

import argparse
import time

from serve_app.deploy import APP_NAME, INGRESS_MODES, direct_urls, start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--index", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument(
        "--store",
        default="runs/history",
        help="history log directory, or redis://host:port/db (load it first: python -m jobs.load_histories)",
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--ingress", default="proxy", choices=INGRESS_MODES)
    args = ap.parse_args(argv)
    from ray import serve

    start(
        {"checkpoint": args.checkpoint, "index": args.index, "data": args.data, "store": args.store},
        host=args.host,
        port=args.port,
        ingress=args.ingress,
    )
    print(f"serving on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    if args.ingress == "direct":
        print(f"direct ingress replicas: {' '.join(direct_urls(APP_NAME))}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
