#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <limits>

#include "error.h"
#include "json.h"

namespace gptbc {

namespace {

constexpr uint64_t kMaxHeader = 100ull * 1024 * 1024;  // as the Python reader (artifact/safetensors_io.py)

struct DtypeInfo {
  const char* safetensors;
  const char* tvm;
  int bytes;
};

constexpr DtypeInfo kDtypes[] = {
    {"F64", "float64", 8}, {"F32", "float32", 4}, {"F16", "float16", 2}, {"BF16", "bfloat16", 2},
    {"I64", "int64", 8},   {"I32", "int32", 4},   {"I16", "int16", 2},   {"I8", "int8", 1},
    {"U8", "uint8", 1},    {"U32", "uint32", 4},  {"BOOL", "bool", 1},
};

const DtypeInfo* dtype_of(const std::string& safetensors_name) {
  for (const auto& d : kDtypes)
    if (safetensors_name == d.safetensors) return &d;
  return nullptr;
}

// a * b, or false on uint64 overflow (a hostile header can claim any shape).
bool mul(uint64_t a, uint64_t b, uint64_t* out) {
  if (a != 0 && b > std::numeric_limits<uint64_t>::max() / a) return false;
  *out = a * b;
  return true;
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(path + ": cannot open (" + std::strerror(errno) + ")");
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    throw Error(path + ": not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    map_ = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map_ == MAP_FAILED) {
      map_ = nullptr;
      int err = errno;
      close(fd);
      throw Error(path + ": cannot map (" + std::strerror(err) + ")");
    }
  }
  close(fd);  // the mapping keeps the file
  try {
    const auto* bytes = static_cast<const uint8_t*>(map_);
    if (size_ < 8) throw Error(path + ": corrupt safetensors file (shorter than its 8-byte header length)");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
    if (n > kMaxHeader || 8 + n > size_) {
      throw Error(path + ": corrupt safetensors header (claims " + std::to_string(n) + " bytes, file has " +
                  std::to_string(size_) + ")");
    }
    std::string text(reinterpret_cast<const char*>(bytes + 8), n);
    json::Value header;
    try {
      header = json::parse(text, path);
    } catch (const Error&) {
      throw Error(path + ": corrupt safetensors header (not valid JSON)");
    }
    auto obj = header.as<json::Object>();
    if (!obj) throw Error(path + ": corrupt safetensors header (not a JSON object)");
    const uint64_t base = 8 + n;
    for (const auto& kv : *obj) {
      auto key = kv.first.as<tvm::ffi::String>();
      std::string name = key ? std::string(*key) : "?";
      if (name == "__metadata__") continue;
      std::string bad = path + ": tensor '" + name + "' has a bad header entry";
      auto info = kv.second.as<json::Object>();
      if (!info) throw Error(bad);
      TensorEntry e;
      uint64_t start = 0, end = 0, count = 1;
      {
        const DtypeInfo* d = dtype_of(json::as_string(json::need(*info, "dtype", bad), bad));
        if (!d) throw Error(bad + " (unknown dtype)");
        e.dtype = d->tvm;
        for (const auto& dim : json::as_array(json::need(*info, "shape", bad), bad)) {
          int64_t v = json::as_int(dim, bad);
          if (v < 0 || !mul(count, static_cast<uint64_t>(v), &count)) throw Error(bad + " (bad shape)");
          e.shape.push_back(v);
        }
        auto offsets = json::as_array(json::need(*info, "data_offsets", bad), bad);
        if (offsets.size() != 2) throw Error(bad + " (data_offsets needs 2 numbers)");
        int64_t s = json::as_int(offsets[0], bad), t = json::as_int(offsets[1], bad);
        if (s < 0 || t < s) throw Error(bad + " (data_offsets out of order)");
        start = static_cast<uint64_t>(s);
        end = static_cast<uint64_t>(t);
        if (!mul(count, static_cast<uint64_t>(d->bytes), &e.nbytes)) throw Error(bad + " (bad shape)");
      }
      if (end - start != e.nbytes || end > size_ - base) {
        throw Error(path + ": tensor '" + name + "' data offsets do not match its shape/dtype or the file size");
      }
      e.data = static_cast<const uint8_t*>(map_) + base + start;
      entries_.emplace(name, std::move(e));
    }
  } catch (...) {
    if (map_) munmap(map_, size_);
    throw;
  }
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept
    : path_(std::move(other.path_)), map_(other.map_), size_(other.size_), entries_(std::move(other.entries_)) {
  other.map_ = nullptr;
  other.size_ = 0;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) munmap(map_, size_);
}

const TensorEntry* SafetensorsFile::find(const std::string& name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second;
}

void SafetensorsFile::release(const TensorEntry& e) const {
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  uintptr_t begin = reinterpret_cast<uintptr_t>(e.data) / page * page;
  uintptr_t end = reinterpret_cast<uintptr_t>(e.data) + e.nbytes;
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

}  // namespace gptbc
