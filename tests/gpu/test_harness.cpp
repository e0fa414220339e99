// The harness's own contract, no GPU needed: a mismatch names the row, where the row came from and
// the element within it (tests that explain themselves).
#include "gpu/harness.hpp"

namespace epx::test {
namespace {

std::string mismatch_message(const std::function<void()>& compare) {
  try {
    compare();
  } catch (const Failure& e) {
    return e.what();
  }
  return {};
}

TEST(Harness, MismatchNamesTheReceivedRowItsSourceAndTheElement) {
  ref::DispatchResult want;
  want.num_recv = 3;
  want.recv_src_rank = {0, 2, 2};
  want.recv_src_idx = {5, 17, 18};
  std::vector<int> expected = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};  // 3 rows of 4 elements
  std::vector<int> got = expected;
  EXPECT_EQ(mismatch_message([&] { expect_equal(got, expected, got.size(), "recv_x", received_rows(want, 4)); }), "");
  got[6] = -1;  // row 1, element 2
  EXPECT_EQ(mismatch_message([&] { expect_equal(got, expected, got.size(), "recv_x", received_rows(want, 4)); }),
            "recv_x: first mismatch at element 6 (row 1: from rank 2, token 17, element 2 of the row): got -1, want 7");
  EXPECT_EQ(mismatch_message([&] { expect_equal(got, expected, got.size(), "combined_x", token_rows(3, 4)); }),
            "combined_x: first mismatch at element 6 (rank 3's token 1, element 2 of the row): got -1, want 7");
  EXPECT_EQ(mismatch_message([&] { expect_equal(got, expected, got.size(), "flat"); }),
            "flat: first mismatch at element 6: got -1, want 7");
}

}  // namespace
}  // namespace epx::test
