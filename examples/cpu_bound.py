"""A CPU-bound sync handler: one request at a time per replica (GIL); scale with replicas, not threads."""
import hashlib
import os


def handler(request):
    rounds = int(request.query.get("rounds", "200000"))
    digest = b"rayfleet"
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return {"pid": os.getpid(), "rounds": rounds, "digest": digest.hex()[:16]}
