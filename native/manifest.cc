#include "manifest.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <map>
#include <optional>
#include <set>

#include "error.h"
#include "json.h"
#include "unicode_table.h"

namespace gptbc::manifest {

namespace ffi = tvm::ffi;

namespace {

// A JSON value's type, as messages name it (manifest.py `_kind`).
std::string kind_of(const json::Value& v) {
  switch (v.type_index()) {
    case ffi::TypeIndex::kTVMFFINone: return "null";
    case ffi::TypeIndex::kTVMFFIBool: return "boolean";
    case ffi::TypeIndex::kTVMFFIInt: return "integer";
    case ffi::TypeIndex::kTVMFFIFloat: return "number";
    default: break;
  }
  if (v.as<ffi::String>()) return "string";
  if (v.as<json::Array>()) return "array";
  if (v.as<json::Object>()) return "object";
  return "unknown";
}

// Typed field access whose errors read "WHERE: FIELD must be ..., got TYPE" / "WHERE: missing field FIELD".
struct Reader {
  std::string where;

  Error fail(const std::string& what) const { return Error(where + ": " + what); }

  static bool has(const json::Object& o, const std::string& key) { return o.find(ffi::String(key)) != o.end(); }

  json::Value need(const json::Object& o, const std::string& key, const std::string& path) const {
    auto it = o.find(ffi::String(key));
    if (it == o.end()) throw fail("missing field " + path);
    return (*it).second;
  }

  const json::Value& typed(const json::Value& v, const std::string& kind, const std::string& path) const {
    std::string got = kind_of(v);
    if (got != kind) {
      std::string article = std::string("aeiou").find(kind[0]) != std::string::npos ? "an " : "a ";
      throw fail(path + " must be " + article + kind + ", got " + got);
    }
    return v;
  }

  json::Value field(const json::Object& o, const std::string& key, const std::string& kind,
                    const std::string& path = "") const {
    std::string p = path.empty() ? key : path;
    return typed(need(o, key, p), kind, p);
  }

  std::string str(const json::Object& o, const std::string& key, const std::string& path = "") const {
    return std::string(field(o, key, "string", path).cast<ffi::String>());
  }

  json::Object object(const json::Object& o, const std::string& key, const std::string& path = "") const {
    return field(o, key, "object", path).cast<json::Object>();
  }

  int64_t positive(const json::Object& o, const std::string& key, const std::string& path = "") const {
    std::string p = path.empty() ? key : path;
    int64_t v = field(o, key, "integer", p).cast<int64_t>();
    if (v <= 0) throw fail(p + " must be positive, got " + std::to_string(v));
    return v;
  }

  std::vector<int64_t> ints(const json::Value& v, const std::string& path, bool non_negative = false) const {
    std::vector<int64_t> out;
    json::Array a = typed(v, "array", path).cast<json::Array>();
    for (size_t i = 0; i < a.size(); ++i) {
      std::string at = path + "[" + std::to_string(i) + "]";
      int64_t x = typed(a[i], "integer", at).cast<int64_t>();
      if (non_negative && x < 0) throw fail(at + " must be at least 0, got " + std::to_string(x));
      out.push_back(x);
    }
    return out;
  }
};

// A float as messages show it: short where that is exact (1e-05), else every digit (manifest.py `_number`).
std::string number(double x) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%g", x);
  if (std::strtod(buf, nullptr) != x) std::snprintf(buf, sizeof buf, "%.17g", x);
  return buf;
}

// Activation names that compute the same function (config.ACTIVATIONS; manifest.py `_SAME_ACTIVATION`).
std::string same_activation(const std::string& name) {
  static const std::map<std::string, std::string> same = {
      {"gelu_pytorch_tanh", "gelu_tanh"}, {"gelu_new", "gelu_tanh"}, {"gelu_fast", "gelu_tanh"}, {"gelu", "gelu_erf"}};
  auto it = same.find(name);
  return it == same.end() ? name : it->second;
}

// The model config fields that shape what a library computes, with what an absent or null one means
// (manifest.py `_IDENTITY` and `identity`); the sizes among them were checked positive before.
std::vector<IdentityField> read_identity(const json::Object& cfg, const Reader& r) {
  enum Kind { kSize, kBool, kString, kFloat };
  struct Field {
    const char* key;
    Kind kind;
    const char* fallback;
  };
  static const Field fields[] = {
      {"n_layer", kSize, ""},          {"n_embd", kSize, ""},
      {"n_head", kSize, ""},           {"n_inner", kSize, ""},
      {"multi_query", kBool, "true"},  {"activation_function", kString, "gelu_pytorch_tanh"},
      {"layer_norm_epsilon", kFloat, ""}, {"scale_attn_weights", kBool, "true"},
      {"vocab_size", kSize, ""},       {"n_positions", kSize, ""},
      {"tie_word_embeddings", kBool, "true"}};
  std::vector<IdentityField> out;
  for (const Field& f : fields) {
    std::string path = std::string("model_config.") + f.key;
    std::optional<json::Value> v = json::find(cfg, f.key);
    IdentityField id{f.key, "", ""};
    if (f.kind == kSize) {
      int64_t n = v ? r.positive(cfg, f.key, path) : 4 * json::find(cfg, "n_embd")->cast<int64_t>();  // n_inner
      id.shown = id.compared = std::to_string(n);
    } else if (f.kind == kBool) {
      id.shown = id.compared = !v ? f.fallback : r.typed(*v, "boolean", path).cast<bool>() ? "true" : "false";
    } else if (f.kind == kString) {
      id.shown = !v ? f.fallback : std::string(r.typed(*v, "string", path).cast<ffi::String>());
      id.compared = same_activation(id.shown);
    } else {
      double x = 1e-5;
      if (v) {
        std::string kind = kind_of(*v);
        if (kind != "number" && kind != "integer") throw r.fail(path + " must be a number, got " + kind);
        x = json::as_number(*v, path);
      }
      // compared as float32, the kernels' type: a GGUF stores epsilon as float32
      id.shown = number(x);
      id.compared = number(static_cast<double>(std::isfinite(x) && std::fabs(x) > 3.4028234663852886e38
                                                   ? std::copysign(INFINITY, x)
                                                   : static_cast<float>(x)));
    }
    out.push_back(std::move(id));
  }
  return out;
}

std::vector<int32_t> narrow(const std::vector<int64_t>& ids) { return {ids.begin(), ids.end()}; }

std::string supported() {
  if (kMinSchemaVersion == kSchemaVersion) return "schema version " + std::to_string(kSchemaVersion);
  return "schema versions " + std::to_string(kMinSchemaVersion) + " to " + std::to_string(kSchemaVersion);
}

// The parser's errors ("WHERE: not valid JSON (Expecting value: line 1 column 2 (char 1))") are worded as
// Python's json module words them.
json::Object as_manifest(const json::Value& v, const Reader& r) {
  return r.typed(v, "object", "the manifest").cast<json::Object>();
}

// The header both manifests share, schema version first (manifest.py `_common`).
void read_common(const json::Object& m, const Reader& r, const std::string& redo, Header* h) {
  std::string made_by = "an unknown gptbc";
  if (auto v = m.find(ffi::String("gptbc_version")); v != m.end())
    if (auto s = (*v).second.as<ffi::String>()) made_by = "gptbc " + std::string(*s);
  if (!Reader::has(m, "schema_version")) {
    throw r.fail("written by " + made_by + " without a schema_version (before schema version " +
                 std::to_string(kMinSchemaVersion) + "); this gptbc reads " + supported() + " (" + redo +
                 " with this gptbc)");
  }
  h->schema_version = r.field(m, "schema_version", "integer").cast<int64_t>();
  if (h->schema_version < kMinSchemaVersion || h->schema_version > kSchemaVersion) {
    std::string hint = h->schema_version > kSchemaVersion ? "upgrade gptbc, or " + redo + " with this one"
                                                          : redo + " with this gptbc";
    throw r.fail("written by " + made_by + " with schema_version " + std::to_string(h->schema_version) +
                 "; this gptbc reads " + supported() + " (" + hint + ")");
  }
  h->gptbc_version = r.str(m, "gptbc_version");
  h->page_size = r.positive(m, "page_size");
  h->alignment = r.positive(m, "alignment");
  if (h->alignment & (h->alignment - 1))
    throw r.fail("alignment must be a power of two, got " + std::to_string(h->alignment));
  json::Object cfg = r.object(m, "model_config");
  for (const char* key : {"n_embd", "n_head", "n_layer", "n_positions", "vocab_size"}) {
    int64_t v = r.positive(cfg, key, std::string("model_config.") + key);
    if (std::string(key) == "n_embd") h->n_embd = v;
    if (std::string(key) == "vocab_size") h->vocab_size = v;
  }
  h->identity = read_identity(cfg, r);
  if (Reader::has(m, "tensor_parallel")) h->tensor_parallel = r.positive(m, "tensor_parallel");
  if (auto eos = json::find(cfg, "eos_token_id")) {  // HF's spellings: absent, null, an id or a list of ids
    std::string kind = kind_of(*eos);
    if (kind == "integer") {
      h->config_eos_ids = {static_cast<int32_t>(eos->cast<int64_t>())};
    } else if (kind == "array") {
      h->config_eos_ids = narrow(r.ints(*eos, "model_config.eos_token_id"));
    } else {
      throw r.fail("model_config.eos_token_id must be an integer or an array, got " + kind);
    }
  }
  json::Object q = r.object(m, "quantization");
  std::string name = r.str(q, "name", "quantization.name");
  std::string kind = r.str(q, "kind", "quantization.kind");
  bool quantized_head = true;
  if (Reader::has(q, "quantize_lm_head"))
    quantized_head = r.field(q, "quantize_lm_head", "boolean", "quantization.quantize_lm_head").cast<bool>();
  h->quantization = quantized_head || kind == "none" ? name : name + " (lm_head unquantized)";
  h->bits = "None";
  if (auto bits = json::find(q, "bits"))
    h->bits = std::to_string(r.typed(*bits, "integer", "quantization.bits").cast<int64_t>());
  if (Reader::has(q, "widths")) {
    for (const auto& [module, bits] : r.object(q, "widths", "quantization.widths")) {
      std::string m(module.cast<ffi::String>());
      h->widths[m] = r.typed(bits, "integer", "quantization.widths." + m).cast<int64_t>();
    }
  }
}

std::string json_dumps(const std::string& s);

void read_params(const json::Object& m, const Reader& r, bool with_file, Header* h) {
  std::set<std::string> seen;
  json::Array params = r.field(m, "params", "array").cast<json::Array>();
  for (size_t i = 0; i < params.size(); ++i) {
    std::string at = "params[" + std::to_string(i) + "]";
    json::Object p = r.typed(params[i], "object", at).cast<json::Object>();
    Param param;
    param.name = r.str(p, "name", at + ".name");
    param.shape = r.ints(r.need(p, "shape", at + ".shape"), at + ".shape", true);
    param.dtype = r.str(p, "dtype", at + ".dtype");
    if (Reader::has(p, "repack")) param.repack = r.str(p, "repack", at + ".repack");
    if (with_file) {
      param.file = r.str(p, "file", at + ".file");
      const std::string& f = param.file;
      if (f.empty() || f.find('/') != std::string::npos || f.find('\\') != std::string::npos || f == "." || f == "..")
        throw r.fail(at + ".file must name a file in the directory, got " + json_dumps(f));
    }
    if (!seen.insert(param.name).second) throw r.fail(at + ": tensor " + param.name + " is listed twice");
    h->params.push_back(std::move(param));
  }
}

bool is_file(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

// ---- values quoted in messages, as Python's repr() and files.py `clip` write them ----

constexpr size_t kValueLimit = 60;  // files.py VALUE_LIMIT, in characters (code points)

// The next code point of UTF-8 `s` at `*i` (advanced past it); a stray byte reads as itself (the weights file
// was checked to be UTF-8, so only a parser's odd output could hold one).
char32_t next_code_point(const std::string& s, size_t* i) {
  unsigned char c = s[(*i)++];
  int extra = c >= 0xF0 ? 3 : c >= 0xE0 ? 2 : c >= 0xC0 ? 1 : 0;
  char32_t cp = extra == 3 ? c & 0x07 : extra == 2 ? c & 0x0F : extra == 1 ? c & 0x1F : c;
  for (int k = 0; k < extra && *i < s.size() && (static_cast<unsigned char>(s[*i]) & 0xC0) == 0x80; ++k)
    cp = (cp << 6) | (static_cast<unsigned char>(s[(*i)++]) & 0x3F);
  return cp;
}

bool printable(char32_t cp) {
  auto end = std::end(kUnprintableRanges);
  auto it = std::upper_bound(std::begin(kUnprintableRanges), end, cp,
                             [](char32_t c, const CodeRange& r) { return c < r.lo; });
  return it == std::begin(kUnprintableRanges) || cp > (it - 1)->hi;
}

std::string hex_escape(const char* prefix, char32_t cp, int digits) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%s%0*x", prefix, digits, static_cast<unsigned>(cp));
  return buf;
}

// Python's repr() of a str: single quotes unless it holds ' and no ", unprintable code points escaped.
std::string py_repr(const std::string& s) {
  char quote = s.find('\'') != std::string::npos && s.find('"') == std::string::npos ? '"' : '\'';
  std::string out(1, quote);
  for (size_t i = 0; i < s.size();) {
    size_t start = i;
    char32_t cp = next_code_point(s, &i);
    if (cp == static_cast<char32_t>(quote) || cp == '\\') out += {'\\', static_cast<char>(cp)};
    else if (cp == '\t') out += "\\t";
    else if (cp == '\n') out += "\\n";
    else if (cp == '\r') out += "\\r";
    else if (cp < 0x20 || cp == 0x7F) out += hex_escape("\\x", cp, 2);
    else if (cp < 0x7F || printable(cp)) out += s.substr(start, i - start);
    else if (cp <= 0xFF) out += hex_escape("\\x", cp, 2);
    else if (cp <= 0xFFFF) out += hex_escape("\\u", cp, 4);
    else out += hex_escape("\\U", cp, 8);
  }
  return out + quote;
}

// files.py `clip` of a repr: at most kValueLimit characters, the cut marked with "...".
std::string clip(const std::string& text) {
  size_t chars = 0, i = 0, cut = 0;
  while (i < text.size()) {
    next_code_point(text, &i);
    if (++chars == kValueLimit - 3) cut = i;
  }
  return chars <= kValueLimit ? text : text.substr(0, cut) + "...";
}

// Python's json.dumps() of a str (ensure_ascii): what the "must name a file" message quotes.
std::string json_dumps(const std::string& s) {
  std::string out = "\"";
  for (size_t i = 0; i < s.size();) {
    char32_t cp = next_code_point(s, &i);
    switch (cp) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (cp >= 0x20 && cp < 0x7F) {
          out += static_cast<char>(cp);
        } else if (cp > 0xFFFF) {  // a surrogate pair, as Python writes one
          out += hex_escape("\\u", 0xD800 + ((cp - 0x10000) >> 10), 4);
          out += hex_escape("\\u", 0xDC00 + ((cp - 0x10000) & 0x3FF), 4);
        } else {
          out += hex_escape("\\u", cp, 4);
        }
    }
  }
  return out + "\"";
}

// Python's str.isspace(), which str.split() splits at.
bool is_space(char32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

// files.py `one_line`: whitespace runs made one space, ends stripped, at most `limit` characters (the cut
// marked with "..."). The Python reader's `reading` block passes every weights-manifest error through it.
std::string one_line(const std::string& text, size_t limit) {
  std::string out;
  size_t chars = 0, cut = 0;
  bool space = false;
  for (size_t i = 0; i < text.size();) {
    size_t start = i;
    char32_t cp = next_code_point(text, &i);
    if (is_space(cp)) {
      space = !out.empty();
      continue;
    }
    if (space) {
      out += ' ';
      if (++chars == limit - 3) cut = out.size();
      space = false;
    }
    out += text.substr(start, i - start);
    if (++chars == limit - 3) cut = out.size();
  }
  return chars <= limit ? out : out.substr(0, cut) + "...";
}

// ---- paths, as Python's pathlib sees them ----

// posixpath.realpath(path, strict=False) of Python 3.11 (Path.resolve): symbolic links followed as far as
// they lead, a missing part kept as written; nullopt for a link loop (Path.resolve raises for one).
std::optional<std::string> resolve(const std::string& path) {
  std::string rest = path;
  if (rest.empty() || rest[0] != '/') {
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) return std::nullopt;
    rest = std::string(cwd) + "/" + rest;
  }
  std::string done = "/";
  std::map<std::string, std::optional<std::string>> seen;  // link → where it led; nullopt while being followed
  // Each pending piece: the rest of a path, relative to `done`; a link pushes its target in front of it.
  std::vector<std::pair<std::string, std::string>> stack;  // (rest, the link whose target this is, or "")
  stack.push_back({rest, ""});
  int hops = 0;
  while (!stack.empty()) {
    auto& [todo, link] = stack.back();
    if (todo.empty()) {
      if (!link.empty()) seen[link] = done;
      stack.pop_back();
      continue;
    }
    if (todo[0] == '/') {
      done = "/";
      todo.erase(0, todo.find_first_not_of('/'));  // all of it when it is only slashes
      continue;
    }
    size_t slash = todo.find('/');
    std::string name = todo.substr(0, slash);
    todo = slash == std::string::npos ? "" : todo.substr(slash + 1);
    if (name.empty() || name == ".") continue;
    if (name == "..") {
      if (done != "/") done.erase(std::max<size_t>(done.rfind('/'), 1));
      continue;
    }
    std::string next = done == "/" ? "/" + name : done + "/" + name;
    struct stat st {};
    if (lstat(next.c_str(), &st) != 0 || !S_ISLNK(st.st_mode)) {
      done = next;
      continue;
    }
    if (auto it = seen.find(next); it != seen.end()) {
      if (!it->second) return std::nullopt;  // a loop
      done = *it->second;
      continue;
    }
    if (++hops > 4096) return std::nullopt;
    char target[PATH_MAX];
    ssize_t n = readlink(next.c_str(), target, sizeof target);
    if (n < 0) return std::nullopt;
    seen[next] = std::nullopt;
    stack.push_back({std::string(target, n), next});
  }
  // Path.resolve(): a path that stat() finds looping is an error even where realpath() went on
  struct stat st {};
  if (stat(done.c_str(), &st) != 0 && errno == ELOOP) return std::nullopt;
  return done;
}

// pathlib's parts of a path ("a//./b/" → a, b); the root "/" is a part of its own.
std::vector<std::string> parts_of(const std::string& path) {
  std::vector<std::string> parts;
  if (!path.empty() && path[0] == '/') parts.push_back("/");
  size_t i = 0;
  while (i <= path.size()) {
    size_t slash = std::min(path.find('/', i), path.size());
    std::string part = path.substr(i, slash - i);
    if (!part.empty() && part != ".") parts.push_back(part);
    i = slash + 1;
  }
  return parts;
}

std::string joined(const std::vector<std::string>& parts, size_t count) {
  if (count == 0) return ".";
  std::string out;
  for (size_t i = 0; i < count; ++i) out += (i == 0 || out == "/" ? "" : "/") + parts[i];
  return out;
}

bool is_dir(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// files.py `link_root`: where the links of `directory`'s files may lead: the directory, or for a snapshot in
// the Hugging Face cache (models--owner--name/snapshots/REV/) the repository's cache folder.
std::string link_root(const std::string& directory) {
  std::vector<std::string> parts = parts_of(directory);
  size_t n = parts.size();
  if (n >= 2 && parts[n - 2] == "snapshots" && is_dir(joined(parts, n - 2) + "/blobs")) return joined(parts, n - 2);
  return directory;
}

// pathlib's is_relative_to on resolved paths.
bool inside(const std::string& path, const std::string& root) {
  if (root == "/") return true;
  return path == root || (path.size() > root.size() && path.compare(0, root.size(), root) == 0 &&
                          path[root.size()] == '/');
}

// files.py `contained`, for a name read_params let through (a plain name, no '/' nor '\\'): refused where
// it holds a NUL or its links lead out of the directory (or loop).
void check_contained(const std::string& directory, const std::string& name, const Reader& r,
                     const std::string& entry) {
  std::string quoted = clip(py_repr(name));
  if (name.find('\0') != std::string::npos)
    throw r.fail(entry + " names " + quoted + ", outside its directory " + directory);
  std::optional<std::string> target = resolve(directory + "/" + name);
  std::optional<std::string> root = resolve(link_root(directory));
  if (!target || !root || !inside(*target, *root))
    throw r.fail(entry + " names " + quoted + ", which leads outside its directory " + directory);
}

// The dtypes a converted tensor can have, and the largest tensor a manifest may list (manifest.py DTYPES,
// MAX_TENSOR_ELEMENTS).
const char* const kDtypes[] = {"float64", "float32", "float16", "bfloat16", "int64", "int32",
                               "int16",   "int8",    "uint8",   "uint32",   "bool"};
constexpr int64_t kMaxTensorElements = int64_t{1} << 40;

// manifest.py `_param_files`, after every param passed read_params: each file inside the directory, links
// resolved; each dtype one a tensor can have; each shape at most 2^40 elements (multiplied without overflow:
// the dims are at most 2^63 - 1 each).
void check_param_files(const Weights& w, const Reader& r) {
  for (size_t i = 0; i < w.params.size(); ++i) {
    const Param& p = w.params[i];
    std::string at = "params[" + std::to_string(i) + "]";
    check_contained(w.directory, p.file, r, at + ".file");
    if (std::find(std::begin(kDtypes), std::end(kDtypes), p.dtype) == std::end(kDtypes)) {
      std::string list;
      for (const char* d : kDtypes) list += (list.empty() ? "" : ", ") + std::string(d);
      throw r.fail(at + ".dtype " + clip(py_repr(p.dtype)) + " is not a tensor dtype (" + list + ")");
    }
    int64_t count = 1;
    for (int64_t n : p.shape) {
      if (__builtin_mul_overflow(count, n, &count) || count > kMaxTensorElements)
        throw r.fail(at + ".shape " + clip(shape_str(p.shape)) + " has more than 2^40 elements");
    }
  }
}

// Python's strict UTF-8 decoding (read_text): no overlong forms, surrogates or code points past U+10FFFF.
bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    unsigned char c = s[i];
    int extra = c < 0x80 ? 0 : (c & 0xE0) == 0xC0 ? 1 : (c & 0xF0) == 0xE0 ? 2 : (c & 0xF8) == 0xF0 ? 3 : -1;
    if (extra < 0 || i + extra >= s.size()) return false;
    char32_t cp = extra == 0 ? c : extra == 1 ? c & 0x1F : extra == 2 ? c & 0x0F : c & 0x07;
    for (int k = 1; k <= extra; ++k) {
      unsigned char d = s[i + k];
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    static const char32_t least[] = {0, 0x80, 0x800, 0x10000};
    if (cp < least[extra] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += extra + 1;
  }
  return true;
}

}  // namespace

Weights read_weights(const std::string& directory) {
  Weights w;
  w.directory = directory;
  while (w.directory.size() > 1 && w.directory.back() == '/') w.directory.pop_back();  // as Python's Path
  w.path = w.directory + "/" + kWeightsFile;
  if (!is_file(w.path))
    throw Error(directory + ": no " + kWeightsFile + " (convert weights with `gptbc convert-weight`)");
  Reader r{w.path};
  std::string text = json::read_file(w.path);
  if (!valid_utf8(text)) throw Error(w.path + ": not valid UTF-8");
  try {  // as manifest.py's `reading` block: every line made one line, cut to twice MESSAGE_LIMIT
    json::Object m = as_manifest(json::parse(text, w.path), r);
    read_common(m, r, "convert the weights again", &w);
    w.model_name = r.str(m, "model_name");
    w.eos_ids = narrow(r.ints(r.need(m, "eos_token_id", "eos_token_id"), "eos_token_id"));
    read_params(m, r, true, &w);
    check_param_files(w, r);
  } catch (const Error& e) {
    throw Error(one_line(e.what(), 600));
  }
  return w;
}

Library parse_library(const std::string& text, const std::string& lib) {
  Library l;
  l.lib = lib;
  Reader r{"--lib " + lib + " metadata"};
  json::Object m = as_manifest(json::parse(text, r.where), r);
  read_common(m, r, "compile the library again", &l);
  l.target = r.str(m, "target");
  l.device = r.str(m, "device");
  l.context_window_size = r.positive(m, "context_window_size");
  l.prefill_chunk_size = r.positive(m, "prefill_chunk_size");
  l.max_batch_size = r.positive(m, "max_batch_size");
  l.batch_invariant = m.find(ffi::String("attention_grain")) != m.end();
  read_params(m, r, false, &l);
  return l;
}

void check_compatible(const Library& lib, const Weights& weights) {
  if (lib.tensor_parallel != weights.tensor_parallel) {
    throw Error("--lib " + lib.lib + " was compiled with --tensor-parallel " + std::to_string(lib.tensor_parallel) +
                ", but the weights in " + weights.directory + " were converted with --tensor-parallel " +
                std::to_string(weights.tensor_parallel) + "; compile and convert with the same N");
  }
  const std::pair<const char*, int64_t Header::*> layout[] = {{"a KV-cache page size", &Header::page_size},
                                                              {"a tensor alignment", &Header::alignment}};
  for (const auto& [what, member] : layout) {
    if (lib.*member != weights.*member) {
      throw Error("--lib " + lib.lib + " was built with " + what + " of " + std::to_string(lib.*member) + " (gptbc " +
                  lib.gptbc_version + "), but " + weights.path + " says " + std::to_string(weights.*member) +
                  " (gptbc " + weights.gptbc_version + "); compile and convert with the same gptbc");
    }
  }
  auto wid = weights.identity.begin();
  for (const IdentityField& l : lib.identity) {
    const IdentityField& w = *wid++;
    if (l.compared != w.compared) {
      throw Error("--lib " + lib.lib + " was compiled for " + l.key + " " + l.shown + ", but the weights in " +
                  weights.directory + " have " + w.key + " " + w.shown +
                  "; a library runs only the model it was compiled for (compile one for these weights)");
    }
  }
  if (lib.quantization != weights.quantization) {
    throw Error("--lib " + lib.lib + " was compiled for quantization " + lib.quantization + ", but the weights in " +
                weights.directory + " are " + weights.quantization +
                "; compile and convert with the same --quantization (and --no-quantize-lm-head) settings");
  }
  std::set<std::string> modules;
  for (const Header* h : {static_cast<const Header*>(&lib), static_cast<const Header*>(&weights)})
    for (const auto& [module, bits] : h->widths) modules.insert(module);
  for (const std::string& module : modules) {  // a per-tensor scheme: each module in its own width (sorted, as Python)
    auto width = [&](const Header& h) {
      auto it = h.widths.find(module);
      return it == h.widths.end() ? h.bits : std::to_string(it->second);
    };
    if (width(lib) != width(weights)) {
      throw Error("--lib " + lib.lib + " was compiled for " + module + " at " + width(lib) +
                  " bits, but the weights in " + weights.directory + " have it at " + width(weights) +
                  " bits; compile the library from the converted directory (gptbc compile --model " +
                  weights.directory + ")");
    }
  }
  std::map<std::string, const Param*> have;
  for (const Param& p : weights.params) have[p.name] = &p;
  for (const Param& p : lib.params) {
    auto it = have.find(p.name);
    if (it == have.end()) {
      throw Error(weights.path + ": no tensor " + p.name + ", which --lib " + lib.lib +
                  " needs (were they built from different configs?)");
    }
    const Param& w = *it->second;
    if (w.shape != p.shape || w.dtype != p.dtype) {
      throw Error(weights.directory + ": tensor " + p.name + " is " + w.dtype + shape_str(w.shape) + ", --lib " +
                  lib.lib + " expects " + p.dtype + shape_str(p.shape) + " (were they built from different configs?)");
    }
  }
  std::set<std::string> takes;
  for (const Param& p : lib.params) takes.insert(p.name);
  for (const Param& p : weights.params) {  // the converter writes exactly the library's list: an extra is another model's
    if (!takes.count(p.name)) {
      throw Error(weights.path + ": tensor " + p.name + " is not one --lib " + lib.lib +
                  " takes (were they built from different configs?)");
    }
  }
}

}  // namespace gptbc::manifest
