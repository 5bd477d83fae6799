"""How far a search loss may move when the same mask is computed another way.

On one machine, at one torch thread count, the same inputs give bit-identical
losses and policies. A loss computed in another batch composition (alone, or
stacked with other candidates in one forward, or resumed from another prefix
state after a checkpoint), at another thread count, or on another machine
(other BLAS kernels, other SIMD width) can differ in its last bits: float32
matmuls and reductions sum in an order that depends on the shapes and kernels.

Measured on the test suite's tiny FLUX model (12 steps, calibration losses from
1e-6 to 4e-3), the largest relative difference of a loss between CPU kernel
variants (AVX-512, AVX2, generic; MKL's conditional-numerical-reproducibility
mode) was 1.4e-5, for the smallest loss: the error of a loss grows as the loss
shrinks, since both latents carry the same float32 rounding. Losses of searched
budgets differed by 1e-6 or less. The tolerance leaves a margin of about 7 over
the worst case; it bounds losses that are not near zero (a mask that computes
nearly every step has a loss at float32 resolution and is compared in absolute
terms, like the full mask's zero).
"""

LOSS_RELATIVE_TOLERANCE = 1e-4
"""Relative difference allowed between two losses of the same mask computed on different
batch shapes, thread counts or machines; within one machine and thread count, the same
computation gives the same bits."""
