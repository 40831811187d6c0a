"""The wire protocol in one place: every record, config, array and metric key both sides use,
the named actions, and the per-message seed formulas.

The ClientApp, the strategies and the ServerApp import these names instead of spelling the
strings, so a key renamed here is renamed on both ends of the wire.
"""

from __future__ import annotations

# ---------------------------------------------------------------- records in a message's content
ARRAYS = "arrays"  # the model arrays (ArrayRecord), both ways
METRICS = "metrics"  # a reply's MetricRecord
CONFIG = "config"  # the server's ConfigRecord
UPLOAD = "upload"  # CollaFuse: a client's training triples
SPLIT = "split"  # CollaFuse: x_{t_c} to finish, and the server's reconstruction for the audit
SAMPLES = "samples"  # CollaFuse: the client's finished images
TRANSPORT = "transport"  # delta payload: a reply's ConfigRecord naming the version its update is on

# ---------------------------------------------------------------- keys of the server's config
SERVER_ROUND = "server-round"
REPORT_PARTS = "report-parts"  # comma-separated UNet parts a client must send back
STATE_RUN = "state-run"  # the run id whose node state a (resumed) run continues
T_CUT = "t-c"  # CollaFuse's cut; both sides check they derived the same one
SAMPLE_SEED = "sample-seed"
AUDIT_ROUND = "audit-round"
TRANSPORT_VERSION = "transport-version"  # delta payload: the reference version the arrays make
TRANSPORT_BASE = "transport-base"  # ... the version they apply to (-1: they are that version, whole)
INIT_DIGEST = "init-digest"  # ... version 0's fingerprint, for the node's seeded rebuild

# ---------------------------------------------------------------- array keys
PACKED = "packed"  # transport.pack: a record's arrays joined into one (fedapp.protocol.packing)
PACKED_LAYOUT = "packed-layout"  # ... and where each one starts
X_CUT = "x-cut"
AUDIT_X0 = "audit-x0"
IMAGES = "images"
UPLOAD_KEYS = ("x-t", "t", "target")  # CollaFuse's triple, in record order

# ---------------------------------------------------------------- metric keys
NUM_EXAMPLES = "num-examples"  # the weighting key of every reply
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
IDENTIFIERS = (PARTITION_ID, NUM_PARTITIONS)  # who replied; never averaged
DP_EPSILON = "dp-epsilon"  # client-level ε at privacy.delta after this round (the server's account)
DP_SGD_EPSILON = "dp-sgd-epsilon"  # sample-level ε at privacy.delta so far (each client's own account)
WORST_CASE = (DP_SGD_EPSILON,)  # metrics whose round value is the largest over clients, never a mean

# ---------------------------------------------------------------- named actions (CollaFuse)
COLLAFUSE = "collafuse"
COLLAFUSE_TRAIN = f"train.{COLLAFUSE}"
COLLAFUSE_EVALUATE = f"evaluate.{COLLAFUSE}"


# ---------------------------------------------------------------- seeds
def train_seed(seed: int, server_round: int, partition_id: int = 0) -> int:
    """A client's local-training generators in one round (the centralized baseline is partition 0)."""
    return seed * 1_000_003 + server_round * 1009 + partition_id


def server_train_seed(seed: int, server_round: int) -> int:
    """CollaFuse's server training on what it received in one round."""
    return seed * 1_000_003 + server_round


def upload_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The stochastic rounding of a client's quantized upload in one round."""
    return train_seed(seed, server_round, partition_id) + 500_009


def eval_seed(seed: int, partition_id: int) -> int:
    """A client's held-out loss: fixed over rounds, so rounds are compared on the same t and ε."""
    return seed + 7 * partition_id


def sample_seeds(seed: int, server_round: int, partition_id: int) -> tuple[int, int]:
    """(server, client) generator seeds of one client's split samples in one round.

    Keyed by partition id: Flower's node ids are drawn anew in every run.
    """
    base = (seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**62)
    return base, base + 1
