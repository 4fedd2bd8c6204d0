// gptbc-tokenize: the tokenizer of gptbc-run on its own, for checking it against `tokenizers`.
//
//   gptbc-tokenize TOKENIZER_JSON encode   stdin: one JSON string per line; stdout: its ids, space-separated
//   gptbc-tokenize TOKENIZER_JSON decode   stdin: ids, space-separated, per line; stdout: the text, JSON-quoted
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>

#include "error.h"
#include "json.h"
#include "tokenizer.h"

namespace {

int run(int argc, char** argv) {
  std::string mode = argc == 3 ? argv[2] : "";
  if (mode != "encode" && mode != "decode")
    throw gptbc::Error(
        "usage: gptbc-tokenize TOKENIZER_JSON encode|decode (encode: stdin lines are JSON strings, e.g. \"def f():\\n\", "
        "ids out; decode: stdin lines are space-separated ids, JSON strings out)");
  gptbc::Tokenizer tok(argv[1]);
  std::string line;
  for (size_t n = 1; std::getline(std::cin, line); ++n) {
    std::string out;
    if (mode == "encode") {
      std::string where = "stdin line " + std::to_string(n);
      for (int32_t id : tok.encode(gptbc::json::as_string(gptbc::json::parse(line, where), where)))
        out += (out.empty() ? "" : " ") + std::to_string(id);
    } else {
      std::vector<int32_t> ids;
      std::istringstream in(line);
      for (long long id; in >> id;) ids.push_back(static_cast<int32_t>(id));
      out = gptbc::json::quote(tok.decode(ids));
    }
    std::printf("%s\n", out.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
