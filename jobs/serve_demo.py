"""The last stage of `make run`: serve the fine-tuned SEMINAR, score 10 candidates for a real user over HTTP, print
the answer and shut Serve down (docs/design.md, Serving).

    python jobs/serve_demo.py --checkpoint RUN_OR_CKPT --index INDEX_DIR --data DATA_DIR [--port 8000]

Uses the Ray cluster already initialised in this process, else starts an embedded local one. HTTP binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile


def demo_request(data: str, n_candidates: int = 10) -> dict:
    """A user with the longest history, their last item among `n_candidates` (the rest taken from the catalogue)."""
    from seminar_ray.data.schema import DatasetMeta, read_table

    seqs = read_table(data, "sequences", ["user_id", "item_ids", "query_ids"]).to_pylist()
    user = max(seqs, key=lambda r: len(r["item_ids"]))
    last = user["item_ids"][-1]
    n_items = DatasetMeta.load(data).num_items
    others = [i for i in range(1, n_items + 1) if i != last][: n_candidates - 1]
    return {
        "user_id": user["user_id"],
        "query": user["query_ids"][-1],
        "candidates": [last, *others],
        "return_topk": False,
    }


def main(argv: list[str] | None = None) -> int:
    exchange = serve_and_score(argv)
    print(json.dumps(exchange, indent=1))
    return 0 if exchange["status"] == 200 else 1


def serve_and_score(argv: list[str] | None = None) -> dict:
    """Start the application, score the demo request over HTTP, shut Serve down: {request, status, response}."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint or run directory of a fine-tuned SEMINAR")
    ap.add_argument("--index", required=True, help="index directory from jobs/build_index.py")
    ap.add_argument("--data", required=True, help="dataset directory the model was trained on")
    ap.add_argument("--store", default=None, help="history log directory (default: a fresh temporary one)")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)

    import httpx
    from ray import serve

    from serve_app.deploy import start

    store = args.store or tempfile.mkdtemp(prefix="seminar_history_")
    start(
        {"checkpoint": args.checkpoint, "index": args.index, "data": args.data, "store": store},
        host="127.0.0.1",
        port=args.port,
    )
    try:
        body = demo_request(args.data)
        with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=30) as client:
            answer = client.post("/v1/score", json=body)
        return {"request": body, "status": answer.status_code, "response": answer.json()}
    finally:
        serve.shutdown()


if __name__ == "__main__":
    sys.exit(main())
