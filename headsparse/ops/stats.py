"""Old name of :mod:`headsparse.ops.gate_grads` (the gate-gradient recorder), kept only for
``headsparse.recipes.scoring.methods``, which still imports it from here; remove once it imports gate_grads."""
from .gate_grads import GateGradRecord, GateGradRecorder, current_recorder, record_gate_grads  # noqa: F401
