"""Run under the deepspeed launcher: ranks holding deliberately different valences must make the
same mercy-gate decision. Each rank writes OUT_DIR/rank_R.json."""

import json

from student_setup import student_engine  # the script's directory is on sys.path

from vkd_ds import dist
from vkd_ds.gate import MercyGate

out_dir, settings, prepared, engine = student_engine(seed=7)
rank = dist.rank()
gate = MercyGate(settings.gate, engine, None, prepared.tokenizer, prepared.train_data, 1, None, 48)
gate.state.baseline = 0.5
decisions = []
# (sum of student valence, positions) on each rank: rank 0 alone would accept, rank 1 alone reject.
for mine in ([(0.9 * 10, 10), (0.1 * 30, 30)], [(0.9 * 30, 30), (0.1 * 10, 10)]):
    valence_sum, count = mine[rank]
    # As the trainer does: the step's one read sums the ranks' valence sums, then the gate decides.
    total = dist.read_once([("valence", "sum", valence_sum), ("count", "sum", count)])
    projected, _ = gate.proxy_values(total["valence"], 0.0, total["count"])
    decisions.append(
        {
            "projected": projected,
            "rejected": gate.rejects(projected),
            "local_would_reject": gate.settings.proxy_factor * valence_sum / count < 0.9 * 0.5,
        }
    )
(out_dir / f"rank_{rank}.json").write_text(json.dumps(decisions))

# End as the ranks of a job do (launch.leave): the interpreter's C++ teardown with a gloo group alive
# aborted about one process in 60 ("terminate called without an active exception").
from vkd_ds.launch import leave  # noqa: E402

dist.barrier()
leave(0)
