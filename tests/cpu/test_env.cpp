// CPU tests of the on/off variables EPX_SIM_STAGED_COPIES and EPX_DEBUG (host/env.hpp): unset or
// empty is off, 0 / 1 are off / on, anything else is an error naming the variable and the value.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "epx/error.hpp"
#include "host/env.hpp"

namespace epx {
namespace {

// Reads the on/off variable `name` through `read`, checking every accepted and refused value.
template <typename F>
void check_flag(const char* name, F read) {
  SCOPED_TRACE(name);
  unsetenv(name);
  EXPECT_FALSE(read());
  setenv(name, "", 1);
  EXPECT_FALSE(read());
  setenv(name, "1", 1);
  EXPECT_TRUE(read());
  setenv(name, "0", 1);
  EXPECT_FALSE(read());
  for (const char* bad : {"yes", "2", "0.5", "-1", "1x"}) {
    setenv(name, bad, 1);
    try {
      read();
      ADD_FAILURE() << name << "='" << bad << "' accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument) << e.what();
      const std::string message = e.what();
      EXPECT_NE(message.find(name), std::string::npos) << message;
      EXPECT_NE(message.find(bad), std::string::npos) << message;
    }
  }
  unsetenv(name);
}

TEST(Env, SimStagedCopiesIsReadAndValidated) { check_flag("EPX_SIM_STAGED_COPIES", env::sim_staged_copies); }
TEST(Env, DebugIsReadAndValidated) { check_flag("EPX_DEBUG", env::debug); }

}  // namespace
}  // namespace epx
