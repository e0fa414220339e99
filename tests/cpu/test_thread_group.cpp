// ThreadGroup (src/host/thread_group.hpp): the host collectives of a SimWorld. Threads stand in for
// the ranks; every wait in these tests is bounded, so a broken group fails the test, never hangs it.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "epx/error.hpp"
#include "host/thread_group.hpp"

namespace epx {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// What one rank's collective ended with: no error, or an epx::Error's kind and message.
struct Outcome {
  bool threw = false;
  ErrorKind kind = ErrorKind::kState;
  std::string message;
  double seconds = 0;
};

Outcome outcome_of(const std::function<void()>& f) {
  Outcome o;
  const auto start = Clock::now();
  try {
    f();
  } catch (const Error& e) {
    o.threw = true;
    o.kind = e.kind();
    o.message = e.what();
  }
  o.seconds = seconds_since(start);
  return o;
}

// Runs fn(rank) on `size` threads and joins them.
void run_ranks(int size, const std::function<void(int)>& fn) {
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) threads.emplace_back(fn, r);
  for (std::thread& t : threads) t.join();
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

TEST(ThreadGroup, RejectsBadSizeAndRank) {
  EXPECT_THROW(ThreadGroup(0), Error);
  ThreadGroup group(2);
  const Outcome o = outcome_of([&] { group.barrier(2, 1, "test barrier"); });
  ASSERT_TRUE(o.threw);
  EXPECT_EQ(o.kind, ErrorKind::kInvalidArgument) << o.message;
  EXPECT_TRUE(contains(o.message, "rank 2 outside [0, 2)")) << o.message;
  EXPECT_FALSE(group.broken()) << "a bad argument must not break the group";
}

TEST(ThreadGroup, SizeOneNeverWaits) {
  ThreadGroup group(1);
  const auto start = Clock::now();
  for (int i = 0; i < 100; ++i) group.barrier(0, 10, "test barrier");
  const int64_t mine = 42;
  int64_t all = 0;
  group.all_gather(0, &mine, &all, sizeof(mine), 10, "test all_gather");
  EXPECT_EQ(all, 42);
  EXPECT_LT(seconds_since(start), 5);
}

// No rank leaves a barrier before every rank entered it, round after round.
TEST(ThreadGroup, BarrierHoldsEveryRankUntilAllArrive) {
  const int size = 5, rounds = 200;
  ThreadGroup group(size);
  std::atomic<int> arrivals{0};
  std::atomic<int> violations{0};
  run_ranks(size, [&](int rank) {
    for (int round = 0; round < rounds; ++round) {
      ++arrivals;
      group.barrier(rank, 30, "test barrier");
      // Everyone of this round has arrived; nobody can be in the next round's arrivals yet beyond
      // what this barrier allows (ranks that left it may already count the next round).
      if (arrivals.load() < size * (round + 1)) ++violations;
    }
  });
  EXPECT_EQ(violations.load(), 0);
  EXPECT_EQ(arrivals.load(), size * rounds);
  EXPECT_FALSE(group.broken());
}

// Every rank gets every rank's bytes, and a new round's contribution never overwrites a slot a
// slow rank has not yet read.
TEST(ThreadGroup, AllGatherDeliversEveryRanksBytesEachRound) {
  const int size = 4, rounds = 100;
  ThreadGroup group(size);
  std::atomic<int> wrong{0};
  run_ranks(size, [&](int rank) {
    for (int round = 0; round < rounds; ++round) {
      const uint32_t mine[3] = {static_cast<uint32_t>(rank), static_cast<uint32_t>(round),
                                static_cast<uint32_t>(rank * 1000 + round)};
      std::vector<uint32_t> all(3 * size, 0xDEADBEEF);
      if ((rank + round) % 3 == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));  // uneven pace
      group.all_gather(rank, mine, all.data(), sizeof(mine), 30, "test all_gather");
      for (int r = 0; r < size; ++r)
        if (all[3 * r] != static_cast<uint32_t>(r) || all[3 * r + 1] != static_cast<uint32_t>(round) ||
            all[3 * r + 2] != static_cast<uint32_t>(r * 1000 + round))
          ++wrong;
    }
  });
  EXPECT_EQ(wrong.load(), 0);
}

TEST(ThreadGroup, AllGatherOfUnequalSizesFailsOnEveryRank) {
  const int size = 3;
  ThreadGroup group(size);
  std::vector<Outcome> outcomes(size);
  run_ranks(size, [&](int rank) {
    const uint8_t mine[8] = {};
    std::vector<uint8_t> all(8 * size);
    outcomes[rank] = outcome_of([&] { group.all_gather(rank, mine, all.data(), rank == 1 ? 8 : 4, 30, "sizes"); });
  });
  for (int r = 0; r < size; ++r) {
    ASSERT_TRUE(outcomes[r].threw) << "rank " << r << " accepted unequal sizes";
    EXPECT_EQ(outcomes[r].kind, ErrorKind::kInvalidArgument) << outcomes[r].message;
    EXPECT_TRUE(contains(outcomes[r].message, "rank 1 contributed 8 bytes, rank 0 4")) << outcomes[r].message;
  }
}

// Rank 2 never comes: ranks 0 and 1 fail after about the timeout, naming rank 2; the group is
// broken for good, so later collectives fail at once.
TEST(ThreadGroup, TimeoutNamesTheMissingRanks) {
  const int size = 3;
  const double timeout_s = 0.3;
  ThreadGroup group(size);
  std::vector<Outcome> outcomes(2);
  run_ranks(2, [&](int rank) { outcomes[rank] = outcome_of([&] { group.barrier(rank, timeout_s, "step 7"); }); });
  int num_timeouts = 0;
  for (int r = 0; r < 2; ++r) {
    const Outcome& o = outcomes[r];
    ASSERT_TRUE(o.threw) << "rank " << r << " passed a barrier rank 2 never entered";
    // The first to expire names the missing rank; it breaks the group, so the other may learn it
    // as a broken group, with the same reason.
    if (o.kind == ErrorKind::kTimeout) {
      ++num_timeouts;
      EXPECT_TRUE(contains(o.message, "step 7: rank " + std::to_string(r) + " waited")) << o.message;
    } else {
      EXPECT_EQ(o.kind, ErrorKind::kState) << o.message;
      EXPECT_TRUE(contains(o.message, "timed out")) << o.message;
    }
    EXPECT_TRUE(contains(o.message, "rank(s) 2")) << o.message;
    EXPECT_FALSE(contains(o.message, "rank(s) 0") || contains(o.message, "rank(s) 1")) << o.message;
    EXPECT_GE(o.seconds, 0.8 * timeout_s) << o.message;
    EXPECT_LT(o.seconds, 10 * timeout_s + 2) << o.message;
  }
  EXPECT_GE(num_timeouts, 1);
  EXPECT_TRUE(group.broken());
  for (int r = 0; r < size; ++r) {
    const Outcome later = outcome_of([&] { group.barrier(r, 30, "step 8"); });
    ASSERT_TRUE(later.threw) << "rank " << r << ": a broken group served a barrier";
    EXPECT_EQ(later.kind, ErrorKind::kState) << later.message;
    EXPECT_TRUE(contains(later.message, "step 8") && contains(later.message, "rank(s) 2")) << later.message;
    EXPECT_LT(later.seconds, 1) << "a broken group must fail at once";
  }
}

TEST(ThreadGroup, TimeoutListsEveryMissingRank) {
  ThreadGroup group(4);
  const Outcome o = outcome_of([&] { group.barrier(1, 0.2, "gather"); });
  ASSERT_TRUE(o.threw);
  EXPECT_EQ(o.kind, ErrorKind::kTimeout) << o.message;
  EXPECT_TRUE(contains(o.message, "rank(s) 0, 2, 3")) << o.message;
}

// A rank that leaves wakes the ranks waiting for it at once (long before their timeout) with an
// error naming it and its reason; every later collective fails the same way.
TEST(ThreadGroup, LeaveBreaksTheGroupAtOnce) {
  const int size = 3;
  const double timeout_s = 60;
  ThreadGroup group(size);
  std::vector<Outcome> outcomes(size);
  run_ranks(size, [&](int rank) {
    if (rank == 1) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      group.leave(1, "injected failure");
      return;
    }
    outcomes[rank] = outcome_of([&] { group.barrier(rank, timeout_s, "dispatch handshake"); });
  });
  EXPECT_TRUE(group.broken());
  for (int r : {0, 2}) {
    const Outcome& o = outcomes[r];
    ASSERT_TRUE(o.threw) << "rank " << r << " passed a barrier after rank 1 left";
    EXPECT_EQ(o.kind, ErrorKind::kState) << o.message;
    EXPECT_TRUE(contains(o.message, "dispatch handshake")) << o.message;
    EXPECT_TRUE(contains(o.message, "rank 1 left (injected failure)")) << o.message;
    EXPECT_LT(o.seconds, 10) << "rank " << r << " waited for a rank that had left";
  }
  const Outcome later = outcome_of([&] {
    const int mine = 0;
    int all[size];
    group.all_gather(0, &mine, all, sizeof(mine), timeout_s, "later all_gather");
  });
  ASSERT_TRUE(later.threw);
  EXPECT_EQ(later.kind, ErrorKind::kState);
  EXPECT_TRUE(contains(later.message, "rank 1 left (injected failure)")) << later.message;
  EXPECT_LT(later.seconds, 1);
}

// A barrier that completed before a rank left stays completed: ranks that passed it see no error.
TEST(ThreadGroup, LeaveAfterACompletedBarrierDoesNotFailIt) {
  const int size = 4;
  ThreadGroup group(size);
  std::atomic<int> errors{0};
  run_ranks(size, [&](int rank) {
    try {
      group.barrier(rank, 30, "last step");
    } catch (const Error&) {
      ++errors;
    }
    if (rank == 0) group.leave(0, "finished");
  });
  EXPECT_EQ(errors.load(), 0);
  EXPECT_TRUE(group.broken());
}

}  // namespace
}  // namespace epx
