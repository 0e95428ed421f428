"""DeepSparse in its own process (its own virtual environment: it pins old packages), driven over stdin/stdout.

    <venv>/bin/python benchmarks/deepsparse_worker.py

Commands, one per line; each answer is one JSON line:
- ``load PATH BATCH THREADS INPUT.npy`` compiles the ONNX file (``deepsparse.compile_model``) for that batch and
  core count and keeps the input -> ``{"ok": true, "version": ...}``
- ``run`` runs the engine once on the input -> ``{"ok": true}`` (the caller times the round trip)
- ``out OUTPUT.npy`` writes the engine's output on the input -> ``{"ok": true}``
- ``quit``
This file imports nothing from sparsifx: it runs under a different Python environment.
"""

import json
import sys

import numpy as np


def main() -> None:
    import deepsparse

    engine, x = None, None
    for line in sys.stdin:
        cmd, *args = line.split()
        try:
            if cmd == "load":
                path, batch, threads, inp = args[0], int(args[1]), int(args[2]), args[3]
                engine = deepsparse.compile_model(path, batch_size=batch, num_cores=threads)
                x = np.load(inp)
                engine([x])
                reply = {"ok": True, "version": deepsparse.__version__}
            elif cmd == "run":
                engine([x])
                reply = {"ok": True}
            elif cmd == "out":
                np.save(args[0], engine([x])[0])
                reply = {"ok": True}
            elif cmd == "quit":
                return
            else:
                reply = {"ok": False, "error": f"unknown command {cmd}"}
        except Exception as exc:  # reported to the caller, which records the cell as failed
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
