// Choosing the next token from logits, as the Python engine's sampling.py does: greedy, or temperature
// with top-k / top-p / min-p, after a repetition penalty; seeded for reproducible runs.
#pragma once

#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace gptbc {

struct SamplingParams {
  int64_t max_new_tokens = 64;
  double temperature = 0.0;  // below kGreedyBelow: greedy
  int64_t top_k = 0;         // 0: off
  double top_p = 1.0;
  double min_p = 0.0;
  double repetition_penalty = 1.0;  // 1: off
  std::optional<uint64_t> seed;     // none: a random one

  // As sampling.py's GREEDY_BELOW: logits / 1e-308 would overflow to inf, then NaN.
  static constexpr double kGreedyBelow = 1e-5;
  bool greedy() const { return temperature < kGreedyBelow || top_k == 1; }
  // Error naming the first out-of-range value (the same rules as SamplingParams.validate in Python).
  void validate(const std::string& where) const;
};

// The model directory's generation_config.json defaults (greedy unless it says do_sample), as
// gptbc.sampling.generation_defaults reads them. No file: the defaults above.
SamplingParams generation_defaults(const std::string& model_dir);

class Sampler {
 public:
  Sampler(const SamplingParams& params, int64_t vocab_size);
  // Count tokens the repetition penalty applies to (the prompt and each chosen token).
  void saw(int32_t token);
  int32_t next(const std::vector<float>& logits);

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
  std::vector<bool> seen_;
  std::vector<double> x_, probs_;  // scratch, reused across steps
  std::vector<int32_t> order_;
};

}  // namespace gptbc
