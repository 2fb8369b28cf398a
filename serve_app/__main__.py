"""`python -m serve_app --checkpoint CKPT --index DIR --data DIR [--store DIR] [--port 8000]`: serve on 127.0.0.1.

Starts an embedded local Ray when no cluster is running; Ctrl-C shuts Serve down cleanly.
"""
import argparse
import time

from serve_app.deploy import start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--index", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--store", default="runs/history", help="history log directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--topology", default="merged", choices=("merged", "split"))
    args = ap.parse_args(argv)
    from ray import serve

    start({"checkpoint": args.checkpoint, "index": args.index, "data": args.data, "store": args.store,
           "topology": args.topology}, host=args.host, port=args.port)
    print(f"serving on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
