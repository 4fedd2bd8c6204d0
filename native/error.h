// The one kind of failure gptbc-run reports to its user.
#pragma once

#include <stdexcept>
#include <string>

namespace gptbc {

// A problem with the input (a file, a flag, the library): main() prints "error: <what>" on one line and
// exits with status 1. The message names the thing at fault first, as the Python CLI does.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace gptbc
