// ThreadGroup: the host collectives of a SimWorld (design.md §3): a barrier and an all-gather over
// the R rank threads of one process, each bounded by a timeout. Plain C++ (no CUDA), so the CPU
// tests exercise it.
//
// NOTE: a failure is final for the group. A barrier that times out, or a rank that leaves (its
// thread failed), breaks the group: every waiting and later collective throws at once, naming the
// ranks that never arrived or the rank that left, instead of each peer waiting out its own timeout.
#pragma once
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace epx {

class ThreadGroup {
 public:
  explicit ThreadGroup(int size);
  int size() const { return size_; }

  // Blocks until all ranks arrive. Throws Error(kTimeout) naming the ranks missing after
  // `timeout_s`, or Error(kState) when the group is broken (a rank left, an earlier timeout).
  // `what` names the step in the message.
  void barrier(int rank, double timeout_s, const char* what);
  // all[r * num_bytes ...] = rank r's `mine`, for every r (a barrier on each side).
  void all_gather(int rank, const void* mine, void* all, size_t num_bytes, double timeout_s, const char* what);
  // Rank `rank` will not take part any more (its thread failed): breaks the group.
  void leave(int rank, const std::string& reason);
  bool broken() const;

 private:
  void check_not_broken_locked(const char* what) const;
  const int size_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  uint64_t generation_ = 0;
  int num_arrived_ = 0;
  std::vector<char> arrived_;
  std::vector<std::vector<uint8_t>> slots_;
  std::string broken_reason_;  // empty while the group works
};

}  // namespace epx
