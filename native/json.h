// JSON through the parser that ships with the TVM runtime (tvm::ffi::json), plus typed getters whose
// errors name the file and field at fault.
#pragma once

#include <tvm/ffi/extra/json.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace gptbc::json {

using Value = tvm::ffi::Any;
using Object = tvm::ffi::json::Object;
using Array = tvm::ffi::json::Array;

// Parse `text`; `where` (usually a path) starts the error message.
Value parse(const std::string& text, const std::string& where);
// A whole file's bytes: "PATH: file not found" / "PATH: cannot read".
std::string read_file(const std::string& path);
// Read and parse a file: "PATH: file not found" / "PATH: not valid JSON (...)".
Value parse_file(const std::string& path);

Object as_object(const Value& v, const std::string& where);
Array as_array(const Value& v, const std::string& where);
std::string as_string(const Value& v, const std::string& where);
int64_t as_int(const Value& v, const std::string& where);
double as_number(const Value& v, const std::string& where);  // an int or a float
bool is_null(const Value& v);

// The field `key` of `o`, or nullopt when it is absent or null.
std::optional<Value> find(const Object& o, const std::string& key);
// The field `key`, which must be present (errors read "WHERE: missing field KEY").
Value need(const Object& o, const std::string& key, const std::string& where);

// `s` as a JSON string literal (valid UTF-8 passes through; control characters are escaped).
std::string quote(const std::string& s);

}  // namespace gptbc::json
