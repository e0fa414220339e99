// CPU tests of EPX_SIM_STAGED_COPIES (host/env.hpp): unset or empty is off, 0 / 1 are off / on,
// anything else is an error naming the variable and the value.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "epx/error.hpp"
#include "host/env.hpp"

namespace epx {
namespace {

TEST(Env, SimStagedCopiesIsReadAndValidated) {
  unsetenv("EPX_SIM_STAGED_COPIES");
  EXPECT_FALSE(env::sim_staged_copies());
  setenv("EPX_SIM_STAGED_COPIES", "", 1);
  EXPECT_FALSE(env::sim_staged_copies());
  setenv("EPX_SIM_STAGED_COPIES", "1", 1);
  EXPECT_TRUE(env::sim_staged_copies());
  setenv("EPX_SIM_STAGED_COPIES", "0", 1);
  EXPECT_FALSE(env::sim_staged_copies());
  for (const char* bad : {"yes", "2", "0.5", "-1", "1x"}) {
    setenv("EPX_SIM_STAGED_COPIES", bad, 1);
    try {
      env::sim_staged_copies();
      ADD_FAILURE() << "EPX_SIM_STAGED_COPIES='" << bad << "' accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument) << e.what();
      const std::string message = e.what();
      EXPECT_NE(message.find("EPX_SIM_STAGED_COPIES"), std::string::npos) << message;
      EXPECT_NE(message.find(bad), std::string::npos) << message;
    }
  }
  unsetenv("EPX_SIM_STAGED_COPIES");
}

}  // namespace
}  // namespace epx
