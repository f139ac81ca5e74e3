"""Runs a list of megadigpt commands one after the other inside one process per rank (``torchrun`` starts it), so a
matrix of runs pays the interpreter, DeepSpeed import and process-group start-up once, not once per run.

    python -m torch.distributed.run --nproc_per_node 2 tests/config_matrix_runner.py PLAN.json RESULTS.json

PLAN.json: ``[{"name": ..., "argv": [...], "env": {...}}, ...]``; each entry is ``megadigpt.cli.main(argv)`` with
``env`` set for its duration. RESULTS.json (rank 0): ``{name: {"exit": code, "seconds": s, "error": text}}``,
rewritten after every run, so a run that kills the process still leaves the results of those before it."""

import json
import os
import sys
import time
import traceback


def main(plan_path: str, out_path: str) -> None:
    import torch.distributed as dist

    from megadigpt.cli import main as cli_main

    # one process group for the whole matrix: each command ends by destroying it, after which DeepSpeed's cached
    # groups refer to a dead one; the barrier before it still runs, so the runs stay in step
    dist.destroy_process_group = lambda *a, **k: None

    plan = json.loads(open(plan_path).read())
    rank = int(os.environ.get("RANK", 0))
    results = {}
    for run in plan:
        saved = {k: os.environ.get(k) for k in run.get("env", {})}
        os.environ.update(run.get("env", {}))
        t0, error = time.monotonic(), None
        try:
            code = cli_main(run["argv"])
        except SystemExit as e:
            code = e.code
        except Exception:  # noqa: BLE001 - recorded, the next run goes on
            code, error = "traceback", traceback.format_exc()[-4000:]
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        results[run["name"]] = {"exit": code, "seconds": round(time.monotonic() - t0, 2), "error": error}
        if rank == 0:
            with open(out_path + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(out_path + ".tmp", out_path)
        print(f"[matrix] rank {rank} {run['name']}: exit {code} in {results[run['name']]['seconds']} s", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # zero.Init's gloo work threads can abort the interpreter's exit


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
