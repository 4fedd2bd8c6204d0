#include "json.h"

#include <fstream>
#include <sstream>

#include "error.h"

namespace gptbc::json {

namespace ffi = tvm::ffi;

namespace {

// The parser recurses once per nesting level; a corrupt or hostile file of "[[[[..." would overflow the
// stack instead of failing. No file we read nests deeper than a few levels.
constexpr int kMaxDepth = 128;

bool too_deep(const std::string& text) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxDepth) return true;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return false;
}

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

}  // namespace

Value parse(const std::string& text, const std::string& where) {
  if (too_deep(text)) throw Error(where + ": not valid JSON (nested deeper than " + std::to_string(kMaxDepth) + ")");
  ffi::String err;
  Value v = ffi::json::Parse(ffi::String(text), &err);
  if (!err.empty()) throw Error(where + ": not valid JSON (" + first_line(std::string(err)) + ")");
  return v;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": file not found");
  std::stringstream buf;
  buf << f.rdbuf();
  if (f.bad()) throw Error(path + ": cannot read");
  return buf.str();
}

Value parse_file(const std::string& path) { return parse(read_file(path), path); }

bool is_null(const Value& v) { return v.type_index() == ffi::TypeIndex::kTVMFFINone; }

Object as_object(const Value& v, const std::string& where) {
  if (auto o = v.as<Object>()) return *o;
  throw Error(where + ": expected a JSON object");
}

Array as_array(const Value& v, const std::string& where) {
  if (auto a = v.as<Array>()) return *a;
  throw Error(where + ": expected a JSON array");
}

std::string as_string(const Value& v, const std::string& where) {
  if (auto s = v.as<ffi::String>()) return std::string(*s);
  throw Error(where + ": expected a string");
}

int64_t as_int(const Value& v, const std::string& where) {
  if (v.type_index() == ffi::TypeIndex::kTVMFFIInt) return v.cast<int64_t>();
  throw Error(where + ": expected an integer");
}

double as_number(const Value& v, const std::string& where) {
  if (v.type_index() == ffi::TypeIndex::kTVMFFIInt) return static_cast<double>(v.cast<int64_t>());
  if (v.type_index() == ffi::TypeIndex::kTVMFFIFloat) return v.cast<double>();
  throw Error(where + ": expected a number");
}

std::optional<Value> find(const Object& o, const std::string& key) {
  auto it = o.find(ffi::String(key));
  if (it == o.end() || is_null((*it).second)) return std::nullopt;
  return (*it).second;
}

Value need(const Object& o, const std::string& key, const std::string& where) {
  auto it = o.find(ffi::String(key));
  if (it == o.end()) throw Error(where + ": missing field " + key);
  return (*it).second;
}

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char hex[8];
          snprintf(hex, sizeof(hex), "\\u%04x", c);
          out += hex;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

}  // namespace gptbc::json
