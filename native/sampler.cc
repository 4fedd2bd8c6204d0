#include "sampler.h"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "error.h"
#include "json.h"

namespace gptbc {

void SamplingParams::validate(const std::string& where) const {
  auto need = [&](bool ok, const char* flag, const std::string& rule) {
    if (!ok) throw Error(where + flag + " " + rule);
  };
  need(max_new_tokens >= 0, "max-new-tokens", "must be an integer >= 0");
  // The ranges of python/gptbc/sampling.py's RANGES, with its wording (tests/test_native.py compares them).
  need(std::isfinite(temperature) && temperature >= 0 && temperature <= 2, "temperature",
       "must be in [0, 2] (0, or anything below 1e-05, is greedy)");
  need(top_k >= 0, "top-k", "must be an integer >= 0 (0 is off)");
  need(std::isfinite(top_p) && top_p > 0 && top_p <= 1, "top-p", "must be in (0, 1]");
  need(std::isfinite(min_p) && min_p >= 0 && min_p <= 1, "min-p", "must be in [0, 1]");
  need(std::isfinite(repetition_penalty) && repetition_penalty >= 0.01 && repetition_penalty <= 10, "repetition-penalty",
       "must be in [0.01, 10] (1 is off)");
}

SamplingParams generation_defaults(const std::string& model_dir) {
  SamplingParams p;
  std::string path = model_dir + "/generation_config.json";
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) return p;
  json::Object cfg = json::as_object(json::parse_file(path), path);
  auto number = [&](const char* key, double fallback) {
    auto v = json::find(cfg, key);
    return v ? json::as_number(*v, path + ": " + key) : fallback;
  };
  auto sample = json::find(cfg, "do_sample");
  if (sample && sample->as<bool>().value_or(false)) {
    p.temperature = number("temperature", 1.0);
    p.top_k = static_cast<int64_t>(number("top_k", 0));
    double top_p = number("top_p", 1.0);
    p.top_p = top_p == 0 ? 1.0 : top_p;  // Python: `float(cfg.get("top_p", 1.0) or 1.0)`
    p.min_p = number("min_p", 0.0);
  }
  p.repetition_penalty = number("repetition_penalty", 1.0);
  p.max_new_tokens = static_cast<int64_t>(number("max_new_tokens", 64));
  p.validate(path + ": ");
  return p;
}

Sampler::Sampler(const SamplingParams& params, int64_t vocab_size)
    : p_(params), rng_(params.seed ? *params.seed : std::random_device{}()), seen_(vocab_size, false) {}

void Sampler::saw(int32_t token) {
  if (token >= 0 && static_cast<size_t>(token) < seen_.size()) seen_[token] = true;
}

int32_t Sampler::next(const std::vector<float>& logits) {
  const size_t n = logits.size();
  x_.assign(logits.begin(), logits.end());
  if (p_.repetition_penalty != 1.0) {  // HF/CTRL: shrink the logits of tokens already seen
    for (size_t i = 0; i < n; ++i)
      if (seen_[i]) x_[i] = x_[i] > 0 ? x_[i] / p_.repetition_penalty : x_[i] * p_.repetition_penalty;
  }
  if (p_.greedy()) return static_cast<int32_t>(std::max_element(x_.begin(), x_.end()) - x_.begin());  // first max

  for (double& v : x_) v /= p_.temperature;
  if (p_.top_k > 0 && static_cast<size_t>(p_.top_k) < n) {
    std::vector<double> sorted(x_);
    std::nth_element(sorted.begin(), sorted.begin() + (p_.top_k - 1), sorted.end(), std::greater<double>());
    double kth = sorted[p_.top_k - 1];
    for (double& v : x_)
      if (v < kth) v = -std::numeric_limits<double>::infinity();
  }
  double top = *std::max_element(x_.begin(), x_.end());
  probs_.resize(n);
  double sum = 0;
  for (size_t i = 0; i < n; ++i) sum += probs_[i] = std::exp(x_[i] - top);
  for (double& q : probs_) q /= sum;
  if (p_.min_p > 0) {
    double cut = p_.min_p * *std::max_element(probs_.begin(), probs_.end());
    for (double& q : probs_)
      if (q < cut) q = 0;
  }
  if (p_.top_p < 1.0) {  // keep the smallest most-likely prefix whose mass reaches top_p
    order_.resize(n);
    std::iota(order_.begin(), order_.end(), 0);
    std::stable_sort(order_.begin(), order_.end(), [&](int32_t a, int32_t b) { return probs_[a] > probs_[b]; });
    double total = std::accumulate(probs_.begin(), probs_.end(), 0.0), cum = 0;
    size_t keep = 0;
    while (keep < n && cum < p_.top_p * total) cum += probs_[order_[keep++]];
    for (size_t i = std::max<size_t>(keep, 1); i < n; ++i) probs_[order_[i]] = 0;
  }
  // Inverse-CDF draw with a uniform double made from 53 random bits (portable, unlike
  // std::uniform_real_distribution, so a seed means the same tokens on every standard library).
  double mass = std::accumulate(probs_.begin(), probs_.end(), 0.0);
  double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53 * mass, cum = 0;
  size_t last = 0;
  for (size_t i = 0; i < n; ++i) {
    if (probs_[i] <= 0) continue;
    last = i;
    cum += probs_[i];
    if (u < cum) return static_cast<int32_t>(i);
  }
  return static_cast<int32_t>(last);  // rounding left u just above the total
}

}  // namespace gptbc
