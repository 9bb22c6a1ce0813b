// The fused CPU loss ops' gradient rows (Q, N): their memory, and why it is kept.
//
// A fused loss op writes its whole (Q, N) gradient in the forward, and autograd's backward scales
// it in place and hands it on (csrc/loss_autograd.cpp). Allocated fresh on every call, that much
// memory comes from the kernel as new pages, which the kernel zeroes at the first touch: on this
// project's 2-core machines a fresh 1 GiB (B = 16384, float32) took 270 ms to allocate and fill in
// 4 KiB pages and 60-110 ms in transparent huge pages, against 43 ms to fill memory already
// touched -- more than the gradient sweep itself. A training loop asks for the same size every
// step, and the previous step's gradient has been consumed by then (the matmul's backward, or
// .grad dropped). So a large block is not returned to the system when its tensor dies: it waits in
// a one-block cache for the next call of the same size. What that costs is the memory of one
// gradient between calls, which the next call would need again; fastrank.empty_cache() returns
// it, and FASTRANK_CACHE_GRAD_ROWS=0 turns the cache off (every block then goes back at once).
//
// The cache holds raw memory, never a tensor: the use count of a returned gradient's storage
// stays what autograd's in-place test expects (loss_autograd.cpp).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/parallel.h"

namespace fastrank {
namespace cpu {
namespace {

// Blocks are 2 MiB aligned and sized (whole transparent huge pages); smaller gradients come from
// the default allocator, whose heap already recycles them.
constexpr size_t kHuge = size_t(1) << 21;
constexpr size_t kMinCached = size_t(4) << 20;

struct Block {
  void* ptr = nullptr;
  size_t bytes = 0;
};

class GradRowsCache {
 public:
  // A block of at least `bytes` (a multiple of kHuge): the cached one when it fits without
  // wasting more than half of it, else a fresh one; nullptr when the system has none
  Block take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (slot_.ptr && slot_.bytes >= bytes && slot_.bytes / 2 <= bytes) {
        Block b = slot_;
        slot_ = Block{};
        return b;
      }
    }
    Block b = fresh(bytes);
    if (!b.ptr) {
      // the system is short: the cached block (too small or too large) goes back, and one retry
      release();
      b = fresh(bytes);
    }
    return b;
  }

  // A dead gradient's block: kept for the next call (the previous one goes back), or returned
  // to the system when caching is off
  void give(Block b) {
    if (!enabled()) {
      std::free(b.ptr);
      return;
    }
    Block old;
    {
      std::lock_guard<std::mutex> lock(mu_);
      old = slot_;
      slot_ = b;
    }
    std::free(old.ptr);
  }

  // Returns the cached block to the system; its size in bytes (0: none)
  size_t release() {
    Block old;
    {
      std::lock_guard<std::mutex> lock(mu_);
      old = slot_;
      slot_ = Block{};
    }
    std::free(old.ptr);
    return old.bytes;
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return slot_.bytes;
  }

  static bool enabled() {
    const char* v = std::getenv("FASTRANK_CACHE_GRAD_ROWS");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }

 private:
  static Block fresh(size_t bytes) {
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, bytes) != 0) return Block{};
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // advice only: a kernel without THP refuses it, and the pages stay small
    (void)madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return Block{p, bytes};
  }

  std::mutex mu_;
  Block slot_;
};

// Never destroyed: a gradient may die after static destructors have run (interpreter teardown)
GradRowsCache& cache() {
  static GradRowsCache* c = new GradRowsCache();
  return *c;
}

// The deleter of a block's tensor storage, whose context is the Block: it goes to the cache
void give_back(void* ctx) {
  auto* b = static_cast<Block*>(ctx);
  cache().give(*b);
  delete b;
}

std::mutex& pools_mu() {
  static std::mutex* m = new std::mutex();
  return *m;
}
std::vector<void (*)()>& pool_clears() {
  static auto* v = new std::vector<void (*)()>();
  return *v;
}

int64_t empty_cache_op() {
  std::vector<void (*)()> clears;
  {
    std::lock_guard<std::mutex> lock(pools_mu());
    clears = pool_clears();
  }
  for (auto clear : clears) clear();  // the per-thread scratch pools (parallel.h)
  return static_cast<int64_t>(cache().release());
}
int64_t cached_bytes_op() { return static_cast<int64_t>(cache().cached_bytes()); }

}  // namespace

void register_pool_clear(void (*clear)()) {
  std::lock_guard<std::mutex> lock(pools_mu());
  pool_clears().push_back(clear);
}

at::Tensor empty_grad_rows(int64_t rows, int64_t n, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(rows) * static_cast<size_t>(n) * c10::elementSize(options.dtype().toScalarType());
  if (bytes < kMinCached || !GradRowsCache::enabled()) return at::empty({rows, n}, options);
  const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  Block b = cache().take(rounded);
  TORCH_CHECK_WITH(OutOfMemoryError, b.ptr != nullptr, "fastrank: cannot allocate the gradient rows (", rows, " x ",
                   n, ", ", bytes, " bytes)");
  auto* ctx = new Block(b);
  c10::DataPtr data(b.ptr, ctx, &give_back, c10::Device(c10::DeviceType::CPU));
  c10::Storage storage(c10::Storage::use_byte_size_t(), static_cast<int64_t>(bytes), std::move(data),
                       /*allocator=*/nullptr, /*resizable=*/false);
  return at::empty({0}, options).set_(storage, 0, {rows, n}, {n, 1});
}

}  // namespace cpu
}  // namespace fastrank

// schemas in fastrank.cpp
TORCH_LIBRARY_IMPL(fastrank, CompositeImplicitAutograd, m) {
  m.impl("empty_cache", &fastrank::cpu::empty_cache_op);
  m.impl("cached_grad_rows_bytes", &fastrank::cpu::cached_bytes_op);
}
