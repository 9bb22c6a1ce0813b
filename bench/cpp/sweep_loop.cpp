// One row of the fused AP sweeps (csrc/cpu/loss_sweeps.h) timed in a loop, single-threaded:
// the forward-only sweep against the sweep that stores for the gradient, plus the gradient
// sweep. Built and run by bench/sweep_loop.py (docs/design.md §2.4, "What the forward stores").
//
//   sweep_loop N REPS STEP    STEP 0: sigmoid (Smooth-AP, tau 0.01), 1: SupRank (ROADMAP's)
//
// One row of N float32 scores, uniform in [-0.3, 0.9), against a block of 4 positives; prints
// the minimum over REPS of each sweep in microseconds, one "key value" per line.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/loss_sweeps.h"

using namespace fastrank;
using namespace fastrank::cpu;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

template <int STEP>
int run(int64_t n, int reps) {
  const int64_t stride = padded_row(n);
  std::mt19937 gen(0);
  std::uniform_real_distribution<float> uni(-0.3f, 0.9f);
  std::vector<float> s(n);
  for (auto& x : s) x = uni(gen);
  std::vector<uint8_t> f(n + kFlagBytesPad, 0);
  std::fill(f.begin(), f.begin() + n, uint8_t(1));
  float sj[4];
  for (int p = 0; p < 4; ++p) {
    const int64_t col = (p * n) / 4;
    f[col] = 2;
    sj[p] = s[col];
  }
  const double tau = 0.01, rho = 100.0, delta = 0.05, start = 0.5;
  const double offset = 1.0 / (1.0 + std::exp(-delta / tau)) + start;
  const StepParams<float> st = make_step_params<float>(tau, rho, delta, start, offset);
  std::vector<float> der(4 * stride), g(n);
  const float c[4] = {0.1f, 0.2f, 0.3f, 0.4f};
  float dall[4];
  BlockSums<float, 4> o;
  double check = 0, t_fwd = 1e30, t_store = 1e30, t_grad = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t0 = now();
    sweep_forward<float, true, STEP, 4, false, false>(s.data(), f.data(), n, sj, st, &o, der.data(), stride);
    const double t1 = now();
    sweep_forward<float, true, STEP, 4, true, true>(s.data(), f.data(), n, sj, st, &o, der.data(), stride);
    const double t2 = now();
    sweep_grad_stored<float, true, STEP, 4>(n, der.data(), stride, c, true, g.data(), dall, st);
    const double t3 = now();
    check += o.all[0] + g[n / 2] + dall[1];
    t_fwd = std::min(t_fwd, t1 - t0);
    t_store = std::min(t_store, t2 - t1);
    t_grad = std::min(t_grad, t3 - t2);
  }
  std::printf("forward_us %.3f\nstore_us %.3f\ngrad_us %.3f\nchecksum %.6g\n", t_fwd * 1e6, t_store * 1e6,
              t_grad * 1e6, check);
  return std::isfinite(check) ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: sweep_loop N REPS STEP (0 sigmoid, 1 suprank)\n");
    return 2;
  }
  const int64_t n = std::atoll(argv[1]);
  const int reps = std::atoi(argv[2]);
  const int step = std::atoi(argv[3]);
  if (n < 4 || reps < 1 || (step != 0 && step != 1)) {
    std::fprintf(stderr, "sweep_loop: need N >= 4, REPS >= 1, STEP 0 or 1\n");
    return 2;
  }
  return step == 0 ? run<kSigmoid>(n, reps) : run<kSupRank>(n, reps);
}
