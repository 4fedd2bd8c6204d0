#include "model.h"

#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>
#include <sys/stat.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>

#include <tvm/runtime/c_backend_api.h>

#include "error.h"
#include "json.h"

namespace gptbc {

namespace ffi = tvm::ffi;

namespace {

constexpr DLDevice kCpu{kDLCPU, 0};

// Tensors we allocate (token ids, copied weights): host memory aligned as the library's manifest says its
// kernels assume (TVM's kAllocAlignment: they may use aligned vector loads).
struct HostAlloc {
  size_t alignment;
  void AllocData(DLTensor* t) {
    size_t n = (ffi::GetDataSize(*t) + alignment - 1) / alignment * alignment;
    t->data = std::aligned_alloc(alignment, n ? n : alignment);
    if (!t->data) throw Error("out of memory allocating a " + std::to_string(n) + "-byte tensor");
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

// A weight used where it lies in a mapped file (the file outlives the tensor: Model owns both).
struct MappedData {
  const void* data;
  void AllocData(DLTensor* t) { t->data = const_cast<void*>(data); }
  void FreeData(DLTensor*) {}
};

// The repacked weights the int8 kernels stream, in one mapping advised for transparent huge pages: a
// decode step reads them all, and on 4 KiB pages that is a TLB miss and a stopped prefetch every 4 KiB of each
// stream (python/gptbc/runtime/hugepages.py; BENCHMARKS.md, "Session 6"). Where the kernel gives no
// huge pages it is ordinary memory.
class HugePageArena {
 public:
  static constexpr size_t kHuge = size_t{2} << 20, kAlign = 4096;
  static size_t rounded(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
  explicit HugePageArena(size_t bytes) : size_(bytes + kHuge) {
    void* p = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw Error("out of memory mapping " + std::to_string(size_) + " bytes for the weights");
    base_ = static_cast<char*>(p);
#ifdef MADV_HUGEPAGE
    advised_ = madvise(base_, size_, MADV_HUGEPAGE) == 0;  // refused where THP is compiled out: ordinary pages
#endif
    next_ = (kHuge - reinterpret_cast<uintptr_t>(base_) % kHuge) % kHuge;
    end_ = next_ + bytes;
  }
  ~HugePageArena() { munmap(base_, size_); }
  bool advised() const { return advised_; }
  HugePageArena(const HugePageArena&) = delete;
  HugePageArena& operator=(const HugePageArena&) = delete;
  void* take(size_t n) {
    if (next_ + n > end_) throw Error("internal: the weights' huge-page arena is full");
    void* p = base_ + next_;
    next_ += rounded(n);
    return p;
  }

 private:
  char* base_ = nullptr;
  size_t size_, next_ = 0, end_ = 0;
  bool advised_ = false;
};

// A tensor in the arena (keeps the arena alive).
struct InArena {
  std::shared_ptr<HugePageArena> arena;
  void AllocData(DLTensor* t) { t->data = arena->take(ffi::GetDataSize(*t)); }
  void FreeData(DLTensor*) {}
};

// Another shape over an existing tensor's data (keeps that tensor alive).
struct ViewOf {
  ffi::Tensor base;
  void AllocData(DLTensor* t) {
    t->data = base.data_ptr();
    t->byte_offset = base.byte_offset();
  }
  void FreeData(DLTensor*) {}
};

bool is_file(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  return out.str() + "]";
}

// eos ids of generation_config.json: an int or a list of ints (absent or null: none).
void add_ids(const std::optional<json::Value>& v, const std::string& where, std::vector<int32_t>* out) {
  if (!v) return;
  if (!v->as<json::Array>()) {
    out->push_back(static_cast<int32_t>(json::as_int(*v, where)));
    return;
  }
  for (const auto& x : json::as_array(*v, where)) out->push_back(static_cast<int32_t>(json::as_int(x, where)));
}

// The CPU architecture this gptbc-run runs on, as messages name it.
#if defined(__x86_64__)
constexpr const char* kThisArch = "x86-64";
#elif defined(__aarch64__)
constexpr const char* kThisArch = "aarch64";
#else
constexpr const char* kThisArch = "this architecture";
#endif

std::string elf_arch(uint16_t machine) {
  switch (machine) {
    case 62: return "x86-64";
    case 183: return "aarch64";
    case 40: return "32-bit arm";
    case 243: return "riscv";
    default: return "ELF machine " + std::to_string(machine);
  }
}

// A library for another CPU: dlopen would only say "wrong ELF class" or "cannot open shared object file".
void check_arch(const std::string& lib) {
  std::ifstream in(lib, std::ios::binary);
  unsigned char h[20] = {};
  if (!in.read(reinterpret_cast<char*>(h), sizeof(h)) || std::memcmp(h, "\x7f" "ELF", 4) != 0 || h[5] != 1)
    return;  // not a little-endian ELF file: the loader's own message says what is wrong
  std::string built = elf_arch(static_cast<uint16_t>(h[18] | (h[19] << 8)));
  if (built != kThisArch) {
    throw Error("--lib " + lib + " was built for " + built + ", this machine is " + kThisArch +
                " (run it on a " + built + " machine, e.g. from `gptbc bundle`, or compile for --target cpu)");
  }
}

// A library cut short is mapped past its end by dlopen, and the first touch of a missing page kills the process
// with SIGBUS, nothing printed: every table and segment its ELF header describes must lie within the file
// (runtime/devices.py `check_library_intact`, with the same message). Left to the loader: what is not
// little-endian ELF.
void check_intact(const std::string& lib) {
  std::ifstream in(lib, std::ios::binary | std::ios::ate);
  const uint64_t size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  unsigned char h[64] = {};
  in.read(reinterpret_cast<char*>(h), sizeof(h));
  const uint64_t got = static_cast<uint64_t>(in.gcount());
  in.clear();
  if (got < 6 || std::memcmp(h, "\x7f" "ELF", 4) != 0 || h[5] != 1 || (h[4] != 1 && h[4] != 2)) return;
  const bool wide = h[4] == 2;
  auto damaged = [&](const std::string& what, uint64_t end) {  // end: wraps only for a hostile header
    return Error("--lib " + lib + ": truncated or damaged (" + what + " ends at byte " + std::to_string(end) +
                 ", past the end of the " + std::to_string(size) + "-byte file); compile it or copy it again");
  };
  auto le = [](const unsigned char* b, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = v << 8 | b[i];
    return v;
  };
  const uint64_t header_end = wide ? 62 : 50;
  if (got < header_end) throw damaged("the ELF header", header_end);
  const unsigned char* e = h + (wide ? 32 : 28);
  const int word = wide ? 8 : 4;
  struct Table {
    const char *what, *item;
    uint64_t offset, entsize, count, least;
    bool program;
  };
  const Table tables[] = {
      {"program header", "segment", le(e, word), le(e + 2 * word + 6, 2), le(e + 2 * word + 8, 2), wide ? 56u : 32u,
       true},
      {"section header", "section", le(e + word, word), le(e + 2 * word + 10, 2), le(e + 2 * word + 12, 2),
       wide ? 64u : 40u, false}};
  for (const Table& t : tables) {
    if (t.count == 0) continue;
    if (t.entsize < t.least) {
      throw Error("--lib " + lib + ": damaged (" + t.what + " entries of " + std::to_string(t.entsize) +
                  " bytes, ELF needs " + std::to_string(t.least) + ")");
    }
    if (t.offset > size || t.entsize * t.count > size - t.offset)
      throw damaged(std::string("the ") + t.what + " table", t.offset + t.entsize * t.count);
    std::vector<unsigned char> table(t.entsize * t.count);
    in.seekg(static_cast<std::streamoff>(t.offset));
    in.read(reinterpret_cast<char*>(table.data()), static_cast<std::streamsize>(table.size()));
    for (uint64_t i = 0; i < t.count; ++i) {
      const unsigned char* x = table.data() + i * t.entsize;
      // program: p_type, p_offset, p_filesz; section: sh_type, sh_offset, sh_size
      uint64_t type = le(x + (t.program ? 0 : 4), 4);
      uint64_t start = t.program ? le(x + (wide ? 8 : 4), word) : le(x + (wide ? 24 : 16), word);
      uint64_t length = t.program ? le(x + (wide ? 32 : 16), word) : le(x + (wide ? 32 : 20), word);
      bool in_file = t.program ? type == 1 : type != 8;  // PT_LOAD is mapped; SHT_NOBITS (.bss) has no bytes
      if (in_file && (start > size || length > size - start))
        throw damaged(std::string(t.item) + " " + std::to_string(i), start + length);
    }
  }
}

ffi::Function global(const char* name) {
  auto f = ffi::Function::GetGlobal(name);
  if (!f) throw Error(std::string("the TVM runtime has no ") + name + " (a TVM without the Relax VM?)");
  return *f;
}

}  // namespace

Model::Model(const std::string& model_dir, const std::string& lib, const std::string& device)
    : model_dir_(model_dir), lib_(lib) {
  manifest::Weights weights = manifest::read_weights(model_dir);
  open_device(device);
  load_library(lib);
  manifest::check_compatible(meta_, weights);
  if (meta_.tensor_parallel > 1) {  // one rank's library: its layers would compute a slice of the model
    throw Error("--lib " + lib + " is one rank of a --tensor-parallel " + std::to_string(meta_.tensor_parallel) +
                " model; gptbc-run runs one device (run it with `gptbc generate --tensor-parallel " +
                std::to_string(meta_.tensor_parallel) + "`)");
  }
  if (dev_.device_type == kDLWebGPU) check_device_limits();
  vocab_size_ = meta_.vocab_size;
  n_embd_ = meta_.n_embd;
  context_window_size_ = meta_.context_window_size;
  prefill_chunk_size_ = meta_.prefill_chunk_size;
  max_batch_size_ = meta_.max_batch_size;
  page_size_ = meta_.page_size;
  alignment_ = static_cast<size_t>(meta_.alignment);

  // The Python engine's eos set: the converted config's ids (else the library's model config's) plus
  // generation_config.json's.
  eos_ids_ = weights.eos_ids.empty() ? meta_.config_eos_ids : weights.eos_ids;
  std::string gen_path = model_dir + "/generation_config.json";
  if (is_file(gen_path)) {
    json::Object gen = json::as_object(json::parse_file(gen_path), gen_path);
    add_ids(json::find(gen, "eos_token_id"), gen_path + ": eos_token_id", &eos_ids_);
  }

  load_params(weights);
}

// An uninitialized tensor on a (GPU) device, through TVM's allocator (the runtime's C++ Tensor header
// needs TVM headers the wheel does not ship).
ffi::Tensor device_tensor(ffi::Shape shape, DLDataType dtype, DLDevice dev) {
  return global("runtime.TVMTensorAllocWithScope")(shape, dtype, dev, ffi::Optional<ffi::String>()).cast<ffi::Tensor>();
}

// "cpu", "vulkan[:N]" or "cuda[:N]".
void Model::open_device(const std::string& device) {
  std::string kind = device.substr(0, device.find(':'));
  std::string index = device.find(':') == std::string::npos ? "" : device.substr(device.find(':') + 1);
  if ((kind != "cpu" && kind != "vulkan" && kind != "cuda") ||
      (!index.empty() && index.find_first_not_of("0123456789") != std::string::npos) || index.size() > 6) {
    throw Error("--device " + device + ": expected cpu, vulkan or cuda, optionally with :INDEX");
  }
  int32_t i = index.empty() ? 0 : static_cast<int32_t>(std::stoll(index));
  if (kind == "vulkan") open_vulkan(device, i);
  if (kind == "cuda") open_cuda(device, i);
}

// Vulkan without a TVM Vulkan runtime means gptbc's WebGPU runtime: load it (it registers the webgpu device
// and WGSL module loader with TVM) before the model library needs it.
void Model::open_vulkan(const std::string& device, int32_t index) {
  std::string path;
  if (const char* env = std::getenv("GPTBC_WEBGPU_LIB")) {
    path = env;
  } else {
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    std::string self = n > 0 ? std::string(exe, n) : "";
    path = self.substr(0, self.rfind('/') + 1) + "libgptbc_webgpu.so";
  }
  if (!is_file(path)) {
    throw Error("--device " + device + ": the Vulkan runtime " + path + " is missing (build it with the project's "
                "CMake after pip install wgpu, or set GPTBC_WEBGPU_LIB to libgptbc_webgpu.so)");
  }
  if (!dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
    throw Error("--device " + device + ": cannot load the Vulkan runtime " + path + ": " + first_line(dlerror()));
  }
  json::Array adapters = json::as_array(
      json::parse(global("gptbc.webgpu.adapters")().cast<ffi::String>(), "webgpu adapters"), "webgpu adapters");
  if (adapters.empty()) {
    throw Error("no Vulkan adapter found: install a Vulkan driver (Debian/Ubuntu: apt-get install "
                "mesa-vulkan-drivers, which includes lavapipe, a CPU Vulkan device; or your GPU vendor's driver)");
  }
  if (index >= static_cast<int64_t>(adapters.size()))
    throw Error("--device " + device + ": no such adapter (" + std::to_string(adapters.size()) + " found)");
  adapter_ = json::as_object(adapters[index], "webgpu adapter");
  dev_ = DLDevice{kDLWebGPU, index};
}

// CUDA is TVM's own device runtime, libtvm_runtime_cuda beside libtvm_runtime (the wheel ships it), loaded
// only when asked for: gptbc-run needs no CUDA toolkit to build, and only the NVIDIA driver (libcuda.so.1)
// to run a CUDA library. The kernels are in the library as nvcc's binaries (SASS, PTX), so nothing is
// compiled when it loads.
void Model::open_cuda(const std::string& device, int32_t index) {
#ifdef GPTBC_CUDA_RUNTIME
  Dl_info where{};
  if (!dladdr(reinterpret_cast<void*>(&TVMBackendAllocWorkspace), &where) || !where.dli_fname)
    throw Error("--device " + device + ": cannot locate libtvm_runtime to find its CUDA runtime beside it");
  std::string dir = where.dli_fname;
  std::string path = dir.substr(0, dir.rfind('/') + 1) + GPTBC_CUDA_RUNTIME;
  if (!dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
    throw Error("--device " + device + ": cannot load TVM's CUDA runtime " + path + ": " + first_line(dlerror()) +
                " (a CUDA device needs the NVIDIA driver, which provides libcuda.so.1)");
  }
  bool exists = global("runtime.GetDeviceAttr")(static_cast<int>(kDLCUDA), index, 0).cast<int64_t>() != 0;
  if (!exists) throw Error("--device " + device + ": no such CUDA device (nvidia-smi lists them)");
  dev_ = DLDevice{kDLCUDA, index};
#else
  (void)index;
  throw Error("--device " + device + ": this gptbc-run was built without CUDA support (CMake found no "
              "libtvm_runtime_cuda beside libtvm_runtime, or -DGPTBC_CUDA=OFF); rebuild it where the TVM wheel has it");
#endif
}

// Before any weight is copied: each tensor fits one storage-buffer binding, and float16 needs shader-f16.
void Model::check_device_limits() {
  std::string name = json::as_string(json::need(adapter_, "name", "adapter"), "adapter");
  int64_t limit = json::as_int(json::need(adapter_, "max_storage_buffer_binding_size", "adapter"), "adapter");
  bool f16 = json::need(adapter_, "shader_f16", "adapter").as<bool>().value_or(false);
  for (const auto& p : meta_.params) {
    DLDataType dt = ffi::StringToDLDataType(p.dtype);
    if (dt.code == kDLFloat && dt.bits == 16 && !f16) {
      throw Error("--lib " + lib_ + " computes in float16, but the Vulkan adapter " + name +
                  " has no shader-f16 support; use a float32 scheme (q0f32, q4f32_1, q8f32_1)");
    }
    int64_t nbytes = (dt.bits * dt.lanes + 7) / 8;
    bool overflow = false;  // the library's shapes equal the weights' (checked), but never multiply unchecked
    for (int64_t d : p.shape) overflow |= __builtin_mul_overflow(nbytes, d, &nbytes);
    if (overflow) nbytes = INT64_MAX;
    if (nbytes > limit) {
      throw Error("tensor " + p.name + " (" + p.dtype + ") is " + std::to_string(nbytes) + " bytes, over the Vulkan adapter " +
                  name + "'s max storage-buffer binding of " + std::to_string(limit) + " bytes");
    }
  }
}

void Model::load_library(const std::string& lib) {
  if (!is_file(lib)) throw Error("--lib " + lib + ": file not found");
  check_arch(lib);
  check_intact(lib);
  // dlopen searches the library path for a name without a slash: give it the real path, as Python does.
  char resolved[PATH_MAX];
  std::string path = realpath(lib.c_str(), resolved) ? resolved : lib;
  auto get = [&](const ffi::Module& mod, const char* name) {
    auto f = mod->GetFunction(name, true);
    if (!f) throw Error("--lib " + lib + ": not a gptbc model library (no " + name + " function)");
    return *f;
  };
  std::string text;
  try {
    library_ = ffi::Module::LoadFromFile(path);
    vm_ = get(*library_, "vm_load_executable")().cast<ffi::Module>();
    // As tvm.relax.VirtualMachine(mod, dev) does: device type, device id, pooled allocator (2); a GPU
    // device is followed by the CPU as host device.
    if (dev_.device_type == kDLCPU) {
      get(*vm_, "vm_initialization")(static_cast<int>(kDLCPU), 0, 2);
    } else {
      get(*vm_, "vm_initialization")(static_cast<int>(dev_.device_type), dev_.device_id, 2, static_cast<int>(kDLCPU), 0, 2);
    }
    text = get(*vm_, "_metadata")().cast<ffi::String>();
  } catch (const ffi::Error& err) {  // dlopen or the VM loader refused the file
    if (err.message().find("load_from_bytes.webgpu") != std::string::npos)
      throw Error("--lib " + lib + " was built for vulkan (WGSL kernels), not for device cpu: run it with --device vulkan");
    if (err.message().find("load_from_bytes.cuda") != std::string::npos)
      throw Error("--lib " + lib + " was built for cuda, not for device " +
                  (dev_.device_type == kDLCPU ? "cpu" : "vulkan") + ": run it with --device cuda");
    throw Error("--lib " + lib + ": not a gptbc model library (" + first_line(err.message()).substr(0, 200) + ")");
  }
  meta_ = manifest::parse_library(text, lib);
  std::string want = dev_.device_type == kDLCPU ? "cpu" : dev_.device_type == kDLCUDA ? "cuda" : "vulkan";
  if (meta_.device != want) {
    throw Error("--lib " + lib + " was built for " + meta_.device + " (--target " + meta_.target +
                "), not for device " + want + "; run it with --device " + meta_.device);
  }
  embed_ = get(*vm_, "embed");
  prefill_ = get(*vm_, "prefill");
  decode_ = get(*vm_, "decode");
  batch_decode_ = get(*vm_, "batch_decode");
  verify_ = vm_.value()->GetFunction("batch_verify", true);
  begin_forward_ = global("vm.builtin.kv_state_begin_forward");
  popn_ = global("vm.builtin.kv_state_popn");
  end_forward_ = global("vm.builtin.kv_state_end_forward");
}

// Weights in the library's load order. On the CPU a weight is used where it lies in the mapped file
// (no copy) when it is aligned as the kernels assume; otherwise it is copied into aligned memory.
void Model::load_params(const manifest::Weights& weights) {
  std::map<std::string, std::string> file_of;  // file names are plain names in the directory (checked)
  for (const auto& p : weights.params) file_of[p.name] = p.file;
  std::map<std::string, size_t> opened;  // file name → index in files_
  files_.reserve(file_of.size());
  size_t repacked_bytes = 0;
  for (const auto& want : meta_.params) {
    if (want.repack.empty()) continue;
    DLDataType dt = ffi::StringToDLDataType(want.dtype);
    size_t n = (dt.bits * dt.lanes + 7) / 8;
    for (int64_t d : want.shape) n *= static_cast<size_t>(d);
    repacked_bytes += HugePageArena::rounded(n);
  }
  auto arena = repacked_bytes ? std::make_shared<HugePageArena>(repacked_bytes) : nullptr;
  for (const auto& want : meta_.params) {
    const std::string& name = want.name;
    std::string fname = file_of.at(name);  // present: check_compatible saw it
    if (!opened.count(fname)) {
      files_.emplace_back(model_dir_ + "/" + fname);
      opened[fname] = files_.size() - 1;
    }
    SafetensorsFile& file = files_[opened[fname]];
    const TensorEntry* e = file.find(name);
    if (!e) throw Error(file.path() + ": tensor " + name + " is missing");
    if (e->shape != want.shape || e->dtype != want.dtype) {
      throw Error(file.path() + ": tensor " + name + " is " + e->dtype + shape_str(e->shape) + ", expected " +
                  want.dtype + shape_str(want.shape));
    }
    DLDataType dt = ffi::StringToDLDataType(want.dtype);
    if (!want.repack.empty()) {  // int8 activations: the library's function makes the tensor its kernels read
      ffi::Tensor src;
      if (reinterpret_cast<uintptr_t>(e->data) % alignment_ == 0) {
        src = ffi::Tensor::FromNDAlloc(MappedData{e->data}, ffi::Shape(want.shape), dt, kCpu);
      } else {
        src = ffi::Tensor::FromNDAlloc(HostAlloc{alignment_}, ffi::Shape(want.shape), dt, kCpu);
        std::memcpy(src.data_ptr(), e->data, e->nbytes);
      }
      auto repack = vm_.value()->GetFunction(want.repack, false);
      if (!repack) throw Error("--lib " + lib_ + ": no function " + want.repack + " (named by its manifest for " + name + ")");
      ffi::Tensor placed = ffi::Tensor::FromNDAlloc(InArena{arena}, ffi::Shape(want.shape), dt, kCpu);
      // its kernel writes straight into the arena (the library names it FUNCTION_kernel); else copy the output
      if (auto kernel = library_.value()->GetFunction(want.repack + "_kernel", true)) {
        (*kernel)(src, placed);
      } else {
        ffi::Tensor out = (*repack)(src).cast<ffi::Tensor>();
        std::memcpy(placed.data_ptr(), out.data_ptr(), e->nbytes);  // repacking keeps the shape and dtype
      }
      params_.push_back(placed);
      if (arena->advised()) huge_page_bytes_ += e->nbytes;
      file.release(*e);  // the repacked copy is what stays
      copied_bytes_ += e->nbytes;
      continue;
    }
    if (dev_.device_type != kDLCPU) {
      ffi::Tensor t = device_tensor(ffi::Shape(want.shape), dt, dev_);
      global("runtime.TVMTensorCopyFromBytes")(t, const_cast<void*>(static_cast<const void*>(e->data)),
                                                static_cast<int64_t>(e->nbytes));
      file.release(*e);
      params_.push_back(t);
      copied_bytes_ += e->nbytes;
      continue;
    }
    if (reinterpret_cast<uintptr_t>(e->data) % alignment_ == 0) {
      params_.push_back(ffi::Tensor::FromNDAlloc(MappedData{e->data}, ffi::Shape(want.shape), dt, kCpu));
      mapped_bytes_ += e->nbytes;
    } else {
      ffi::Tensor t = ffi::Tensor::FromNDAlloc(HostAlloc{alignment_}, ffi::Shape(want.shape), dt, kCpu);
      std::memcpy(t.data_ptr(), e->data, e->nbytes);
      file.release(*e);  // copied: the mapped pages need not stay resident too
      params_.push_back(t);
      copied_bytes_ += e->nbytes;
    }
  }
}

void Model::start(const std::vector<int64_t>& tokens) {
  if (tokens.empty() || static_cast<int64_t>(tokens.size()) > max_batch_size_) {
    throw Error(std::to_string(tokens.size()) + " sequences: the library " + lib_ + " runs 1 to " +
                std::to_string(max_batch_size_) + " together (its max_batch_size)");
  }
  auto create = vm_.value()->GetFunction("create_paged_kv_cache", false);
  if (!create) throw Error("--lib " + lib_ + ": not a gptbc model library (no create_paged_kv_cache function)");
  int64_t total = 0;  // whole pages for each sequence: a page holds one sequence's tokens
  for (int64_t t : tokens) total += (std::max<int64_t>(t, 1) + page_size_ - 1) / page_size_ * page_size_;
  kv_cache_ = (*create)(ffi::Shape({max_batch_size_}), ffi::Shape({total}), ffi::Shape({prefill_chunk_size_}),
                        ffi::Shape({page_size_}), ffi::Shape({0}));
  for (size_t seq = 0; seq < tokens.size(); ++seq)
    global("vm.builtin.kv_state_add_sequence")(kv_cache_, static_cast<int64_t>(seq));
}

std::string Model::device_kind() const {
  return dev_.device_type == kDLCPU ? "cpu" : dev_.device_type == kDLCUDA ? "cuda" : "vulkan";
}

const std::vector<float>& Model::prefill(const std::vector<int32_t>& ids, int64_t seq) {
  for (size_t start = 0; start < ids.size(); start += prefill_chunk_size_) {
    size_t end = std::min(ids.size(), start + static_cast<size_t>(prefill_chunk_size_));
    forward(prefill_, {seq}, {static_cast<int64_t>(end - start)},
            std::vector<int32_t>(ids.begin() + start, ids.begin() + end), false, 1);
  }
  return logits_;
}

const std::vector<float>& Model::decode(int32_t token, int64_t seq) {
  return forward(decode_, {seq}, {1}, {token}, false, 1);
}

const std::vector<float>& Model::decode_batch(const std::vector<int64_t>& seqs, const std::vector<int32_t>& tokens) {
  return forward(batch_decode_, seqs, std::vector<int64_t>(seqs.size(), 1), tokens, true,
                 static_cast<int64_t>(seqs.size()));
}

const std::vector<float>& Model::verify(const std::vector<int32_t>& ids, int64_t seq) {
  if (!verify_) throw Error("--lib " + lib_ + ": no batch_verify function (compiled by an older gptbc: compile it again)");
  const int64_t n = static_cast<int64_t>(ids.size());
  if (n > prefill_chunk_size_) {
    throw Error("verify of " + std::to_string(n) + " tokens is over the library's prefill_chunk_size " +
                std::to_string(prefill_chunk_size_));
  }
  return forward(*verify_, {seq}, {n}, ids, false, n);
}

void Model::pop(int64_t n, int64_t seq) {
  if (n > 0) popn_(kv_cache_, seq, n);
}

// One call of a forward function (they take the same arguments) between the KV cache's begin and end.
const std::vector<float>& Model::forward(const ffi::Function& func, const std::vector<int64_t>& seqs,
                                         const std::vector<int64_t>& rows, const std::vector<int32_t>& ids,
                                         bool batch_rows, int64_t logit_rows) {
  const int64_t n = static_cast<int64_t>(ids.size());
  ffi::Tensor id_tensor = ffi::Tensor::FromNDAlloc(HostAlloc{alignment_}, ffi::Shape({n}), DLDataType{kDLInt, 32, 1}, kCpu);
  std::memcpy(id_tensor.data_ptr(), ids.data(), ids.size() * sizeof(int32_t));
  if (dev_.device_type != kDLCPU) {
    ffi::Tensor on_dev = device_tensor(ffi::Shape({n}), DLDataType{kDLInt, 32, 1}, dev_);
    global("runtime.TVMTensorCopyFromBytes")(on_dev, static_cast<void*>(id_tensor.data_ptr()),
                                              static_cast<int64_t>(ids.size() * sizeof(int32_t)));
    id_tensor = on_dev;
  }
  ffi::Tensor flat = embed_(id_tensor, params_).cast<ffi::Tensor>();  // [n, n_embd]
  ffi::Shape embeds_shape = batch_rows ? ffi::Shape({n, 1, n_embd_}) : ffi::Shape({1, n, n_embd_});
  ffi::Tensor embeds = ffi::Tensor::FromNDAlloc(ViewOf{flat}, embeds_shape, flat.dtype(), flat.device());

  begin_forward_(kv_cache_, ffi::Shape(seqs), ffi::Shape(rows));
  ffi::Array<ffi::Any> out;
  try {
    out = func(embeds, kv_cache_, params_).cast<ffi::Array<ffi::Any>>();
  } catch (...) {
    end_forward_(kv_cache_);
    throw;
  }
  end_forward_(kv_cache_);
  kv_cache_ = out[1];
  // float32: the last position's logits of each sequence, [1, 1, vocab] or [batch, 1, vocab]; every
  // position's for batch_verify, [1, n, vocab]
  ffi::Tensor logits = out[0].cast<ffi::Tensor>();
  const int64_t want = vocab_size_ * logit_rows;
  if (logits.dtype() != DLDataType{kDLFloat, 32, 1} || logits.numel() != want)
    throw Error("--lib " + lib_ + ": logits are not float32[" + std::to_string(logit_rows) + " x " + std::to_string(vocab_size_) + "]");
  if (dev_.device_type != kDLCPU) {
    logits_.resize(want);
    global("runtime.TVMTensorCopyToBytes")(logits, static_cast<void*>(logits_.data()),
                                            static_cast<int64_t>(want * sizeof(float)));
    return logits_;
  }
  const auto* data = reinterpret_cast<const float*>(static_cast<const char*>(logits.data_ptr()) + logits.byte_offset());
  logits_.assign(data, data + want);
  return logits_;
}

}  // namespace gptbc
