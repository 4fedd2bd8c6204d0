// Stand-in for TVM's tvm/support/io.h, which the apache-tvm 0.27.0.post1 wheel does not ship although its
// tvm/runtime/tensor.h (included by the disco headers the CCL needs) includes it. Only declarations:
// tensor.h's (de)serialization helpers name support::Stream in inline functions the CCL never calls, so
// nothing here is ever defined, emitted or linked. Used by native/ccl only (CMakeLists.txt).
#pragma once

#include <tvm/ffi/endian.h>

#include <cstddef>

namespace tvm {
namespace support {

class Stream {
 public:
  virtual ~Stream() = default;
  virtual size_t Read(void* ptr, size_t size) = 0;
  virtual size_t Write(const void* ptr, size_t size) = 0;
  template <typename T>
  bool Read(T* out);
  template <typename T>
  void Write(const T& value);
  template <typename T>
  bool ReadArray(T* data, size_t n);
  template <typename T>
  void WriteArray(const T* data, size_t n);
};

}  // namespace support
}  // namespace tvm
