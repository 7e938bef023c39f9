"""Exact decoding of modal filters h[t] = Re(sum_n r_n p_n^t) (+ skip at t = 0): the diagonal
recurrence with state n, O(n) per token.

`ModalRecurrence` (engine.py) is the product, with `OnlineConv`'s interface; reference.py holds
the plain-torch impulse response, prompt state and a step-by-step fp64 recurrence it is tested
against; triton_step.py the fused step. Triton is imported only when a Triton path runs.
"""
from .engine import ModalRecurrence
from .reference import ReferenceModalRecurrence, modal_impulse_response, modal_state

__all__ = ["ModalRecurrence", "ReferenceModalRecurrence", "modal_impulse_response", "modal_state"]
