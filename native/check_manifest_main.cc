// gptbc-check-manifest: the C++ manifest reader and compatibility check on files, without a library.
//
//   gptbc-check-manifest WEIGHTS_DIR LIB_METADATA_JSON
//
// WEIGHTS_DIR holds a gptbc-config.json; LIB_METADATA_JSON is the text a library's _metadata returns. Prints
// "ok", or "error: ..." on stderr with exit status 1, worded as gptbc-run (and the Python reader) word it.
// tests/test_manifest.py feeds it the golden fixtures in tests/data/manifests/.
#include <cstdio>
#include <string>

#include "error.h"
#include "json.h"
#include "manifest.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fputs("usage: gptbc-check-manifest WEIGHTS_DIR LIB_METADATA_JSON\n", stderr);
    return 2;
  }
  try {
    gptbc::manifest::Weights weights = gptbc::manifest::read_weights(argv[1]);
    gptbc::manifest::Library lib = gptbc::manifest::parse_library(gptbc::json::read_file(argv[2]), argv[2]);
    gptbc::manifest::check_compatible(lib, weights);
  } catch (const std::exception& e) {
    std::string what = e.what();
    for (char& c : what)
      if (c == '\n' || c == '\r') c = ' ';
    std::fprintf(stderr, "error: %s\n", what.c_str());
    return 1;
  }
  std::puts("ok");
  return 0;
}
