// The artifact contract, read in C++: a converted directory's gptbc-config.json and a library's _metadata,
// validated and checked against each other. The twin of python/gptbc/artifact/manifest.py: the same checks in the same
// order with the same one-line messages (tests/test_manifest.py runs both on tests/data/manifests/).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace gptbc::manifest {

// The manifest schema versions this build reads (manifest.MIN_SCHEMA_VERSION .. SCHEMA_VERSION).
constexpr int64_t kMinSchemaVersion = 1;
constexpr int64_t kSchemaVersion = 2;
constexpr const char* kWeightsFile = "gptbc-config.json";

struct Param {
  std::string name;
  std::vector<int64_t> shape;
  std::string dtype;
  std::string file;    // weights only: the shard, a file name in the directory
  std::string repack;  // library only, optional: the library function that makes the loaded tensor (int8 activations)
};

// One model config field that shapes what a library computes (manifest.py `_IDENTITY`): its value as messages show
// it and as compared (activation names that compute the same function compare equal; epsilon as float32).
struct IdentityField {
  std::string key, shown, compared;
};

// What both manifests start with.
struct Header {
  int64_t schema_version = 0;
  std::string gptbc_version;
  int64_t page_size = 0;   // tokens per KV-cache page
  int64_t alignment = 0;   // bytes; a power of two
  int64_t vocab_size = 0, n_embd = 0;
  std::vector<int32_t> config_eos_ids;  // model_config.eos_token_id (absent: none)
  std::string quantization;             // as messages show it: "q4f32_1" or "q4f32_1 (lm_head unquantized)"
  int64_t tensor_parallel = 1;          // ranks the artifact was built for (absent: 1)
  std::vector<IdentityField> identity;  // model_config's _IDENTITY fields, in that order
  std::string bits;                     // quantization.bits as shown ("None" when absent or null)
  std::map<std::string, int64_t> widths;  // quantization.widths: {module: bits} of a per-tensor scheme
  std::vector<Param> params;
};

struct Weights : Header {
  std::string directory, path;  // path: directory + "/gptbc-config.json"
  std::string model_name;
  std::vector<int32_t> eos_ids;
};

struct Library : Header {
  std::string lib;
  std::string target, device;
  int64_t context_window_size = 0, prefill_chunk_size = 0, max_batch_size = 0;
  bool batch_invariant = false;  // built with --batch-invariant (its metadata names an attention grain)
};

// Read and validate DIRECTORY/gptbc-config.json. Throws Error.
Weights read_weights(const std::string& directory);
// Validate a library's _metadata JSON text; `lib` is the library's path, as messages name it. Throws Error.
Library parse_library(const std::string& text, const std::string& lib);
// The library and the weights describe the same model, scheme and layout. Throws Error.
void check_compatible(const Library& lib, const Weights& weights);

}  // namespace gptbc::manifest
