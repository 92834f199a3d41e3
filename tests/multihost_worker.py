"""One process of the multi-process test (tests/test_multihost.py), also run alone as the
1-process reference: join the job from DISTGAME_* env, train the ci proxy (the tiniest model) a few sharded
steps with Trainer.fit (process 0 writes metrics/summary, all write the checkpoint), then
sample (non-greedy) on a sharded batch of test prompts and print the gathered tokens; then
check that a stop request seen by one process only is agreed by all (preemption).

    python tests/multihost_worker.py RUN_DIR [key=value ...]
"""

import json
import sys
import time

from experiments.config import load_config
from experiments.distributed import initialize_distributed


def main(run_dir: str, overrides: list[str]) -> None:
    cfg = load_config("ci", [f"run_dir={run_dir}", *overrides])
    initialize_distributed(cfg.distributed)  # before any other jax call

    import jax
    import numpy as np

    from experiments import preemption
    from experiments.evaluate import decode_problems
    from experiments.tasks.arithmetic import make_split
    from experiments.train import Trainer, make_mesh

    trainer = Trainer(cfg, "proxy", make_mesh(cfg))
    summary = trainer.fit(progress=False)
    problems = make_split(cfg.task, "test", cfg.seed, 16)
    decoded = decode_problems(
        problems,
        trainer.tokenizer,
        (trainer.model.spec,),
        (trainer.state["params"],),
        trainer.mesh,
        max_new_tokens=8,
        batch_size=16,
        greedy=False,
        rng=jax.random.key(7),
    )
    # Cost of the per-step preemption agreement (an all-gather of one flag across processes).
    start = time.perf_counter()
    for _ in range(20):
        preemption.stop_requested()
    agree_ms = (time.perf_counter() - start) / 20 * 1e3
    before = preemption.stop_requested()
    if jax.process_index() == jax.process_count() - 1:
        preemption.request_stop()  # only the last process "got SIGTERM": every process must agree to stop
    agreed = preemption.stop_requested()
    print(
        json.dumps(
            {
                "process": jax.process_index(),
                "processes": jax.process_count(),
                "devices": jax.device_count(),
                "test_accuracy": summary["test_accuracy"],
                "tokens": np.asarray(decoded.tokens_bn).tolist(),
                "logprob_sum": float(np.sum(decoded.logprob_bn)),
                "agree_ms": agree_ms,
                "stop_before": before,
                "stop_agreed": agreed,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
