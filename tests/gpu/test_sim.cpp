// SimWorld's own contract (epx/sim_world.hpp), on one GPU: world sizes and SM shares out of range
// are errors naming the value and the limit; a rank that never comes, returns early or throws
// makes its peers fail fast with an error naming it, never hang.
#include <cuda_runtime_api.h>

#include <atomic>
#include <chrono>
#include <regex>
#include <thread>

#include "gpu/harness.hpp"

namespace epx::test {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// `message` names rank `rank` ("rank 2", "rank(s) 2", "rank(s) 0, 2" does not count for 2).
bool names_rank(const std::string& message, int rank) {
  return std::regex_search(message, std::regex("rank(\\(s\\))? " + std::to_string(rank) + "([^0-9]|$)"));
}

int device_sms() {
  int sms = 0;
  CUDA_OK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  return sms;
}

TEST(SimWorld, WorldSizeOutOfRangeNamesValueAndLimit) {
  SKIP_WITHOUT_SIM_WORLD(2);
  EXPECT_EQ(run_in_child([] {
    for (int world : {1, 0, -1})
      require_error([&] { SimWorld w(world); }, ErrorKind::kInvalidArgument,
                    {"SimWorld world", ">= 2", "got " + std::to_string(world)});
    const int max_world = SimWorld::max_world();
    const int expected = std::min(kMaxWorldRanks, device_sms() / SimWorld::kMinSmsPerRank);
    REQUIRE(max_world == expected, "max_world() ", max_world, ", want min(kMaxWorldRanks, SMs / ", SimWorld::kMinSmsPerRank,
            ") = ", expected);
    // Above the largest world: the message names the asked size and the limit.
    require_error([&] { SimWorld w(max_world + 1); }, ErrorKind::kUnsupported,
                  {"SimWorld world", std::to_string(max_world + 1) + " ranks", std::to_string(max_world) + " ranks"});
    SimWorld largest(max_world);  // the limit itself is a valid world
    REQUIRE(largest.world() == max_world, "world() ", largest.world());
    std::printf("SimWorld sizes: 1, 0, -1 and %d rejected, %d accepted\n", max_world + 1, max_world);
    return 0;
  }, 60), 0);
}

// Each simulated rank is a real-looking rank of an R-rank NVLink domain that owns SMs / R.
TEST(SimWorld, RanksSeeTheirWorldAndSmShare) {
  SKIP_WITHOUT_SIM_WORLD(3);
  EXPECT_EQ(run_in_child([] {
    const int world = 3;
    const int failed = launch_sim(world, [&](int rank, int w, Communicator& comm) {
      const int sms = device_sms();
      REQUIRE(w == world && comm.world() == world && comm.rank() == rank, "rank ", comm.rank(), " of ", comm.world());
      REQUIRE(comm.simulated() && comm.nccl() == nullptr && comm.sim_world() != nullptr, "rank ", rank,
              ": not a simulated communicator");
      REQUIRE(comm.local_rank() == rank && comm.local_size() == world && comm.num_nodes() == 1, "rank ", rank,
              ": local ", comm.local_rank(), " / ", comm.local_size());
      REQUIRE(comm.num_device_sms() == sms / world && comm.sim_world()->num_sms_per_rank() == sms / world, "rank ",
              rank, ": ", comm.num_device_sms(), " SMs, want ", sms, " / ", world);
      int device = -1;
      CUDA_OK(cudaGetDevice(&device));
      REQUIRE(device == comm.device(), "rank ", rank, " runs on device ", device, ", comm says ", comm.device());
      // The host all-gather: every rank sees every rank's bytes, twice in a row (slots reused).
      for (int round = 0; round < 2; ++round) {
        const int mine[2] = {1000 * round + rank, -rank};
        std::vector<int> all(2 * world, -7);
        comm.all_gather(mine, all.data(), sizeof(mine), 30);
        for (int r = 0; r < world; ++r)
          REQUIRE(all[2 * r] == 1000 * round + r && all[2 * r + 1] == -r, "rank ", rank, " round ", round,
                  ": slot of rank ", r, " holds ", all[2 * r], ", ", all[2 * r + 1]);
      }
      return 0;
    }, 0, 30);
    REQUIRE(failed == 0, failed, " simulated ranks failed");
    return 0;
  }, 60), 0);
}

TEST(SimWorld, NumSmsAboveTheRankShareIsRejected) {
  SKIP_WITHOUT_SIM_WORLD(2);
  EXPECT_EQ(run_in_child([] {
    const int failed = launch_sim(2, [](int rank, int, Communicator& comm) {
      const int share = comm.num_device_sms();
      BufferOptions options;
      options.config = Config::defaults(2);
      options.config.num_sms = share + 1;
      require_error([&] { Buffer b(comm, 16 << 20, options); }, ErrorKind::kInvalidArgument,
                    {"Config.num_sms: " + std::to_string(share + 1), "SM share of " + std::to_string(share)});
      // The share itself is accepted; set_config refuses one more as the constructor does.
      options.config.num_sms = share;
      Buffer b(comm, 16 << 20, options);
      Config c = b.config();
      c.num_sms = share + 1;
      require_error([&] { b.set_config(c); }, ErrorKind::kInvalidArgument, "Config.num_sms: " + std::to_string(share + 1));
      REQUIRE(b.config().num_sms == share, "rank ", rank, ": a refused config changed num_sms to ", b.config().num_sms);
      return 0;
    }, 0, 30);
    REQUIRE(failed == 0, failed, " simulated ranks failed");
    return 0;
  }, 60), 0);
}

// Rank 2 sleeps past the world timeout instead of making its Buffer: the others' Buffer creation
// ends after about the world timeout with an error naming rank 2.
TEST(SimWorld, RankThatNeverArrivesTimesOutNamingIt) {
  SKIP_WITHOUT_SIM_WORLD(3);
  EXPECT_EQ(run_in_child([] {
    const double world_timeout_s = 2, sleep_s = 6;
    std::atomic<int> num_timeouts{0};
    const int failed = launch_sim(3, [&](int rank, int, Communicator& comm) {
      if (rank == 2) {
        std::this_thread::sleep_for(std::chrono::duration<double>(sleep_s));
        return 0;
      }
      const auto start = Clock::now();
      try {
        Buffer b(comm, 16 << 20);
        throw Failure("rank " + std::to_string(rank) + ": Buffer made without rank 2");
      } catch (const Error& e) {
        const double waited_s = seconds_since(start);
        // The first rank to give up gets the timeout; it breaks the world, so a peer may learn
        // of it as a broken world instead, which names the same missing rank.
        REQUIRE(e.kind() == ErrorKind::kTimeout ||
                    (e.kind() == ErrorKind::kState && std::string(e.what()).find("timed out") != std::string::npos),
                "rank ", rank, ": ", error_kind_name(e.kind()), ": ", e.what());
        REQUIRE(names_rank(e.what(), 2), "rank ", rank, ": the error does not name rank 2: ", e.what());
        REQUIRE(waited_s >= 0.75 * world_timeout_s && waited_s < sleep_s - 1, "rank ", rank, " waited ", waited_s,
                " s, want about the world timeout of ", world_timeout_s, " s: ", e.what());
        if (e.kind() == ErrorKind::kTimeout) ++num_timeouts;
        std::printf("[sim rank %d] after %.2f s: %s\n", rank, waited_s, e.what());
      }
      return 0;
    }, 0, world_timeout_s);
    REQUIRE(failed == 0, failed, " simulated ranks failed");
    REQUIRE(num_timeouts.load() >= 1, "no rank got Error(kTimeout)");
    return 0;
  }, 60), 0);
}

// Rank 1 returns before making its Buffer: rank 0's Buffer creation fails at once naming rank 1
// (it left the world), well inside the world timeout.
TEST(SimWorld, RankThatReturnsEarlyIsNamed) {
  SKIP_WITHOUT_SIM_WORLD(2);
  EXPECT_EQ(run_in_child([] {
    const double world_timeout_s = 2;
    const int failed = launch_sim(2, [&](int rank, int, Communicator& comm) {
      if (rank == 1) return 0;
      const auto start = Clock::now();
      try {
        Buffer b(comm, 16 << 20);
        throw Failure("Buffer made without rank 1");
      } catch (const Error& e) {
        const double waited_s = seconds_since(start);
        REQUIRE(e.kind() == ErrorKind::kState || e.kind() == ErrorKind::kTimeout, error_kind_name(e.kind()), ": ",
                e.what());
        REQUIRE(names_rank(e.what(), 1), "the error does not name rank 1: ", e.what());
        REQUIRE(waited_s < world_timeout_s + 1, "rank 0 waited ", waited_s, " s: ", e.what());
        std::printf("[sim rank 0] after %.2f s: %s\n", waited_s, e.what());
      }
      return 0;
    }, 0, world_timeout_s);
    REQUIRE(failed == 0, failed, " simulated ranks failed");
    return 0;
  }, 60), 0);
}

// Rank 1 throws after the Buffers exist: it leaves the world, and its peers' next collectives
// (a barrier, Buffer::reset) fail at once naming it, far inside the 60 s world timeout; their
// Buffers are still destroyed without waiting for it.
TEST(SimWorld, RankThatThrowsLeavesTheWorld) {
  SKIP_WITHOUT_SIM_WORLD(3);
  EXPECT_EQ(run_in_child([] {
    const double world_timeout_s = 60;
    const int failed = launch_sim(3, [&](int rank, int, Communicator& comm) {
      // NOTE: rank 1's Buffer is not destroyed: its destructor's barrier would meet the peers'
      // barrier below; the throw alone must end the peers' waits. The world frees its memory.
      auto* buffer = new Buffer(comm, 16 << 20);
      comm.barrier(world_timeout_s);
      if (rank == 1) throw std::runtime_error("injected failure of rank 1");
      auto start = Clock::now();
      require_error([&] { comm.barrier(world_timeout_s); }, ErrorKind::kState, "injected failure of rank 1");
      double waited_s = seconds_since(start);
      REQUIRE(waited_s < 5, "rank ", rank, ": barrier took ", waited_s, " s to fail");
      start = Clock::now();
      try {
        buffer->reset();
        throw Failure("rank " + std::to_string(rank) + ": reset() succeeded without rank 1");
      } catch (const Error& e) {
        REQUIRE(names_rank(e.what(), 1), "rank ", rank, ": reset() error does not name rank 1: ", e.what());
      }
      waited_s = seconds_since(start);
      REQUIRE(waited_s < 5, "rank ", rank, ": reset() took ", waited_s, " s to fail");
      start = Clock::now();
      delete buffer;
      REQUIRE(seconds_since(start) < 10, "rank ", rank, ": ~Buffer took ", seconds_since(start), " s");
      return 0;
    }, 0, world_timeout_s);
    REQUIRE(failed == 1, failed, " ranks failed, want 1 (rank 1)");
    std::printf("rank 1 threw: peers' barrier and reset() failed naming it\n");
    return 0;
  }, 120), 0);
}

}  // namespace
}  // namespace epx::test
