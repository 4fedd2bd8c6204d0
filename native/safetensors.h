// Memory-mapped safetensors files (the format: 8-byte little-endian header length, JSON header, raw data).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace gptbc {

struct TensorEntry {
  std::string dtype;           // TVM spelling: "float32", "uint32", "int8", ...
  std::vector<int64_t> shape;
  const uint8_t* data;         // inside the mapping
  uint64_t nbytes;
};

// Opening validates the whole header (dtypes, shapes, offsets within the file), so a corrupt file fails
// here with one line naming it, before anything reads tensor data. Movable, not copyable: it owns the map.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(SafetensorsFile&&) = delete;

  const std::string& path() const { return path_; }
  // nullptr when the file has no tensor of that name.
  const TensorEntry* find(const std::string& name) const;
  // Drop the tensor's pages from resident memory (after copying it out); they are re-read if touched.
  void release(const TensorEntry& e) const;

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  std::map<std::string, TensorEntry> entries_;
};

}  // namespace gptbc
