#include "host/thread_group.hpp"

#include <chrono>
#include <algorithm>
#include <cstring>

#include "epx/error.hpp"

namespace epx {

ThreadGroup::ThreadGroup(int size) : size_(size), arrived_(size, 0), slots_(size) {
  EPX_ARG_CHECK(size >= 1, "ThreadGroup: size must be >= 1, got ", size);
}

bool ThreadGroup::broken() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return !broken_reason_.empty();
}

void ThreadGroup::check_not_broken_locked(const char* what) const {
  EPX_CHECK(broken_reason_.empty(), ErrorKind::kState, what, ": the simulated world is broken: ", broken_reason_);
}

void ThreadGroup::leave(int rank, const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (broken_reason_.empty()) broken_reason_ = detail::concat("rank ", rank, " left (", reason, ")");
  }
  cv_.notify_all();
}

void ThreadGroup::barrier(int rank, double timeout_s, const char* what) {
  EPX_ARG_CHECK(rank >= 0 && rank < size_, what, ": rank ", rank, " outside [0, ", size_, ")");
  std::unique_lock<std::mutex> lock(mutex_);
  check_not_broken_locked(what);
  EPX_CHECK(!arrived_[rank], ErrorKind::kState, what, ": rank ", rank, " entered a barrier twice");
  const uint64_t generation = generation_;
  arrived_[rank] = 1;
  if (++num_arrived_ == size_) {
    num_arrived_ = 0;
    std::fill(arrived_.begin(), arrived_.end(), 0);
    ++generation_;
    lock.unlock();
    cv_.notify_all();
    return;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  const bool done = cv_.wait_until(lock, deadline, [&] { return generation_ != generation || !broken_reason_.empty(); });
  if (generation_ != generation) return;  // completed (even if the group broke afterwards)
  if (done) check_not_broken_locked(what);
  // Timed out: name the ranks that never arrived, and break the group so every peer learns it.
  std::string missing;
  for (int r = 0; r < size_; ++r)
    if (!arrived_[r]) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
  broken_reason_ = detail::concat(what, " timed out after ", timeout_s, " s waiting for rank(s) ", missing);
  cv_.notify_all();
  EPX_FAIL(ErrorKind::kTimeout, what, ": rank ", rank, " waited ", timeout_s, " s for rank(s) ", missing,
           " (simulated world)");
}

void ThreadGroup::all_gather(int rank, const void* mine, void* all, size_t num_bytes, double timeout_s,
                             const char* what) {
  EPX_ARG_CHECK(rank >= 0 && rank < size_, what, ": rank ", rank, " outside [0, ", size_, ")");
  {
    std::lock_guard<std::mutex> lock(mutex_);
    check_not_broken_locked(what);
    slots_[rank].assign(static_cast<const uint8_t*>(mine), static_cast<const uint8_t*>(mine) + num_bytes);
  }
  barrier(rank, timeout_s, what);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    // Every rank runs the same check on the same slots, so all throw or none does.
    for (int r = 0; r < size_; ++r)
      EPX_CHECK(slots_[r].size() == slots_[0].size(), ErrorKind::kInvalidArgument, what, ": rank ", r,
                " contributed ", slots_[r].size(), " bytes, rank 0 ", slots_[0].size());
    for (int r = 0; r < size_; ++r) {
      std::memcpy(static_cast<uint8_t*>(all) + r * num_bytes, slots_[r].data(), num_bytes);
    }
  }
  // No rank may overwrite its slot for the next all-gather before every rank has read this one.
  barrier(rank, timeout_s, what);
}

}  // namespace epx
