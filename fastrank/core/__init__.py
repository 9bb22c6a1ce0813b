"""The core layer: what every op family and every public function shares.

It imports nothing from the rest of fastrank (tests/test_layers.py checks it):

* validate   argument checks whose errors name the function and the argument
* params     the op parameters (StepParams of the rank sums, HistParams of the histograms)
* step       the step functions and their derivatives in PyTorch (docs/design.md §1.1)
* problem    user inputs (relevance or labels, ignore) to the packed problem, and back
* chunks     the block sizes of the chunked PyTorch backends
* epilogue   what the losses share after the op: safe division, NaN per query, reduction
* extension  loads the compiled fastrank._C once, with the reason when it cannot
* backend    which backend runs a call (the one reader of TRITON_INTERPRET)
* registry   the table of op families and the autograd glue of every backend
"""
