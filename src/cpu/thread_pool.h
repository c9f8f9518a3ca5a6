// A small persistent thread pool: run(fn) calls fn(i) once for each i in [0, size()) on size()
// threads (the caller is thread 0) and returns when all are done. Workers spin briefly after a
// job (back-to-back phases start without a wake-up) and then sleep on a futex (atomic wait).
// One job at a time: concurrent callers are serialized.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace moekit::cpu {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);  // 0: hardware threads
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return size_; }
  template <typename Fn>
  void run(Fn&& fn) {
    run_raw([](void* f, int i) { (*static_cast<Fn*>(f))(i); }, &fn);
  }

 private:
  void run_raw(void (*call)(void*, int), void* ctx);
  void worker(int index);

  int size_;
  std::vector<std::thread> workers_;
  std::mutex run_mutex_;
  std::atomic<uint32_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  void (*call_)(void*, int) = nullptr;
  void* ctx_ = nullptr;
};

// Threads to use for `requested` (0: std::thread::hardware_concurrency(), at least 1).
int resolve_num_threads(int requested);

// The process's pool of `threads` threads (0: hardware threads), shared by every CPU part that
// asks for that many: the experts and weight-and-reduce of a layer (and of its shared expert)
// then run on one set of workers instead of pools that spin against each other. Alive while
// anyone holds it.
std::shared_ptr<ThreadPool> shared_thread_pool(int threads);

}  // namespace moekit::cpu
