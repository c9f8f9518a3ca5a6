#include "cpu/thread_pool.h"

#include <chrono>
#include <map>

#include "moekit/core/error.h"

namespace moekit::cpu {
namespace {

// Polling before sleeping: long enough to bridge the phases of one apply() without a futex
// wake-up, short enough not to keep a shared core from other work for long.
constexpr auto kSpinTime = std::chrono::microseconds(50);

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Polls ready() for up to kSpinTime (a pause lasts 10 to 150 cycles depending on the CPU, so
// the budget is time, not a count); false when it never became true.
template <typename Ready>
bool spin_until(Ready&& ready) {
  const auto start = std::chrono::steady_clock::now();
  for (int i = 1;; ++i) {
    if (ready()) return true;
    cpu_relax();
    if (i % 64 == 0 && std::chrono::steady_clock::now() - start > kSpinTime) return false;
  }
}

}  // namespace

int resolve_num_threads(int requested) {
  MOEKIT_CHECK(requested >= 0, "cpu: num_threads must be >= 0, got ", requested);
  if (requested > 0) return requested;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : int(hw);
}

ThreadPool::ThreadPool(int threads) : size_(resolve_num_threads(threads)) {
  for (int i = 1; i < size_; ++i) workers_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  generation_.fetch_add(1, std::memory_order_release);
  generation_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::run_raw(void (*call)(void*, int), void* ctx) {
  if (size_ == 1) {
    call(ctx, 0);
    return;
  }
  std::lock_guard lock(run_mutex_);
  call_ = call;
  ctx_ = ctx;
  pending_.store(size_ - 1, std::memory_order_relaxed);
  generation_.fetch_add(1, std::memory_order_release);
  generation_.notify_all();
  call(ctx, 0);
  if (spin_until([&] { return pending_.load(std::memory_order_acquire) == 0; })) return;
  for (int left; (left = pending_.load(std::memory_order_acquire)) != 0;)
    pending_.wait(left, std::memory_order_acquire);
}

void ThreadPool::worker(int index) {
  uint32_t seen = 0;
  for (;;) {
    if (!spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; }))
      while (generation_.load(std::memory_order_acquire) == seen)
        generation_.wait(seen, std::memory_order_acquire);
    seen = generation_.load(std::memory_order_acquire);
    if (stop_.load()) return;
    call_(ctx_, index);
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) pending_.notify_one();
  }
}

std::shared_ptr<ThreadPool> shared_thread_pool(int threads) {
  static std::mutex mutex;
  static std::map<int, std::weak_ptr<ThreadPool>> pools;
  const int n = resolve_num_threads(threads);
  std::lock_guard lock(mutex);
  std::shared_ptr<ThreadPool> pool = pools[n].lock();
  if (!pool) pools[n] = pool = std::make_shared<ThreadPool>(n);
  return pool;
}

}  // namespace moekit::cpu
