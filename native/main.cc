// gptbc-run: generate with a compiled gptbc model library and converted weights, without Python.
//
//   gptbc-run --model OUT_DIR --lib LIB (--prompt TEXT | --prompt-ids 1,2,3[;4,5]) [--max-new-tokens N]
//             [--temperature T] [--top-p P] [--top-k K] [--seed S] [--ignore-eos] [--json]
//   gptbc-run --model OUT_DIR --lib LIB --bench [--batch B] [--prompt-len P] [--max-new-tokens N]
//             [--warmup W] [--repeats R]
//   ... --draft DRAFT_DIR --draft-lib DRAFT_LIB [--draft-k K]: a smaller model proposes K tokens a step, the
//             model checks them in one call (greedy; the same tokens as without it)
//
// In a folder from `gptbc bundle` (bundle.json beside it), --model and --lib default to the bundle's own.
//
// Text streams to stdout as it is decoded; --json prints one object at the end instead. Every failure is
// one line "error: ..." on stderr and exit status 1.
#include <limits.h>
#include <sched.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <set>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "error.h"
#include "json.h"
#include "model.h"
#include "sampler.h"
#include "tokenizer.h"

namespace {

using gptbc::Error;
namespace json = gptbc::json;

const char kUsage[] =
    "usage: gptbc-run --model OUT_DIR --lib LIB (--prompt TEXT | --prompt-ids 1,2,3[;4,5;...])\n"
    "                 [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S]\n"
    "                 [--ignore-eos] [--json] [--device cpu|vulkan[:N]|cuda[:N]]\n"
    "       gptbc-run --model OUT_DIR --lib LIB --bench [--batch B] [--prompt-len P] [--max-new-tokens N]\n"
    "                 [--warmup W] [--repeats R] [--device ...]\n"
    "       either with --draft DRAFT_DIR --draft-lib DRAFT_LIB [--draft-k K]\n"
    "\n"
    "Generates with a model library from `gptbc compile` (CPU) and weights from `gptbc convert-weight`;\n"
    "in a folder from `gptbc bundle`, --model and --lib default to the bundle's own.\n"
    "Sampling defaults come from the model's generation_config.json (greedy unless it says do_sample).\n"
    "  --device      cpu (default), vulkan[:N] (a --target vulkan library on gptbc's WebGPU runtime) or cuda[:N]\n"
    "                (libgptbc_webgpu.so beside gptbc-run, or GPTBC_WEBGPU_LIB)\n"
    "  --json        print one JSON object (token_ids, text, finish_reason, prompt_tokens, timings)\n"
    "                instead of streaming text\n"
    "  --ignore-eos  keep generating after an eos token (for benchmarks)\n"
    "  --prompt-ids  several prompts separated by ';' are generated together: prefilled one by one, then\n"
    "                decoded in one batch_decode call per step (--json: one object per prompt in \"outputs\";\n"
    "                else one line per prompt, its text as a JSON string)\n"
    "  --draft       a draft model (converted weights and --draft-lib, the same vocabulary): it proposes --draft-k\n"
    "                tokens (default 4) a step, the model verifies them in one call and keeps the tokens it would\n"
    "                have chosen itself plus its own next one: greedy only, the output is the same as without it\n"
    "                (--json adds \"draft\": verifies, drafted, accepted); one prompt at a time\n"
    "  --bench       time B prompts of P made-up ids (default 1 and 128): prefill, then greedy decode of\n"
    "                N - 1 steps (default N 64) in batch_decode calls when B > 1, eos ignored; W untimed\n"
    "                runs (default 1), then R timed ones (default 3); prints one JSON object\n";

struct Args {
  std::string model, lib, device;  // device: cpu unless given (or a bundle's says otherwise)
  std::optional<std::string> prompt, prompt_ids;
  std::map<std::string, std::string> sampling;  // flag → value, applied over the model's defaults
  std::map<std::string, std::string> bench;     // --batch, --prompt-len, --warmup, --repeats → value
  std::string draft, draft_lib, draft_k;        // --draft, --draft-lib, --draft-k (empty: not given)
  bool json = false, ignore_eos = false, help = false, run_bench = false;
};

// The folder this executable is in, with a trailing '/' (qemu-user answers /proc/self/exe for its guest too).
std::string own_dir() {
  char exe[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  std::string self = n > 0 ? std::string(exe, n) : "";
  return self.substr(0, self.rfind('/') + 1);
}

// `gptbc bundle` writes bundle.json beside gptbc-run: the library, the weights folder and every file with its
// size. Use them, once the copy is checked whole (a missing file would otherwise surface as a confusing error).
void use_bundle(Args* a) {
  std::string dir = own_dir(), path = dir + "bundle.json";
  struct stat st {};
  if (dir.empty() || stat(path.c_str(), &st) != 0) return;  // not a bundle: --model and --lib are required
  json::Object b = json::as_object(json::parse_file(path), path);
  for (const auto& item : json::as_array(json::need(b, "files", path), path + ": files")) {
    json::Object f = json::as_object(item, path + ": files");
    std::string name = json::as_string(json::need(f, "path", path), path + ": path");
    int64_t want = json::as_int(json::need(f, "bytes", path), path + ": bytes");
    if (name.empty() || name[0] == '/' || name.find("..") != std::string::npos)
      throw Error(path + ": file " + name + " is not a path inside the bundle");
    if (stat((dir + name).c_str(), &st) != 0)
      throw Error("bundle " + dir + ": " + name + " is missing (copy the whole folder)");
    if (st.st_size != want) {
      throw Error("bundle " + dir + ": " + name + " is " + std::to_string(st.st_size) + " bytes, bundle.json says " +
                  std::to_string(want) + " (an incomplete copy?)");
    }
  }
  a->model = dir + json::as_string(json::need(b, "model", path), path + ": model");
  a->lib = dir + json::as_string(json::need(b, "lib", path), path + ": lib");
  // A bundle of a CUDA library runs on CUDA unless --device says otherwise.
  if (a->device.empty() && b.count("device")) a->device = json::as_string(b.at("device"), path + ": device");
}

Args parse_args(int argc, char** argv) {
  Args a;
  const std::vector<std::string> valued = {"--model", "--lib", "--device", "--prompt", "--prompt-ids", "--max-new-tokens",
                                           "--temperature", "--top-p", "--top-k", "--seed", "--batch", "--prompt-len",
                                           "--warmup", "--repeats", "--draft", "--draft-lib", "--draft-k"};
  const std::vector<std::string> bench_only = {"--batch", "--prompt-len", "--warmup", "--repeats"};
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i], value;
    bool inline_value = false;
    if (size_t eq = flag.find('='); flag.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
      inline_value = true;
    }
    if (flag == "--json" || flag == "--ignore-eos" || flag == "--help" || flag == "-h" || flag == "--bench") {
      if (inline_value) throw Error(flag + " takes no value");
      (flag == "--json" ? a.json : flag == "--ignore-eos" ? a.ignore_eos : flag == "--bench" ? a.run_bench : a.help) = true;
      continue;
    }
    if (std::find(valued.begin(), valued.end(), flag) == valued.end())
      throw Error("unknown option " + flag + " (see --help)");
    if (!inline_value) {
      if (i + 1 >= argc) throw Error(flag + " needs a value");
      value = argv[++i];
    }
    if (flag == "--model") a.model = value;
    else if (flag == "--lib") a.lib = value;
    else if (flag == "--device") a.device = value;
    else if (flag == "--prompt") a.prompt = value;
    else if (flag == "--prompt-ids") a.prompt_ids = value;
    else if (flag == "--draft") a.draft = value;
    else if (flag == "--draft-lib") a.draft_lib = value;
    else if (flag == "--draft-k") a.draft_k = value;
    else if (std::find(bench_only.begin(), bench_only.end(), flag) != bench_only.end()) a.bench[flag] = value;
    else a.sampling[flag] = value;
  }
  if (a.help) return a;
  if (a.model.empty() && a.lib.empty()) use_bundle(&a);
  if (a.device.empty()) a.device = "cpu";
  if (a.model.empty()) throw Error("--model is required (a directory from `gptbc convert-weight`)");
  if (a.lib.empty()) throw Error("--lib is required (a library from `gptbc compile`)");
  if (a.draft.empty() != a.draft_lib.empty())
    throw Error(a.draft.empty() ? "--draft-lib needs --draft (the draft's converted weights)"
                                : "--draft needs --draft-lib (the draft's compiled library)");
  if (!a.draft_k.empty() && a.draft.empty()) throw Error("--draft-k needs --draft");
  if (!a.draft.empty() && a.run_bench) throw Error("--draft does not apply to --bench (time it with --json on a prompt)");
  if (a.run_bench) {
    if (a.prompt || a.prompt_ids) throw Error("--bench makes its own prompts (--prompt-len); drop --prompt/--prompt-ids");
    for (const auto& [flag, value] : a.sampling) {
      if (flag != "--max-new-tokens") throw Error("--bench decodes greedily: " + flag + " does not apply");
    }
    return a;
  }
  if (!a.bench.empty()) throw Error(a.bench.begin()->first + " is a --bench option");
  if (a.prompt.has_value() == a.prompt_ids.has_value()) throw Error("give exactly one of --prompt and --prompt-ids");
  return a;
}

int64_t parse_int(const std::string& flag, const std::string& text) {
  size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) throw Error(flag + " expects an integer, got '" + text + "'");
  return v;
}

double parse_number(const std::string& flag, const std::string& text) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || !std::isfinite(v))
    throw Error(flag + " expects a number, got '" + text + "'");
  return v;
}

gptbc::SamplingParams sampling_params(const Args& a) {
  gptbc::SamplingParams p = gptbc::generation_defaults(a.model);
  for (const auto& [flag, value] : a.sampling) {
    if (flag == "--max-new-tokens") p.max_new_tokens = parse_int(flag, value);
    else if (flag == "--temperature") p.temperature = parse_number(flag, value);
    else if (flag == "--top-p") p.top_p = parse_number(flag, value);
    else if (flag == "--top-k") p.top_k = parse_int(flag, value);
    else if (flag == "--seed") {
      int64_t s = parse_int(flag, value);
      if (s < 0) throw Error("--seed must be a non-negative integer");
      p.seed = static_cast<uint64_t>(s);
    }
  }
  p.validate("--");
  return p;
}

// "1,2, 3" → ids (as `gptbc generate --prompt-ids`); "1,2;3" → two prompts.
std::vector<std::vector<int32_t>> parse_ids(const std::string& text) {
  std::vector<std::vector<int32_t>> prompts;
  std::stringstream all(text);
  for (std::string one; std::getline(all, one, ';');) {
    prompts.emplace_back();
    std::stringstream in(one);
    for (std::string item; std::getline(in, item, ',');) {
      item.erase(std::remove(item.begin(), item.end(), ' '), item.end());
      if (item.empty()) continue;
      size_t used = 0;
      long long v = 0;
      try {
        v = std::stoll(item, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used == 0 || used != item.size() || v < INT32_MIN || v > INT32_MAX)
        throw Error("--prompt-ids '" + text + "': expected comma-separated integers like 1,2,3 (prompts separated by ;)");
      prompts.back().push_back(static_cast<int32_t>(v));
    }
  }
  if (!text.empty() && text.back() == ';') prompts.emplace_back();  // "1,2;" names an empty second prompt
  if (prompts.empty()) prompts.emplace_back();
  return prompts;
}

void check_prompt(const std::vector<int32_t>& ids, const gptbc::Model& model, int64_t max_new_tokens) {
  if (ids.empty()) throw Error("prompt is empty: give at least one token (an empty prompt between ';'?)");
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= model.vocab_size()) {
      throw Error("token id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                  " is outside the vocabulary (0.." + std::to_string(model.vocab_size() - 1) + ")");
    }
  }
  int64_t need = static_cast<int64_t>(ids.size()) + max_new_tokens;
  if (need > model.context_window_size()) {
    throw Error("prompt of " + std::to_string(ids.size()) + " tokens + max_new_tokens " +
                std::to_string(max_new_tokens) + " = " + std::to_string(need) + " exceeds the context window of " +
                std::to_string(model.context_window_size()) + " tokens (lower --max-new-tokens)");
  }
}

// Writes text as tokens arrive, never half a UTF-8 character: bytes of an incomplete character wait for
// the next token; what can never become valid is written as U+FFFD.
class TextStream {
 public:
  explicit TextStream(bool echo) : echo_(echo) {}
  void add(const std::string& bytes) {
    pending_ += bytes;
    size_t n = gptbc::utf8_complete_prefix(pending_);
    emit(gptbc::utf8_lossy(pending_.substr(0, n)));
    pending_.erase(0, n);
  }
  void finish() {
    emit(gptbc::utf8_lossy(pending_));
    pending_.clear();
  }
  const std::string& text() const { return text_; }

 private:
  void emit(const std::string& s) {
    if (s.empty()) return;
    text_ += s;
    if (echo_) {
      std::fwrite(s.data(), 1, s.size(), stdout);
      std::fflush(stdout);
    }
  }
  bool echo_;
  std::string pending_, text_;
};

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

std::string ids_json(const std::vector<int32_t>& ids) {
  std::string out = "[";
  for (size_t i = 0; i < ids.size(); ++i) out += (i ? ", " : "") + std::to_string(ids[i]);
  return out + "]";
}

struct Generation {
  std::vector<int32_t> ids;
  std::string finish = "length";  // or "stop": an eos token ended it (and is the last id)
  double prefill_s = 0, decode_s = 0;
};

// Add `token` to gen (and its text to the stream, unless it is the eos token or a special one); false once the
// generation is over: an eos token (kept in the ids, not in the text) or max_new_tokens.
bool emit(Generation* gen, int32_t token, const gptbc::Model& model, int64_t max_new_tokens, bool ignore_eos,
          const gptbc::Tokenizer* tok, TextStream* stream) {
  gen->ids.push_back(token);
  const auto& eos_ids = model.eos_ids();
  bool eos = !ignore_eos && std::find(eos_ids.begin(), eos_ids.end(), token) != eos_ids.end();
  if (tok && !eos && !tok->is_special(token)) stream->add(tok->token_bytes(token));
  if (eos) gen->finish = "stop";
  return !eos && static_cast<int64_t>(gen->ids.size()) < max_new_tokens;
}

// Prefill the prompt, then sample and decode until an eos token or max_new_tokens, as the Python engine's
// loop does: the eos token is kept in the ids but not in the text, and no decode runs after the last token.
Generation generate(gptbc::Model& model, const std::vector<int32_t>& prompt, const gptbc::SamplingParams& params,
                    bool ignore_eos, const gptbc::Tokenizer* tok, TextStream* stream) {
  Generation gen;
  gptbc::Sampler sampler(params, model.vocab_size());
  for (int32_t t : prompt) sampler.saw(t);
  if (params.max_new_tokens > 0) {
    model.start(static_cast<int64_t>(prompt.size()) + params.max_new_tokens);
    auto t0 = std::chrono::steady_clock::now();
    const std::vector<float>* logits = &model.prefill(prompt);
    gen.prefill_s = seconds_since(t0);
    auto t1 = std::chrono::steady_clock::now();
    while (true) {
      int32_t token = sampler.next(*logits);
      sampler.saw(token);
      if (!emit(&gen, token, model, params.max_new_tokens, ignore_eos, tok, stream)) break;
      logits = &model.decode(token);
    }
    gen.decode_s = seconds_since(t1);
  }
  stream->finish();
  return gen;
}

struct DraftStats {
  int64_t verifies = 0, drafted = 0, accepted = 0;
};

int32_t argmax(const float* row, int64_t n) { return static_cast<int32_t>(std::max_element(row, row + n) - row); }

// generate() with a draft model, greedy: each step the draft proposes up to k tokens after the last one (one
// decode call each), the model appends the last token and the proposals in one verify call, and keeps each
// proposal its own choice (the same Sampler, so the same tokens as generate()) agrees with, then its own next
// token. Both KV caches then drop what was not kept; a draft that had all k accepted lags one token behind,
// fed with the next step's first call.
Generation generate_drafted(gptbc::Model& model, gptbc::Model& draft, const std::vector<int32_t>& prompt,
                            const gptbc::SamplingParams& params, int64_t k, bool ignore_eos, const gptbc::Tokenizer* tok,
                            TextStream* stream, DraftStats* stats) {
  Generation gen;
  gptbc::Sampler sampler(params, model.vocab_size());
  for (int32_t t : prompt) sampler.saw(t);
  if (params.max_new_tokens <= 0) {
    stream->finish();
    return gen;
  }
  const int64_t room = static_cast<int64_t>(prompt.size()) + params.max_new_tokens + k + 1;  // a verify overshoots
  model.start(room);
  draft.start(room);
  const int64_t vocab = model.vocab_size();
  bool done = false;
  auto add = [&](int32_t token) {  // false once generation ends (eos or max_new_tokens)
    done = !emit(&gen, token, model, params.max_new_tokens, ignore_eos, tok, stream);
    return !done;
  };
  auto t0 = std::chrono::steady_clock::now();
  int32_t token = sampler.next(model.prefill(prompt));
  sampler.saw(token);
  std::vector<int32_t> behind(prompt);  // tokens the draft has not read yet (then the last emitted one)
  gen.prefill_s = seconds_since(t0);
  auto t1 = std::chrono::steady_clock::now();
  while (add(token)) {
    const int64_t n = std::min<int64_t>(k, params.max_new_tokens - static_cast<int64_t>(gen.ids.size()) - 1);
    behind.push_back(token);
    if (n <= 0) {  // room for one more token only: a plain step, the draft kept in step for nothing
      token = sampler.next(model.decode(token));
      sampler.saw(token);
      continue;
    }
    std::vector<int32_t> proposed;
    const std::vector<float>* dl = behind.size() == 1 ? &draft.decode(behind[0]) : &draft.prefill(behind);
    behind.clear();
    for (int64_t i = 0; i < n; ++i) {
      if (i > 0) dl = &draft.decode(proposed.back());
      proposed.push_back(argmax(dl->data(), vocab));
    }
    std::vector<int32_t> fed{token};
    fed.insert(fed.end(), proposed.begin(), proposed.end());
    const std::vector<float>& rows = model.verify(fed);
    int64_t agreed = 0;
    std::vector<float> row(vocab);
    while (true) {  // the model's own choice after fed[agreed]
      row.assign(rows.begin() + agreed * vocab, rows.begin() + (agreed + 1) * vocab);
      token = sampler.next(row);
      sampler.saw(token);
      if (agreed == n || token != proposed[agreed]) break;
      ++agreed;
      if (!add(token)) break;
    }
    stats->verifies += 1;
    stats->drafted += n;
    stats->accepted += agreed;
    if (done) break;
    model.pop(n - agreed);  // it read token and all n proposals; keep token and the agreed ones
    // the draft read token and proposals 0..n-2: keep token and the agreed ones; all n agreed: it lacks the last
    if (agreed < n) draft.pop(n - 1 - agreed);
    else behind.push_back(proposed.back());
  }
  gen.decode_s = seconds_since(t1);
  stream->finish();
  return gen;
}

// The draft must speak the model's token ids: the same vocabulary size and, with tokenizer files, the same
// bytes for every id (as the Python engine's check_same_vocabulary).
void check_same_vocabulary(const gptbc::Model& model, const gptbc::Tokenizer* tok, const gptbc::Model& draft,
                           const std::string& draft_dir) {
  if (model.vocab_size() != draft.vocab_size()) {
    throw Error("--draft " + draft_dir + ": vocabulary of " + std::to_string(draft.vocab_size()) + " tokens, the model " +
                model.model_dir() + " has " + std::to_string(model.vocab_size()) +
                " (a draft model must share the model's tokenizer)");
  }
  std::string path = draft_dir + "/tokenizer.json";
  struct stat st {};
  bool theirs = stat(path.c_str(), &st) == 0;
  if (!tok && !theirs) return;
  if (!tok || !theirs) {
    throw Error("--draft " + draft_dir + ": " + (tok ? draft_dir : model.model_dir()) +
                " has no tokenizer.json, so the two vocabularies cannot be compared");
  }
  gptbc::Tokenizer other(path);
  for (int32_t i = 0; i < std::max(tok->size(), other.size()); ++i) {
    if (tok->token_bytes(i) != other.token_bytes(i) || tok->is_special(i) != other.is_special(i)) {
      throw Error("--draft " + draft_dir + ": token " + std::to_string(i) + " is " + json::quote(other.token_bytes(i)) +
                  " there but " + json::quote(tok->token_bytes(i)) + " in the model " + model.model_dir() +
                  " (a draft model must share the model's tokenizer)");
    }
  }
}

// Several prompts together: each prefilled alone (its own sequence), then every unfinished one decoded in
// one batch_decode call per step, so a library's batched kernels produce the tokens. Each prompt samples
// with its own Sampler (the same parameters), and leaves the batch at its eos token or max_new_tokens.
std::vector<Generation> generate_batch(gptbc::Model& model, const std::vector<std::vector<int32_t>>& prompts,
                                       const gptbc::SamplingParams& params, bool ignore_eos) {
  const size_t n = prompts.size();
  std::vector<Generation> gens(n);
  if (params.max_new_tokens <= 0) return gens;
  std::vector<gptbc::Sampler> samplers;
  std::vector<int64_t> room;
  for (const auto& prompt : prompts) {
    samplers.emplace_back(params, model.vocab_size());
    for (int32_t t : prompt) samplers.back().saw(t);
    room.push_back(static_cast<int64_t>(prompt.size()) + params.max_new_tokens);
  }
  model.start(room);
  const auto& eos_ids = model.eos_ids();
  const int64_t vocab = model.vocab_size();
  std::vector<float> row(vocab);
  std::vector<int64_t> active;  // sequences still generating
  // Sample sequence i's next token from `logits` (vocab floats at `from`); true if it goes on.
  auto choose = [&](size_t i, const std::vector<float>& logits, size_t from) {
    row.assign(logits.begin() + from, logits.begin() + from + vocab);
    int32_t token = samplers[i].next(row);
    samplers[i].saw(token);
    gens[i].ids.push_back(token);
    if (!ignore_eos && std::find(eos_ids.begin(), eos_ids.end(), token) != eos_ids.end()) {
      gens[i].finish = "stop";
      return false;
    }
    return static_cast<int64_t>(gens[i].ids.size()) < params.max_new_tokens;
  };
  auto t0 = std::chrono::steady_clock::now();
  for (size_t i = 0; i < n; ++i) {
    if (choose(i, model.prefill(prompts[i], static_cast<int64_t>(i)), 0)) active.push_back(static_cast<int64_t>(i));
  }
  double prefill_s = seconds_since(t0);
  auto t1 = std::chrono::steady_clock::now();
  while (!active.empty()) {
    std::vector<int32_t> last;
    for (int64_t i : active) last.push_back(gens[i].ids.back());
    const std::vector<float>& logits = model.decode_batch(active, last);
    std::vector<int64_t> still;
    for (size_t k = 0; k < active.size(); ++k) {
      if (choose(static_cast<size_t>(active[k]), logits, k * vocab)) still.push_back(active[k]);
    }
    active = still;
  }
  double decode_s = seconds_since(t1);
  for (auto& g : gens) {
    g.prefill_s = prefill_s;
    g.decode_s = decode_s;
  }
  return gens;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

std::string seconds_json(const std::vector<double>& v) {
  std::string out = "[";
  char buf[32];
  for (size_t i = 0; i < v.size(); ++i) {
    std::snprintf(buf, sizeof(buf), "%.6f", v[i]);
    out += (i ? ", " : "") + std::string(buf);
  }
  return out + "]";
}

// --bench: `batch` made-up prompts of `prompt_len` ids, prefilled one after another, then greedy decode of
// max_new_tokens - 1 steps (decode for one prompt, batch_decode for several), eos ignored. Untimed warm-up
// runs first (kernel loading, allocator pools), then `repeats` timed ones; each reads the logits back to the
// host, which waits for the device, so a time covers the work it names. Prints one JSON object.
void bench(gptbc::Model& model, const Args& args, int64_t max_new_tokens, double load_s) {
  auto option = [&](const char* flag, int64_t fallback, int64_t low) {
    auto it = args.bench.find(flag);
    int64_t v = it == args.bench.end() ? fallback : parse_int(flag, it->second);
    if (v < low) throw Error(std::string(flag) + " must be at least " + std::to_string(low));
    return v;
  };
  const int64_t batch = option("--batch", 1, 1), prompt_len = option("--prompt-len", 128, 1);
  const int64_t warmup = option("--warmup", 1, 0), repeats = option("--repeats", 3, 1);
  if (max_new_tokens < 2) throw Error("--bench needs --max-new-tokens of at least 2 (one decode step)");
  if (batch > model.max_batch_size()) {
    throw Error("--batch " + std::to_string(batch) + " is over the library's max_batch_size " +
                std::to_string(model.max_batch_size()) + " (compile with --max-batch-size)");
  }
  std::vector<std::vector<int32_t>> prompts(batch);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < prompt_len; ++i)  // spread over the vocabulary, different for each prompt
      prompts[b].push_back(static_cast<int32_t>((i * 7919 + b * 104729 + 1) % model.vocab_size()));
    check_prompt(prompts[b], model, max_new_tokens);
  }
  gptbc::SamplingParams greedy;
  greedy.max_new_tokens = max_new_tokens;
  std::vector<double> prefill_s, decode_s;
  for (int64_t r = 0; r < warmup + repeats; ++r) {
    Generation g;
    if (batch == 1) {
      TextStream quiet(false);
      g = generate(model, prompts[0], greedy, true, nullptr, &quiet);
    } else {
      g = generate_batch(model, prompts, greedy, true)[0];
    }
    if (r >= warmup) {
      prefill_s.push_back(g.prefill_s);
      decode_s.push_back(g.decode_s);
    }
  }
  const int64_t steps = max_new_tokens - 1;
  double p = median(prefill_s), d = median(decode_s);
  std::printf(
      "{\"bench\": {\"device\": \"%s\", \"batch\": %lld, \"prompt_tokens\": %lld, \"decode_steps\": %lld, "
      "\"warmup\": %lld, \"repeats\": %lld, \"prefill_s\": %s, \"decode_s\": %s, "
      "\"prefill_tokens_per_s\": %.4f, \"decode_tokens_per_s\": %.4f, \"decode_steps_per_s\": %.4f, "
      "\"weight_bytes\": %llu, \"load_s\": %.6f}}\n",
      model.device_kind().c_str(), static_cast<long long>(batch), static_cast<long long>(prompt_len),
      static_cast<long long>(steps), static_cast<long long>(warmup), static_cast<long long>(repeats),
      seconds_json(prefill_s).c_str(), seconds_json(decode_s).c_str(), p > 0 ? batch * prompt_len / p : 0.0,
      d > 0 ? batch * steps / d : 0.0, d > 0 ? steps / d : 0.0,
      static_cast<unsigned long long>(model.mapped_bytes() + model.copied_bytes()), load_s);
}

void print_json(const Generation& gen, const std::vector<int32_t>& prompt, const std::optional<std::string>& text,
                double load_s, const gptbc::Model& model, const DraftStats* draft) {
  size_t steps = gen.ids.empty() ? 0 : gen.ids.size() - 1;  // tokens after the one prefill chose
  std::string drafted = "";
  if (draft) {
    drafted = ", \"draft\": {\"verifies\": " + std::to_string(draft->verifies) + ", \"drafted\": " +
              std::to_string(draft->drafted) + ", \"accepted\": " + std::to_string(draft->accepted) + "}";
  }
  std::printf(
      "{\"token_ids\": %s, \"text\": %s, \"finish_reason\": \"%s\", \"prompt_tokens\": %zu, \"prompt_ids\": %s, "
      "\"load_s\": %.6f, \"prefill_s\": %.6f, \"decode_s\": %.6f, \"decode_steps\": %zu, "
      "\"decode_tokens_per_s\": %.4f, \"mapped_weight_bytes\": %llu, \"copied_weight_bytes\": %llu, "
      "\"huge_page_weight_bytes\": %llu%s}\n",
      ids_json(gen.ids).c_str(), text ? gptbc::json::quote(*text).c_str() : "null", gen.finish.c_str(),
      prompt.size(), ids_json(prompt).c_str(), load_s, gen.prefill_s, gen.decode_s, steps,
      steps && gen.decode_s > 0 ? steps / gen.decode_s : 0.0, static_cast<unsigned long long>(model.mapped_bytes()),
      static_cast<unsigned long long>(model.copied_bytes()), static_cast<unsigned long long>(model.huge_page_bytes()),
      drafted.c_str());
}

// The text of ids as the stream writes it (special tokens and the eos token left out).
std::string ids_text(const gptbc::Tokenizer& tok, const Generation& gen) {
  TextStream text(false);
  for (size_t i = 0; i < gen.ids.size(); ++i) {
    bool eos = gen.finish == "stop" && i + 1 == gen.ids.size();
    if (!eos && !tok.is_special(gen.ids[i])) text.add(tok.token_bytes(gen.ids[i]));
  }
  text.finish();
  return text.text();
}

// Several prompts' results: --json one object with "outputs" (one per prompt, in order), else one line each
// (the text as a JSON string, or the ids without a tokenizer).
void print_batch(const std::vector<Generation>& gens, const std::vector<std::vector<int32_t>>& prompts,
                 const gptbc::Tokenizer* tok, bool as_json, double load_s) {
  if (!as_json) {
    for (const auto& g : gens) {
      std::string line;
      if (tok) line = gptbc::json::quote(ids_text(*tok, g));  // quoted: a text may hold line breaks
      else for (size_t i = 0; i < g.ids.size(); ++i) line += (i ? "," : "") + std::to_string(g.ids[i]);
      std::puts(line.c_str());
    }
    return;
  }
  std::string out = "{\"outputs\": [";
  for (size_t i = 0; i < gens.size(); ++i) {
    out += std::string(i ? ", " : "") + "{\"token_ids\": " + ids_json(gens[i].ids) + ", \"text\": " +
           (tok ? gptbc::json::quote(ids_text(*tok, gens[i])) : "null") + ", \"finish_reason\": \"" +
           gens[i].finish + "\", \"prompt_tokens\": " + std::to_string(prompts[i].size()) + "}";
  }
  char tail[160];
  std::snprintf(tail, sizeof(tail), "], \"load_s\": %.6f, \"prefill_s\": %.6f, \"decode_s\": %.6f}", load_s,
                gens.empty() ? 0.0 : gens[0].prefill_s, gens.empty() ? 0.0 : gens[0].decode_s);
  std::puts((out + tail).c_str());
}

// Cores (not SMT siblings) among the CPUs this process may run on, from sysfs; CPUs if that is missing.
int physical_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  std::set<std::string> cores;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &set)) continue;
    std::string topo = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
    std::ifstream pkg(topo + "physical_package_id"), core(topo + "core_id");
    std::string p, c;
    if (pkg >> p && core >> c) {
      cores.insert(p + ":" + c);
    } else {
      cores.insert("cpu" + std::to_string(cpu));
    }
  }
  return std::max<int>(1, static_cast<int>(cores.size()));
}

// TVM's pool starts half as many workers as CPUs on x86 (it assumes SMT pairs): on a machine with one
// thread per core that halves decode speed. One worker per physical core, unless TVM_NUM_THREADS is set;
// the pool reads it when it starts, at the first parallel kernel (the same rule as runtime.py).
void use_all_cores() {
  if (std::getenv("TVM_NUM_THREADS") == nullptr)
    setenv("TVM_NUM_THREADS", std::to_string(physical_cores()).c_str(), 0);
}

int run(int argc, char** argv) {
  Args args = parse_args(argc, argv);
  if (args.help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  use_all_cores();
  auto start = std::chrono::steady_clock::now();
  gptbc::SamplingParams params = sampling_params(args);
  gptbc::Model model(args.model, args.lib, args.device);

  if (args.run_bench) {
    bench(model, args, params.max_new_tokens, seconds_since(start));
    return 0;
  }
  std::string tok_path = args.model + "/tokenizer.json";
  struct stat st {};
  std::unique_ptr<gptbc::Tokenizer> tok;
  if (stat(tok_path.c_str(), &st) == 0) tok = std::make_unique<gptbc::Tokenizer>(tok_path);
  std::vector<std::vector<int32_t>> prompts;
  if (args.prompt) {
    if (!tok) throw Error(args.model + ": no tokenizer.json; pass --prompt-ids instead of text");
    prompts = {tok->encode(*args.prompt)};
  } else {
    prompts = parse_ids(*args.prompt_ids);
  }
  for (const auto& prompt : prompts) check_prompt(prompt, model, params.max_new_tokens);
  std::unique_ptr<gptbc::Model> draft;
  int64_t draft_k = 4;
  if (!args.draft.empty()) {
    if (!args.draft_k.empty()) draft_k = parse_int("--draft-k", args.draft_k);
    if (draft_k < 1 || draft_k > 16) throw Error("--draft-k must be in 1..16, got " + std::to_string(draft_k));
    if (prompts.size() > 1) throw Error("--draft: one prompt at a time (the Python engine drafts for a batch)");
    if (!params.greedy())
      throw Error("--draft: gptbc-run drafts for greedy decoding only; add --temperature 0 (the Python engine samples with a draft)");
    if (model.batch_invariant()) {
      throw Error("--draft with a --batch-invariant library: not supported together (the bit-for-bit guarantee is "
                  "checked with prompt lookup only, not with a draft model's verifies)");
    }
    draft = std::make_unique<gptbc::Model>(args.draft, args.draft_lib, args.device);
    check_same_vocabulary(model, tok.get(), *draft, args.draft);
    int64_t need = static_cast<int64_t>(prompts[0].size()) + params.max_new_tokens + draft_k + 1;
    for (const gptbc::Model* m : {&model, draft.get()}) {
      if (need > m->context_window_size()) {
        throw Error("--draft: prompt + --max-new-tokens + --draft-k + 1 = " + std::to_string(need) + " tokens exceeds " +
                    m->model_dir() + "'s context window of " + std::to_string(m->context_window_size()) + " tokens");
      }
    }
  }
  double load_s = seconds_since(start);
  if (prompts.size() > 1) {
    print_batch(generate_batch(model, prompts, params, args.ignore_eos), prompts, tok.get(), args.json, load_s);
    return 0;
  }
  const std::vector<int32_t>& prompt = prompts[0];

  TextStream stream(tok && !args.json);
  Generation gen;
  std::optional<DraftStats> drafted;
  if (draft) {
    drafted.emplace();
    gen = generate_drafted(model, *draft, prompt, params, draft_k, args.ignore_eos, tok.get(), &stream, &*drafted);
  } else {
    gen = generate(model, prompt, params, args.ignore_eos, tok.get(), &stream);
  }
  if (args.json) {
    print_json(gen, prompt, tok ? std::optional<std::string>(stream.text()) : std::nullopt, load_s, model,
               drafted ? &*drafted : nullptr);
  } else if (tok) {
    std::fputs("\n", stdout);
  } else {
    std::string line;
    for (size_t i = 0; i < gen.ids.size(); ++i) line += (i ? "," : "") + std::to_string(gen.ids[i]);
    std::puts(line.c_str());
  }
  return 0;
}

// One line, whatever the message held.
int fail(std::string what) {
  for (char& c : what)
    if (c == '\n' || c == '\r') c = ' ';
  std::fflush(stdout);
  std::fprintf(stderr, "error: %s\n", what.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const Error& e) {
    return fail(e.what());
  } catch (const tvm::ffi::Error& e) {
    std::string msg = e.message();
    return fail("TVM: " + msg.substr(0, msg.find('\n')));
  } catch (const std::bad_alloc&) {
    return fail("out of memory");
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}
