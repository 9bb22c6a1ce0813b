// What the fused CPU rank-sums kernels share about how they run: instruction-set
// multiversioning of the hot loops and the size of a parallel task.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <new>
#include <vector>

#include "problem.h"
#include "step.h"

// Build the hot loops for AVX-512, AVX2+FMA and baseline x86-64, picked at load
// time (glibc ifunc), so a wheel built anywhere runs at full width everywhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FR_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FR_MULTIVERSION
#endif

namespace fastrank {
namespace cpu {

// flag_row of problem.h compiled for each instruction set: a caller that is not multiversioned
// (the histogram rows) would otherwise compare int64 labels on baseline x86-64, without pcmpeqq
template <typename T>
FR_MULTIVERSION __attribute__((noinline)) void flag_row_mv(const ProblemView<T>& pr, const TargetView& t, int64_t i,
                                                           uint8_t* flag) {
  flag_row(pr, t, i, flag);
}

// Query rows per at::parallel_for task: enough pair evaluations (P * N per row) per
// task to amortise scheduling, at least one row.
inline int64_t rows_per_task(int64_t P, int64_t N) {
  const int64_t work = std::max<int64_t>(1, P * N);
  return std::max<int64_t>(1, (int64_t(1) << 16) / work);
}

// The fused loss ops' stored step derivatives of one row stay in a per-thread L2-sized buffer
// (docs/design.md §2.4): 1 MiB holds 4 per class at N = 87k (float32, SupAP: |P| = 3 runs of N
// negatives) and 4096 x 64 (Smooth-AP).
constexpr int64_t kDerivativeBytes = int64_t(1) << 20;

// Elements of that buffer for n rows of `row` (default n) elements: at most n * row (no row
// needs more), without overflow
template <typename T>
inline size_t derivative_elems(int64_t n, int64_t row = -1) {
  constexpr int64_t cap = kDerivativeBytes / int64_t(sizeof(T));
  if (row < 0) row = n;
  return static_cast<size_t>(n <= cap && row <= cap ? std::min<int64_t>(cap, n * row) : cap);
}

// The fused loss ops' gradient rows (Q, N), or (0, N) without the gradient: uninitialised, each
// row written once by the task that owns it. A large one is a block of transparent huge pages
// kept for the next call when its tensor dies (grad_rows.cpp: why, and how to return it).
at::Tensor empty_grad_rows(int64_t rows, int64_t n, const at::TensorOptions& options);

// Tasks of an at::parallel_for over n rows with this grain
inline int64_t tasks(int64_t n, int64_t grain) { return (n + grain - 1) / std::max<int64_t>(1, grain); }

// Threads that run an at::parallel_for over `tasks` tasks: one scratch object each
inline int64_t scratch_threads(int64_t tasks) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
}

// One scratch object (O(N) row buffers) per thread of a coming at::parallel_for over `tasks`
// tasks, allocated here, before the parallel region: a std::bad_alloc thrown inside a worker
// takes the process down (SIGABRT, "terminate called after throwing std::bad_alloc"); here it
// becomes torch.OutOfMemoryError (a RuntimeError) naming the size. A task takes its thread's
// object: scratch[at::get_thread_num()]. Reusing it across tasks also saves an allocation per task.
template <typename Scratch>
std::vector<Scratch> thread_scratch(const char* op, int64_t tasks, int64_t n, int64_t bytes_per_item) {
  const int64_t threads = scratch_threads(tasks);
  std::vector<Scratch> out;
  try {
    out.reserve(static_cast<size_t>(threads));
    for (int64_t t = 0; t < threads; ++t) out.emplace_back(n);
  } catch (const std::bad_alloc&) {
    TORCH_CHECK_WITH(OutOfMemoryError, false, op, ": cannot allocate the per-thread row scratch: ", threads,
                     " thread(s) x ", bytes_per_item * n, " bytes (", bytes_per_item, " bytes per column, N = ", n,
                     ")");
  }
  return out;
}

// The scratch of the calling task's thread (at::parallel_for numbers its threads from 0; a call
// that runs inline, in one thread or nested in a parallel region, gets object 0 ... threads - 1)
template <typename Scratch>
Scratch& my_scratch(std::vector<Scratch>& scratch) {
  const int64_t t = at::get_thread_num();
  return scratch[static_cast<size_t>(t < static_cast<int64_t>(scratch.size()) ? t : 0)];
}

// Called by fastrank.empty_cache() (grad_rows.cpp): a pool registers its clear function once
void register_pool_clear(void (*clear)());

// The per-thread scratch of the last call of a kind, kept for the next call of the same N while it
// is small: at B = 256 allocating and zeroing it was ~10% of a fused loss call (the buffers are
// written before they are read in every row, so a kept one serves as a new one; the flags'
// zero padding is never written). At most one set per Scratch type, of at most
// kPooledScratchBytes.
constexpr int64_t kPooledScratchBytes = int64_t(4) << 20;

template <typename Scratch>
struct ScratchPool {
  std::mutex mu;
  int64_t n = -1;
  std::vector<Scratch> kept;

  static ScratchPool& get() {
    // never destroyed (a call may run during static destruction); registered once
    static ScratchPool* pool = [] {
      auto* p = new ScratchPool();
      register_pool_clear(&ScratchPool::clear);
      return p;
    }();
    return *pool;
  }
  static void clear() {
    ScratchPool& p = get();
    std::vector<Scratch> old;
    std::lock_guard<std::mutex> lock(p.mu);
    old.swap(p.kept);
    p.n = -1;
  }
};

// at::parallel_for over the rows [0, Q) in tasks of `grain` rows, each task given its thread's
// scratch (thread_scratch, allocated before the parallel region, or the pool's):
// f(Scratch&, begin, end).
template <typename Scratch, typename F>
void parallel_rows(const char* op, int64_t Q, int64_t grain, int64_t n, int64_t bytes_per_item, const F& f) {
  const int64_t n_tasks = tasks(Q, grain);
  const int64_t threads = scratch_threads(n_tasks);
  // the fused rows' stored derivatives come on top of bytes_per_item: at most 1 MiB, n^2 elements
  const int64_t per_thread = n * bytes_per_item + std::min<int64_t>(kDerivativeBytes, n * n * 8);
  const bool pooled = threads * per_thread <= kPooledScratchBytes;
  ScratchPool<Scratch>& pool = ScratchPool<Scratch>::get();
  std::vector<Scratch> scratch;
  if (pooled) {
    std::lock_guard<std::mutex> lock(pool.mu);
    if (pool.n == n && static_cast<int64_t>(pool.kept.size()) >= threads) scratch.swap(pool.kept);
  }
  if (scratch.empty()) scratch = thread_scratch<Scratch>(op, n_tasks, n, bytes_per_item);
  at::parallel_for(0, Q, grain, [&](int64_t b, int64_t e) { f(my_scratch(scratch), b, e); });
  if (pooled) {
    std::lock_guard<std::mutex> lock(pool.mu);
    pool.kept.swap(scratch);
    pool.n = n;
  }
}

// The rank-sums kernels' loop (binary and graded): parallel_rows over the rows of pr in tasks of
// rows_per_task, the step kind a compile-time constant (dispatch_step): f(kind, Scratch&, begin, end).
template <typename Scratch, typename T, typename F>
void parallel_step_rows(const char* op, int64_t step, const ProblemView<T>& pr, const F& f) {
  dispatch_step(step, [&](auto kind) {
    parallel_rows<Scratch>(op, pr.Q, rows_per_task(pr.P, pr.N), pr.N, Scratch::kBytesPerColumn,
                           [&](Scratch& scratch, int64_t b, int64_t e) { f(kind, scratch, b, e); });
  });
}

}  // namespace cpu
}  // namespace fastrank
