// Stand-in for a header that only CUDA builds of torch generate. Used by
// tools/cuda_check.sh (searched last, via -idirafter) so that the CUDA glue can be
// syntax-checked against a CPU-only torch; a CUDA torch's real header wins.
#pragma once
