"""tether_protocol: the contract between tetherfed workers and the coordinator.

Pure functions on numpy arrays, no I/O and no torch:

- `messages`: pydantic models of everything on the wire (policy, registration, snapshot metadata,
  decisions, acks, REST views);
- `frame`: the safetensors tensor frame a publish travels in, with strict validation;
- `compat`: dot / cosine / pearson compatibility of all pairs from one Gram matrix;
- `policy`: the pure decision function (trigger, thresholds, budgets, cooldowns, pairing);
- `operators`: merge (average, weighted) and drift (repel, decouple), the numpy reference;
- `sketch`: count sketches of large tethers, scores estimated on them, the sketch frame.
"""

from .compat import CompatibilityMatrix, all_pairs, gram_scores, pair_score
from .frame import (
    ByteLengthError,
    DTypeError,
    Frame,
    FrameError,
    HeaderError,
    HeaderLengthError,
    LayerMismatchError,
    MetadataError,
    NonFiniteError,
    RangeError,
    ShapeError,
    decode_frame,
    encode_frame,
    encode_parts,
)
from .messages import (
    PROTOCOL_VERSION,
    AckCreate,
    AckItem,
    AckResult,
    AcksCreate,
    AcksPublic,
    Decision,
    FederationCreate,
    Heartbeat,
    LayerSpec,
    Policy,
    PolicyPatch,
    SketchPolicy,
    SnapshotMeta,
    SnapshotRef,
    WorkerCreate,
    policy_preset,
    seed_policy,
)
from .operators import OperatorError, apply_operator
from .policy import DecisionDraft, FederationState, PeerState, Round, decide
from .sketch import LayerSketch, decode_sketch_frame, encode_sketch_frame, sketch_layer

__all__ = [
    "PROTOCOL_VERSION",
    "AckCreate",
    "AckItem",
    "AckResult",
    "AcksCreate",
    "AcksPublic",
    "ByteLengthError",
    "CompatibilityMatrix",
    "DTypeError",
    "Decision",
    "DecisionDraft",
    "FederationCreate",
    "FederationState",
    "Frame",
    "FrameError",
    "HeaderError",
    "HeaderLengthError",
    "Heartbeat",
    "LayerMismatchError",
    "LayerSketch",
    "LayerSpec",
    "MetadataError",
    "NonFiniteError",
    "RangeError",
    "OperatorError",
    "PeerState",
    "Policy",
    "PolicyPatch",
    "Round",
    "ShapeError",
    "SketchPolicy",
    "SnapshotMeta",
    "SnapshotRef",
    "WorkerCreate",
    "all_pairs",
    "apply_operator",
    "decide",
    "decode_frame",
    "decode_sketch_frame",
    "encode_frame",
    "encode_parts",
    "encode_sketch_frame",
    "gram_scores",
    "pair_score",
    "policy_preset",
    "seed_policy",
    "sketch_layer",
]
