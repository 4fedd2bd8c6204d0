// A native WebGPU runtime for TVM on wgpu-native: runs the WGSL kernels of a library built with
// {"kind": "webgpu", "host": <cpu llvm target>} on Vulkan (also Metal, DX12) from C++.
//
// It registers, in TVM's global function table:
//   device_api.webgpu                  the DeviceAPI of device type kDLWebGPU (15)
//   ffi.Module.load_from_bytes.webgpu  the loader of the WGSL device module a library carries
//   gptbc.webgpu.adapters              JSON: the adapters found, in the order device ids count them
//   gptbc.webgpu.device_info           JSON: the adapter behind a device id and the limits requested
//   gptbc.webgpu.stats                 JSON: dispatch / submit / pipeline counters of a device id
//
// The calling convention is that of TVM's WebGPU codegen (src/target/source/codegen_webgpu.cc):
// a kernel's buffer arguments are bindings 0..B-1 of group 0 (read-only storage unless the function
// info's "paramWriteAccess" marks them written), its scalar arguments (i32/u32/f32, in order) followed
// by one u32 "packGridDimX" form a uniform struct at binding B, and the launch arguments follow the
// launch_param_tags. blockIdx.z is reserved: a grid wider than the per-dimension limit is folded into
// z and the kernel recomputes x as blockIdx.z * gridDim.x + blockIdx.x, returning when that exceeds
// packGridDimX.

#include <dlfcn.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>
#include <tvm/runtime/device_api.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "webgpu.h"
#include "wgpu.h"

namespace gptbc {
namespace webgpu {

namespace ffi = tvm::ffi;
using tvm::runtime::DeviceAPI;

// Errors reach Python as RuntimeError with exactly this message (no C++ backtrace: gptbc prints one line).
[[noreturn]] void Fail(const std::string& msg) { throw ffi::Error("RuntimeError", msg, ""); }

std::string ToString(WGPUStringView s) {
  if (s.data == nullptr) return "";
  return s.length == WGPU_STRLEN ? std::string(s.data) : std::string(s.data, s.length);
}

WGPUStringView View(const std::string& s) { return WGPUStringView{s.data(), s.size()}; }

std::string JsonEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out;
}

const char* AdapterTypeName(WGPUAdapterType t) {
  switch (t) {
    case WGPUAdapterType_DiscreteGPU: return "discrete";
    case WGPUAdapterType_IntegratedGPU: return "integrated";
    case WGPUAdapterType_CPU: return "cpu";
    default: return "unknown";
  }
}

const char* BackendName(WGPUBackendType t) {
  switch (t) {
    case WGPUBackendType_Vulkan: return "vulkan";
    case WGPUBackendType_Metal: return "metal";
    case WGPUBackendType_D3D12: return "d3d12";
    case WGPUBackendType_OpenGL: return "opengl";
    default: return "other";
  }
}

int TypeRank(WGPUAdapterType t) {
  switch (t) {
    case WGPUAdapterType_DiscreteGPU: return 0;
    case WGPUAdapterType_IntegratedGPU: return 1;
    case WGPUAdapterType_CPU: return 2;
    default: return 3;
  }
}

struct AdapterEntry {
  WGPUAdapter adapter;
  std::string name, driver;
  WGPUAdapterType type;
  WGPUBackendType backend;
  WGPULimits limits;
  bool f16, subgroups;
};

// One device buffer; a TVM data pointer of a webgpu tensor points at one of these.
struct Buffer {
  WGPUBuffer handle;
  uint64_t size;  // bytes usable by the caller (the WebGPU buffer is rounded up to 4)
  int device_id;  // kernels run on the device their buffers live on
};

constexpr uint32_t kMaxPodBytes = 256;  // one uniform slot: the POD struct of one dispatch

class Context {
 public:
  Context(WGPUInstance instance, const AdapterEntry& entry, int device_id)
      : instance_(instance), entry_(entry), device_id_(device_id) {
    std::vector<WGPUFeatureName> features;
    if (entry.f16) features.push_back(WGPUFeatureName_ShaderF16);
    if (entry.subgroups) features.push_back(WGPUFeatureName_Subgroups);
    // The adapter's own limits, not WebGPU's defaults (128 MiB bindings, 256 MiB buffers, ...).
    limits_ = entry.limits;
    limits_.nextInChain = nullptr;
    WGPUDeviceDescriptor desc = WGPU_DEVICE_DESCRIPTOR_INIT;
    std::string label = "gptbc";
    desc.label = View(label);
    desc.requiredFeatureCount = features.size();
    desc.requiredFeatures = features.data();
    desc.requiredLimits = &limits_;
    desc.uncapturedErrorCallbackInfo.callback = [](WGPUDevice const*, WGPUErrorType type, WGPUStringView msg,
                                                   void* self, void*) {
      auto* ctx = static_cast<Context*>(self);
      if (ctx->error_.empty()) {
        ctx->error_ = std::string(type == WGPUErrorType_OutOfMemory ? "out of memory: " : "") + ToString(msg);
      }
    };
    desc.uncapturedErrorCallbackInfo.userdata1 = this;
    desc.deviceLostCallbackInfo.mode = WGPUCallbackMode_AllowSpontaneous;
    desc.deviceLostCallbackInfo.callback = [](WGPUDevice const*, WGPUDeviceLostReason reason, WGPUStringView msg,
                                              void* self, void*) {
      auto* ctx = static_cast<Context*>(self);
      if (reason != WGPUDeviceLostReason_Destroyed && reason != WGPUDeviceLostReason_CallbackCancelled &&
          ctx->error_.empty()) {
        ctx->error_ = "device lost: " + ToString(msg);
      }
    };
    desc.deviceLostCallbackInfo.userdata1 = this;

    struct Result {
      WGPUDevice device = nullptr;
      std::string message;
      bool done = false;
    } result;
    WGPURequestDeviceCallbackInfo cb = WGPU_REQUEST_DEVICE_CALLBACK_INFO_INIT;
    cb.mode = WGPUCallbackMode_AllowSpontaneous;
    cb.callback = [](WGPURequestDeviceStatus status, WGPUDevice device, WGPUStringView msg, void* r, void*) {
      auto* res = static_cast<Result*>(r);
      if (status == WGPURequestDeviceStatus_Success) res->device = device;
      res->message = ToString(msg);
      res->done = true;
    };
    cb.userdata1 = &result;
    wgpuAdapterRequestDevice(entry.adapter, &desc, cb);
    while (!result.done) wgpuInstanceProcessEvents(instance_);
    if (result.device == nullptr) {
      Fail("webgpu device " + std::to_string(device_id) + " (" + entry.name + "): cannot create a device: " +
           result.message);
    }
    device_ = result.device;
    queue_ = wgpuDeviceGetQueue(device_);
    uniform_align_ = std::max<uint32_t>(limits_.minUniformBufferOffsetAlignment, kMaxPodBytes);
    uniform_slots_ = 4096;
    WGPUBufferDescriptor ud = WGPU_BUFFER_DESCRIPTOR_INIT;
    ud.size = uint64_t(uniform_align_) * uniform_slots_;
    ud.usage = WGPUBufferUsage_Uniform | WGPUBufferUsage_CopyDst;
    uniform_ = wgpuDeviceCreateBuffer(device_, &ud);
    uniform_host_.resize(ud.size);
  }

  ~Context() {
    // Process exit: the driver may already be gone; leave the handles to the OS.
  }

  std::recursive_mutex mu;

  const AdapterEntry& entry() const { return entry_; }
  const WGPULimits& limits() const { return limits_; }
  WGPUDevice device() const { return device_; }

  void CheckError(const char* when) {
    if (!error_.empty()) {
      std::string e = error_;
      error_.clear();
      Fail("webgpu (" + entry_.name + "), " + std::string(when) + ": " + e);
    }
  }

  Buffer* Alloc(size_t nbytes) {
    if (nbytes > limits_.maxBufferSize) {
      Fail("webgpu (" + entry_.name + "): cannot allocate " + std::to_string(nbytes) +
           " bytes: the adapter's max buffer size is " + std::to_string(limits_.maxBufferSize));
    }
    WGPUBufferDescriptor d = WGPU_BUFFER_DESCRIPTOR_INIT;
    d.size = std::max<uint64_t>(4, (nbytes + 3) / 4 * 4);
    d.usage = WGPUBufferUsage_Storage | WGPUBufferUsage_CopySrc | WGPUBufferUsage_CopyDst;
    WGPUBuffer b = wgpuDeviceCreateBuffer(device_, &d);
    CheckError("allocating a buffer");
    if (b == nullptr) Fail("webgpu (" + entry_.name + "): cannot allocate " + std::to_string(nbytes) + " bytes");
    return new Buffer{b, nbytes, device_id_};
  }

  void Free(Buffer* b) {
    if (b == nullptr) return;
    // Recorded but unsubmitted commands may use it: submit them before the handle goes.
    Flush();
    wgpuBufferDestroy(b->handle);
    wgpuBufferRelease(b->handle);
    delete b;
  }

  // ---- command recording ----
  void EnsureEncoder() {
    if (encoder_ == nullptr) {
      WGPUCommandEncoderDescriptor d = WGPU_COMMAND_ENCODER_DESCRIPTOR_INIT;
      encoder_ = wgpuDeviceCreateCommandEncoder(device_, &d);
    }
  }
  void EnsurePass() {
    EnsureEncoder();
    if (pass_ == nullptr) {
      WGPUComputePassDescriptor d = WGPU_COMPUTE_PASS_DESCRIPTOR_INIT;
      pass_ = wgpuCommandEncoderBeginComputePass(encoder_, &d);
    }
  }
  void EndPass() {
    if (pass_ != nullptr) {
      wgpuComputePassEncoderEnd(pass_);
      wgpuComputePassEncoderRelease(pass_);
      pass_ = nullptr;
    }
  }

  // Submit everything recorded so far in one command buffer (after the uniforms it reads).
  void Flush() {
    if (encoder_ == nullptr) return;
    EndPass();
    if (slots_used_ > 0) {
      wgpuQueueWriteBuffer(queue_, uniform_, 0, uniform_host_.data(), size_t(slots_used_) * uniform_align_);
    }
    WGPUCommandBufferDescriptor d = WGPU_COMMAND_BUFFER_DESCRIPTOR_INIT;
    WGPUCommandBuffer cmd = wgpuCommandEncoderFinish(encoder_, &d);
    wgpuCommandEncoderRelease(encoder_);
    encoder_ = nullptr;
    wgpuQueueSubmit(queue_, 1, &cmd);
    wgpuCommandBufferRelease(cmd);
    for (WGPUBuffer b : release_after_submit_) wgpuBufferRelease(b);
    release_after_submit_.clear();
    slots_used_ = 0;
    ++submits_;
    CheckError("submitting kernels");
  }

  void Sync() {
    Flush();
    wgpuDevicePoll(device_, true, nullptr);
    CheckError("waiting for the device");
  }

  void Dispatch(WGPUComputePipeline pipeline, WGPUBindGroupLayout layout, const std::vector<Buffer*>& buffers,
                const uint32_t* pod, size_t pod_words, uint32_t gx, uint32_t gy, uint32_t gz,
                const std::string& name) {
    if (slots_used_ == uniform_slots_) Flush();
    size_t pod_bytes = pod_words * 4;
    uint32_t slot = slots_used_++;
    std::memset(uniform_host_.data() + size_t(slot) * uniform_align_, 0, (pod_bytes + 15) / 16 * 16);
    std::memcpy(uniform_host_.data() + size_t(slot) * uniform_align_, pod, pod_bytes);
    std::vector<WGPUBindGroupEntry> entries(buffers.size() + 1);
    for (size_t i = 0; i < buffers.size(); ++i) {
      Buffer* b = buffers[i];
      uint64_t bound = std::max<uint64_t>(4, (b->size + 3) / 4 * 4);
      if (bound > limits_.maxStorageBufferBindingSize) {
        Fail("webgpu kernel " + name + ": argument " + std::to_string(i) + " is a buffer of " +
             std::to_string(b->size) + " bytes, over the adapter's max storage-buffer binding of " +
             std::to_string(limits_.maxStorageBufferBindingSize) + " bytes (" + entry_.name + ")");
      }
      entries[i] = WGPU_BIND_GROUP_ENTRY_INIT;
      entries[i].binding = uint32_t(i);
      entries[i].buffer = b->handle;
      entries[i].offset = 0;
      entries[i].size = bound;
    }
    WGPUBindGroupEntry& u = entries.back();
    u = WGPU_BIND_GROUP_ENTRY_INIT;
    u.binding = uint32_t(buffers.size());
    u.buffer = uniform_;
    u.offset = uint64_t(slot) * uniform_align_;
    u.size = (pod_bytes + 15) / 16 * 16;
    WGPUBindGroupDescriptor bd = WGPU_BIND_GROUP_DESCRIPTOR_INIT;
    bd.layout = layout;
    bd.entryCount = entries.size();
    bd.entries = entries.data();
    WGPUBindGroup group = wgpuDeviceCreateBindGroup(device_, &bd);
    EnsurePass();
    wgpuComputePassEncoderSetPipeline(pass_, pipeline);
    wgpuComputePassEncoderSetBindGroup(pass_, 0, group, 0, nullptr);
    wgpuComputePassEncoderDispatchWorkgroups(pass_, gx, gy, gz);
    wgpuBindGroupRelease(group);
    ++dispatches_;
    if (!error_.empty()) CheckError(("dispatching " + name).c_str());
  }

  // ---- copies ----
  void Write(Buffer* dst, uint64_t offset, const void* src, uint64_t n) {
    if (n == 0) return;
    CheckRange(dst, offset, n, "write");
    if (offset % 4 != 0 || n % 4 != 0) {
      // WebGPU copies move whole 4-byte words: read the words around the range, patch, write back.
      uint64_t lo = offset / 4 * 4, hi = (offset + n + 3) / 4 * 4;
      std::vector<uint8_t> words(hi - lo);
      ReadAligned(dst, lo, words.data(), hi - lo);
      std::memcpy(words.data() + (offset - lo), src, n);
      WriteAligned(dst, lo, words.data(), hi - lo);
      return;
    }
    WriteAligned(dst, offset, src, n);
  }

  void Read(Buffer* src, uint64_t offset, void* dst, uint64_t n) {
    if (n == 0) return;
    CheckRange(src, offset, n, "read");
    uint64_t lo = offset / 4 * 4, hi = (offset + n + 3) / 4 * 4;
    if (lo == offset && hi == offset + n) {
      ReadAligned(src, offset, dst, n);
      return;
    }
    std::vector<uint8_t> words(hi - lo);
    ReadAligned(src, lo, words.data(), hi - lo);
    std::memcpy(dst, words.data() + (offset - lo), n);
  }

  void Copy(Buffer* src, uint64_t src_off, Buffer* dst, uint64_t dst_off, uint64_t n) {
    if (n == 0) return;
    CheckRange(src, src_off, n, "read");
    CheckRange(dst, dst_off, n, "write");
    if (src == dst || src_off % 4 || dst_off % 4 || n % 4) {
      std::vector<uint8_t> host(n);
      Read(src, src_off, host.data(), n);
      Write(dst, dst_off, host.data(), n);
      return;
    }
    EnsureEncoder();
    EndPass();
    wgpuCommandEncoderCopyBufferToBuffer(encoder_, src->handle, src_off, dst->handle, dst_off, n);
  }

  std::string Stats() {
    std::ostringstream os;
    os << "{\"dispatches\": " << dispatches_ << ", \"submits\": " << submits_ << ", \"pipelines\": " << pipelines_
       << ", \"readbacks\": " << readbacks_ << "}";
    return os.str();
  }
  void CountPipeline() { ++pipelines_; }

 private:
  void CheckRange(Buffer* b, uint64_t offset, uint64_t n, const char* what) {
    if (b == nullptr || offset + n > (b->size + 3) / 4 * 4) {
      Fail("webgpu: " + std::string(what) + " of " + std::to_string(n) + " bytes at offset " +
           std::to_string(offset) + " is outside a buffer of " + std::to_string(b ? b->size : 0) + " bytes");
    }
  }

  void WriteAligned(Buffer* dst, uint64_t offset, const void* src, uint64_t n) {
    if (encoder_ == nullptr) {
      // Queue writes land before the next submission: nothing recorded is waiting, so order holds.
      wgpuQueueWriteBuffer(queue_, dst->handle, offset, src, n);
      CheckError("writing a buffer");
      return;
    }
    // Kernels recorded but not submitted must see the old contents and later ones the new: copy
    // through a staging buffer inside the same command stream instead of a queue write.
    WGPUBufferDescriptor d = WGPU_BUFFER_DESCRIPTOR_INIT;
    d.size = n;
    d.usage = WGPUBufferUsage_MapWrite | WGPUBufferUsage_CopySrc;
    d.mappedAtCreation = true;
    WGPUBuffer staging = wgpuDeviceCreateBuffer(device_, &d);
    std::memcpy(wgpuBufferGetMappedRange(staging, 0, n), src, n);
    wgpuBufferUnmap(staging);
    EndPass();
    wgpuCommandEncoderCopyBufferToBuffer(encoder_, staging, 0, dst->handle, offset, n);
    release_after_submit_.push_back(staging);
  }

  void ReadAligned(Buffer* src, uint64_t offset, void* dst, uint64_t n) {
    if (readback_ == nullptr || readback_size_ < n) {
      if (readback_ != nullptr) {
        wgpuBufferDestroy(readback_);
        wgpuBufferRelease(readback_);
      }
      readback_size_ = std::max<uint64_t>(n, 1 << 16);
      WGPUBufferDescriptor d = WGPU_BUFFER_DESCRIPTOR_INIT;
      d.size = readback_size_;
      d.usage = WGPUBufferUsage_MapRead | WGPUBufferUsage_CopyDst;
      readback_ = wgpuDeviceCreateBuffer(device_, &d);
    }
    EnsureEncoder();
    EndPass();
    wgpuCommandEncoderCopyBufferToBuffer(encoder_, src->handle, offset, readback_, 0, n);
    Flush();
    struct State {
      bool done = false;
      WGPUMapAsyncStatus status;
      std::string message;
    } st;
    WGPUBufferMapCallbackInfo cb = WGPU_BUFFER_MAP_CALLBACK_INFO_INIT;
    cb.mode = WGPUCallbackMode_AllowSpontaneous;
    cb.callback = [](WGPUMapAsyncStatus status, WGPUStringView msg, void* s, void*) {
      auto* state = static_cast<State*>(s);
      state->status = status;
      state->message = ToString(msg);
      state->done = true;
    };
    cb.userdata1 = &st;
    wgpuBufferMapAsync(readback_, WGPUMapMode_Read, 0, n, cb);
    while (!st.done) wgpuDevicePoll(device_, true, nullptr);
    CheckError("reading a buffer back");
    if (st.status != WGPUMapAsyncStatus_Success) Fail("webgpu: reading a buffer back failed: " + st.message);
    const void* mapped = wgpuBufferGetConstMappedRange(readback_, 0, n);
    std::memcpy(dst, mapped, n);
    wgpuBufferUnmap(readback_);
    ++readbacks_;
  }

  WGPUInstance instance_;
  AdapterEntry entry_;
  int device_id_;
  WGPULimits limits_;
  WGPUDevice device_ = nullptr;
  WGPUQueue queue_ = nullptr;
  WGPUCommandEncoder encoder_ = nullptr;
  WGPUComputePassEncoder pass_ = nullptr;
  WGPUBuffer uniform_ = nullptr;
  std::vector<uint8_t> uniform_host_;
  uint32_t uniform_align_ = 256, uniform_slots_ = 0, slots_used_ = 0;
  WGPUBuffer readback_ = nullptr;
  uint64_t readback_size_ = 0;
  std::vector<WGPUBuffer> release_after_submit_;
  std::string error_;
  uint64_t dispatches_ = 0, submits_ = 0, pipelines_ = 0, readbacks_ = 0;
};

// The process-wide state: one instance, the adapters, and a context per device id opened so far.
class Runtime {
 public:
  static Runtime* Global() {
    static Runtime* inst = new Runtime();  // never destroyed: TVM may free tensors during exit
    return inst;
  }

  const std::vector<AdapterEntry>& Adapters() {
    std::lock_guard<std::mutex> lock(mu_);
    Enumerate();
    return adapters_;
  }

  Context* Get(int device_id) {
    std::lock_guard<std::mutex> lock(mu_);
    Enumerate();
    if (device_id < 0 || size_t(device_id) >= adapters_.size()) {
      if (adapters_.empty()) {
        Fail("no WebGPU/Vulkan adapter found: install a Vulkan driver (on Debian/Ubuntu: apt-get install "
             "mesa-vulkan-drivers for lavapipe, or your GPU vendor's driver)");
      }
      Fail("webgpu device " + std::to_string(device_id) + " does not exist (" + std::to_string(adapters_.size()) +
           " adapter(s) found)");
    }
    auto it = contexts_.find(device_id);
    if (it == contexts_.end()) {
      it = contexts_.emplace(device_id, std::make_unique<Context>(instance_, adapters_[device_id], device_id)).first;
    }
    return it->second.get();
  }

  bool Exists(int device_id) {
    std::lock_guard<std::mutex> lock(mu_);
    Enumerate();
    return device_id >= 0 && size_t(device_id) < adapters_.size();
  }

 private:
  void Enumerate() {
    if (enumerated_) return;
    enumerated_ = true;
    WGPUInstanceDescriptor desc = WGPU_INSTANCE_DESCRIPTOR_INIT;
    instance_ = wgpuCreateInstance(&desc);
    if (instance_ == nullptr) return;
    WGPUInstanceEnumerateAdapterOptions opts{nullptr, WGPUInstanceBackend_Primary};
    size_t n = wgpuInstanceEnumerateAdapters(instance_, &opts, nullptr);
    std::vector<WGPUAdapter> found(n);
    if (n) wgpuInstanceEnumerateAdapters(instance_, &opts, found.data());
    for (WGPUAdapter a : found) {
      AdapterEntry e;
      e.adapter = a;
      WGPUAdapterInfo info = WGPU_ADAPTER_INFO_INIT;
      wgpuAdapterGetInfo(a, &info);
      e.name = ToString(info.device);
      e.driver = ToString(info.description);
      e.type = info.adapterType;
      e.backend = info.backendType;
      wgpuAdapterInfoFreeMembers(info);
      e.limits = WGPU_LIMITS_INIT;
      wgpuAdapterGetLimits(a, &e.limits);
      e.f16 = wgpuAdapterHasFeature(a, WGPUFeatureName_ShaderF16);
      e.subgroups = wgpuAdapterHasFeature(a, WGPUFeatureName_Subgroups);
      adapters_.push_back(e);
    }
    // Discrete before integrated before CPU; enumeration order within a kind.
    std::stable_sort(adapters_.begin(), adapters_.end(),
                     [](const AdapterEntry& x, const AdapterEntry& y) { return TypeRank(x.type) < TypeRank(y.type); });
  }

  std::mutex mu_;
  bool enumerated_ = false;
  WGPUInstance instance_ = nullptr;
  std::vector<AdapterEntry> adapters_;
  std::map<int, std::unique_ptr<Context>> contexts_;
};

std::string AdapterJson(const AdapterEntry& e, size_t index) {
  std::ostringstream os;
  os << "{\"index\": " << index << ", \"name\": \"" << JsonEscape(e.name) << "\", \"driver\": \""
     << JsonEscape(e.driver) << "\", \"type\": \"" << AdapterTypeName(e.type) << "\", \"backend\": \""
     << BackendName(e.backend) << "\", \"shader_f16\": " << (e.f16 ? "true" : "false")
     << ", \"subgroups\": " << (e.subgroups ? "true" : "false")
     << ", \"max_storage_buffer_binding_size\": " << e.limits.maxStorageBufferBindingSize
     << ", \"max_buffer_size\": " << e.limits.maxBufferSize
     << ", \"max_storage_buffers_per_shader_stage\": " << e.limits.maxStorageBuffersPerShaderStage
     << ", \"max_compute_workgroup_storage_size\": " << e.limits.maxComputeWorkgroupStorageSize
     << ", \"max_compute_invocations_per_workgroup\": " << e.limits.maxComputeInvocationsPerWorkgroup
     << ", \"max_compute_workgroups_per_dimension\": " << e.limits.maxComputeWorkgroupsPerDimension << "}";
  return os.str();
}

// ------------------------------------------------------------------------------------------------
// DeviceAPI
// ------------------------------------------------------------------------------------------------
class WebGPUDeviceAPI final : public DeviceAPI {
 public:
  static WebGPUDeviceAPI* Global() {
    static WebGPUDeviceAPI* inst = new WebGPUDeviceAPI();
    return inst;
  }

  void SetDevice(DLDevice) final {}

  void GetAttr(DLDevice dev, tvm::runtime::DeviceAttrKind kind, ffi::Any* rv) final {
    if (kind == tvm::runtime::kExist) {
      *rv = static_cast<int64_t>(Runtime::Global()->Exists(dev.device_id));
      return;
    }
    if (!Runtime::Global()->Exists(dev.device_id)) return;
    const auto& e = Runtime::Global()->Adapters()[dev.device_id];
    switch (kind) {
      case tvm::runtime::kMaxThreadsPerBlock:
        *rv = static_cast<int64_t>(e.limits.maxComputeInvocationsPerWorkgroup);
        break;
      case tvm::runtime::kWarpSize:
        *rv = static_cast<int64_t>(1);
        break;
      case tvm::runtime::kMaxSharedMemoryPerBlock:
        *rv = static_cast<int64_t>(e.limits.maxComputeWorkgroupStorageSize);
        break;
      case tvm::runtime::kDeviceName:
        *rv = ffi::String(e.name);
        break;
      case tvm::runtime::kMaxThreadDimensions: {
        std::ostringstream os;
        os << "[" << e.limits.maxComputeWorkgroupSizeX << ", " << e.limits.maxComputeWorkgroupSizeY << ", "
           << e.limits.maxComputeWorkgroupSizeZ << "]";
        *rv = ffi::String(os.str());
        break;
      }
      default:
        break;
    }
  }

  void* AllocDataSpace(DLDevice dev, size_t nbytes, size_t, DLDataType) final {
    Context* ctx = Runtime::Global()->Get(dev.device_id);
    std::lock_guard<std::recursive_mutex> lock(ctx->mu);
    return ctx->Alloc(nbytes);
  }

  void FreeDataSpace(DLDevice dev, void* ptr) final {
    Context* ctx = Runtime::Global()->Get(dev.device_id);
    std::lock_guard<std::recursive_mutex> lock(ctx->mu);
    ctx->Free(static_cast<Buffer*>(ptr));
  }

  void StreamSync(DLDevice dev, TVMStreamHandle) final {
    Context* ctx = Runtime::Global()->Get(dev.device_id);
    std::lock_guard<std::recursive_mutex> lock(ctx->mu);
    ctx->Sync();
  }

  // One queue per device keeps every operation in order: stream-to-stream syncs have nothing to do.
  void SyncStreamFromTo(DLDevice, TVMStreamHandle, TVMStreamHandle) final {}

  void* AllocWorkspace(DLDevice dev, size_t nbytes, DLDataType) final {
    std::lock_guard<std::mutex> lock(pool_mu_);
    auto& pool = pools_[dev.device_id];
    // Best fit among the free buffers; a new one otherwise.
    auto best = pool.end();
    for (auto it = pool.begin(); it != pool.end(); ++it) {
      if ((*it)->size >= nbytes && (best == pool.end() || (*it)->size < (*best)->size)) best = it;
    }
    if (best != pool.end()) {
      Buffer* b = *best;
      pool.erase(best);
      return b;
    }
    return AllocDataSpace(dev, nbytes, 64, DLDataType{kDLFloat, 32, 1});
  }

  void FreeWorkspace(DLDevice dev, void* ptr) final {
    std::lock_guard<std::mutex> lock(pool_mu_);
    pools_[dev.device_id].push_back(static_cast<Buffer*>(ptr));
  }

 protected:
  void CopyDataFromTo(const void* from, size_t from_offset, void* to, size_t to_offset, size_t num_bytes,
                      DLDevice dev_from, DLDevice dev_to, DLDataType, TVMStreamHandle) final {
    bool from_gpu = dev_from.device_type == kDLWebGPU, to_gpu = dev_to.device_type == kDLWebGPU;
    if (from_gpu && to_gpu) {
      if (dev_from.device_id == dev_to.device_id) {
        Context* ctx = Runtime::Global()->Get(dev_from.device_id);
        std::lock_guard<std::recursive_mutex> lock(ctx->mu);
        ctx->Copy(static_cast<Buffer*>(const_cast<void*>(from)), from_offset, static_cast<Buffer*>(to), to_offset,
                  num_bytes);
      } else {
        std::vector<uint8_t> host(num_bytes);
        CopyDataFromTo(from, from_offset, host.data(), 0, num_bytes, dev_from, DLDevice{kDLCPU, 0}, {}, nullptr);
        CopyDataFromTo(host.data(), 0, to, to_offset, num_bytes, DLDevice{kDLCPU, 0}, dev_to, {}, nullptr);
      }
    } else if (from_gpu && dev_to.device_type == kDLCPU) {
      Context* ctx = Runtime::Global()->Get(dev_from.device_id);
      std::lock_guard<std::recursive_mutex> lock(ctx->mu);
      ctx->Read(static_cast<Buffer*>(const_cast<void*>(from)), from_offset, static_cast<char*>(to) + to_offset,
                num_bytes);
    } else if (to_gpu && dev_from.device_type == kDLCPU) {
      Context* ctx = Runtime::Global()->Get(dev_to.device_id);
      std::lock_guard<std::recursive_mutex> lock(ctx->mu);
      ctx->Write(static_cast<Buffer*>(to), to_offset, static_cast<const char*>(from) + from_offset, num_bytes);
    } else {
      Fail("webgpu: cannot copy between device types " + std::to_string(dev_from.device_type) + " and " +
           std::to_string(dev_to.device_type));
    }
  }

 private:
  std::mutex pool_mu_;
  std::map<int, std::vector<Buffer*>> pools_;
};

// ------------------------------------------------------------------------------------------------
// The device module: function info + WGSL per kernel, as BuildWebGPU serializes them.
// ------------------------------------------------------------------------------------------------
struct KernelInfo {
  std::string name;
  std::vector<DLDataType> arg_types;
  std::vector<std::string> launch_tags;
};

class Reader {
 public:
  Reader(const char* data, size_t size) : p_(data), end_(data + size) {}
  template <typename T>
  T Pod() {
    Need(sizeof(T));
    T v;
    std::memcpy(&v, p_, sizeof(T));
    p_ += sizeof(T);
    return v;
  }
  std::string Str() {
    uint64_t n = Pod<uint64_t>();
    Need(n);
    std::string s(p_, n);
    p_ += n;
    return s;
  }
  bool AtEnd() const { return p_ == end_; }

 private:
  void Need(uint64_t n) {
    if (uint64_t(end_ - p_) < n) Fail("webgpu module: truncated or malformed device code blob");
  }
  const char* p_;
  const char* end_;
};

enum class LaunchDim { kBlockX, kBlockY, kBlockZ, kThreadX, kThreadY, kThreadZ };

class WebGPUModuleNode;

// What a kernel needs at dispatch time; built once per (module, kernel) on first use.
struct Kernel {
  KernelInfo info;
  std::vector<size_t> buffer_args, pod_args;
  std::vector<LaunchDim> dims;
  std::vector<bool> writable;
  WGPUComputePipeline pipeline = nullptr;
  WGPUBindGroupLayout layout = nullptr;
  int device_id = -1;
};

class WebGPUModuleNode final : public ffi::ModuleObj {
 public:
  WebGPUModuleNode(std::string blob, std::map<std::string, KernelInfo> infos,
                   std::unordered_map<std::string, std::string> sources)
      : blob_(std::move(blob)), infos_(std::move(infos)), sources_(std::move(sources)) {}

  const char* kind() const final { return "webgpu"; }
  int GetPropertyMask() const final { return ffi::Module::kBinarySerializable | ffi::Module::kRunnable; }

  ffi::Bytes SaveToBytes() const final { return ffi::Bytes(blob_); }

  ffi::String InspectSource(const ffi::String& /*format*/) const final {
    std::ostringstream os;
    for (const auto& kv : infos_) os << sources_.at(kv.first);
    return os.str();
  }

  ffi::Optional<ffi::Function> GetFunction(const ffi::String& fname) final {
    auto it = infos_.find(std::string(fname));
    if (it == infos_.end()) return std::nullopt;
    auto kernel = std::make_shared<Kernel>();
    kernel->info = it->second;
    Parse(kernel.get());
    std::string source = sources_.at(it->first);
    // The function owns what it needs (info, WGSL, pipeline): it may outlive this module.
    return ffi::Function::FromPacked([kernel, source](ffi::PackedArgs args, ffi::Any*) {
      Launch(kernel.get(), source, args);
    });
  }

 private:
  static void Parse(Kernel* k) {
    const auto& types = k->info.arg_types;
    for (size_t i = 0; i < types.size(); ++i) {
      DLDataType t = types[i];
      if (t.code == kDLOpaqueHandle) {
        k->buffer_args.push_back(i);
      } else if ((t.code == kDLInt || t.code == kDLUInt || t.code == kDLFloat) && t.bits == 32 && t.lanes == 1) {
        k->pod_args.push_back(i);
      } else {
        Fail("webgpu kernel " + k->info.name + ": argument " + std::to_string(i) +
             " has a type the WebGPU calling convention cannot pass (code " + std::to_string(t.code) + ", " +
             std::to_string(t.bits) + " bits)");
      }
    }
    for (const std::string& tag : k->info.launch_tags) {
      static const std::map<std::string, LaunchDim> kDims = {
          {"blockIdx.x", LaunchDim::kBlockX},   {"blockIdx.y", LaunchDim::kBlockY},
          {"blockIdx.z", LaunchDim::kBlockZ},   {"threadIdx.x", LaunchDim::kThreadX},
          {"threadIdx.y", LaunchDim::kThreadY}, {"threadIdx.z", LaunchDim::kThreadZ}};
      auto d = kDims.find(tag);
      if (d != kDims.end()) {
        k->dims.push_back(d->second);
      } else if (tag.rfind("paramWriteAccess:", 0) == 0) {
        std::string list = tag.substr(std::strlen("paramWriteAccess:"));
        for (char c : list) {
          if (c == '0' || c == '1') k->writable.push_back(c == '1');
        }
      } else {
        Fail("webgpu kernel " + k->info.name + ": unknown launch parameter " + tag);
      }
    }
    if (k->writable.size() != k->buffer_args.size()) {
      Fail("webgpu kernel " + k->info.name + ": paramWriteAccess lists " + std::to_string(k->writable.size()) +
           " buffers, the kernel takes " + std::to_string(k->buffer_args.size()));
    }
  }

  static void Build(Kernel* k, Context* ctx, const std::string& source) {
    WGPUDevice dev = ctx->device();
    std::vector<WGPUBindGroupLayoutEntry> entries;
    for (size_t i = 0; i < k->buffer_args.size(); ++i) {
      WGPUBindGroupLayoutEntry e = WGPU_BIND_GROUP_LAYOUT_ENTRY_INIT;
      e.binding = uint32_t(i);
      e.visibility = WGPUShaderStage_Compute;
      e.buffer.type = k->writable[i] ? WGPUBufferBindingType_Storage : WGPUBufferBindingType_ReadOnlyStorage;
      entries.push_back(e);
    }
    WGPUBindGroupLayoutEntry u = WGPU_BIND_GROUP_LAYOUT_ENTRY_INIT;
    u.binding = uint32_t(k->buffer_args.size());
    u.visibility = WGPUShaderStage_Compute;
    u.buffer.type = WGPUBufferBindingType_Uniform;
    entries.push_back(u);

    wgpuDevicePushErrorScope(dev, WGPUErrorFilter_Validation);
    WGPUBindGroupLayoutDescriptor ld = WGPU_BIND_GROUP_LAYOUT_DESCRIPTOR_INIT;
    ld.entryCount = entries.size();
    ld.entries = entries.data();
    k->layout = wgpuDeviceCreateBindGroupLayout(dev, &ld);
    WGPUPipelineLayoutDescriptor pd = WGPU_PIPELINE_LAYOUT_DESCRIPTOR_INIT;
    pd.bindGroupLayoutCount = 1;
    pd.bindGroupLayouts = &k->layout;
    WGPUPipelineLayout playout = wgpuDeviceCreatePipelineLayout(dev, &pd);

    WGPUShaderSourceWGSL wgsl = WGPU_SHADER_SOURCE_WGSL_INIT;
    wgsl.code = View(source);
    WGPUShaderModuleDescriptor sd = WGPU_SHADER_MODULE_DESCRIPTOR_INIT;
    sd.nextInChain = &wgsl.chain;
    sd.label = View(k->info.name);
    WGPUShaderModule shader = wgpuDeviceCreateShaderModule(dev, &sd);
    WGPUComputePipelineDescriptor cd = WGPU_COMPUTE_PIPELINE_DESCRIPTOR_INIT;
    cd.label = View(k->info.name);
    cd.layout = playout;
    cd.compute.module = shader;
    cd.compute.entryPoint = View(k->info.name);
    k->pipeline = wgpuDeviceCreateComputePipeline(dev, &cd);

    struct Scope {
      bool done = false;
      WGPUErrorType type = WGPUErrorType_NoError;
      std::string message;
    } scope;
    WGPUPopErrorScopeCallbackInfo cb = WGPU_POP_ERROR_SCOPE_CALLBACK_INFO_INIT;
    cb.mode = WGPUCallbackMode_AllowSpontaneous;
    cb.callback = [](WGPUPopErrorScopeStatus, WGPUErrorType type, WGPUStringView msg, void* s, void*) {
      auto* sc = static_cast<Scope*>(s);
      sc->type = type;
      sc->message = ToString(msg);
      sc->done = true;
    };
    cb.userdata1 = &scope;
    wgpuDevicePopErrorScope(dev, cb);
    while (!scope.done) wgpuDevicePoll(dev, false, nullptr);
    wgpuShaderModuleRelease(shader);
    wgpuPipelineLayoutRelease(playout);
    if (scope.type != WGPUErrorType_NoError) {
      std::string msg = scope.message;
      Fail("webgpu kernel " + k->info.name + " does not compile on " + ctx->entry().name + ": " + msg);
    }
    ctx->CountPipeline();
  }

  static void Launch(Kernel* k, const std::string& source, ffi::PackedArgs args) {
    size_t nbuf = k->buffer_args.size(), npod = k->pod_args.size();
    size_t nargs = k->info.arg_types.size();
    if (size_t(args.size()) != nargs + k->dims.size()) {
      Fail("webgpu kernel " + k->info.name + ": called with " + std::to_string(args.size()) + " arguments, takes " +
           std::to_string(nargs + k->dims.size()));
    }
    std::vector<Buffer*> buffers(nbuf);
    for (size_t i = 0; i < nbuf; ++i) {
      buffers[i] = static_cast<Buffer*>(args[k->buffer_args[i]].cast<void*>());
      if (buffers[i] == nullptr) Fail("webgpu kernel " + k->info.name + ": buffer argument " + std::to_string(i) + " is null");
    }
    int device_id = nbuf ? buffers[0]->device_id : 0;
    for (Buffer* b : buffers) {
      if (b->device_id != device_id) Fail("webgpu kernel " + k->info.name + ": buffers on different devices");
    }
    Context* ctx = Runtime::Global()->Get(device_id);
    std::lock_guard<std::recursive_mutex> lock(ctx->mu);
    if (k->pipeline == nullptr || k->device_id != device_id) {
      Build(k, ctx, source);
      k->device_id = device_id;
    }
    std::vector<uint32_t> pod(npod + 1);
    for (size_t i = 0; i < npod; ++i) {
      size_t a = k->pod_args[i];
      DLDataType t = k->info.arg_types[a];
      if (t.code == kDLFloat) {
        float f = static_cast<float>(args[a].cast<double>());
        std::memcpy(&pod[i], &f, 4);
      } else if (t.code == kDLInt) {
        int32_t v = static_cast<int32_t>(args[a].cast<int64_t>());
        std::memcpy(&pod[i], &v, 4);
      } else {
        pod[i] = static_cast<uint32_t>(args[a].cast<int64_t>());
      }
    }
    uint64_t grid[3] = {1, 1, 1};
    for (size_t i = 0; i < k->dims.size(); ++i) {
      int64_t v = args[nargs + i].cast<int64_t>();
      LaunchDim d = k->dims[i];
      if (d == LaunchDim::kBlockZ) Fail("webgpu kernel " + k->info.name + ": blockIdx.z is reserved");
      if (d == LaunchDim::kBlockX) grid[0] = uint64_t(v);
      if (d == LaunchDim::kBlockY) grid[1] = uint64_t(v);
      if (v <= 0) return;  // an empty grid: nothing to run
    }
    uint64_t limit = ctx->limits().maxComputeWorkgroupsPerDimension;
    uint64_t x = grid[0], z = 1;
    // Fold a wide x into z; the kernel rebuilds x = blockIdx.z * gridDim.x + blockIdx.x.
    while (x > limit) {
      x = (x + 1) / 2;
      z *= 2;
    }
    if (grid[1] > limit || z > limit) {
      Fail("webgpu kernel " + k->info.name + ": grid " + std::to_string(grid[0]) + " x " + std::to_string(grid[1]) +
           " exceeds the adapter's " + std::to_string(limit) + " workgroups per dimension");
    }
    // The kernel returns when its x index is *greater than* packGridDimX, so pass the last valid
    // index, not the count: padded blocks (index == count) must not run either.
    pod[npod] = static_cast<uint32_t>(grid[0] - 1);
    ctx->Dispatch(k->pipeline, k->layout, buffers, pod.data(), pod.size(), uint32_t(x), uint32_t(grid[1]),
                  uint32_t(z), k->info.name);
  }

 private:
  std::string blob_;
  std::map<std::string, KernelInfo> infos_;
  std::unordered_map<std::string, std::string> sources_;
};

ffi::Module LoadFromBytes(const ffi::Bytes& bytes) {
  std::string blob(bytes.data(), bytes.size());
  Reader r(blob.data(), blob.size());
  std::map<std::string, KernelInfo> infos;
  uint64_t nfunc = r.Pod<uint64_t>();
  for (uint64_t i = 0; i < nfunc; ++i) {
    std::string key = r.Str();
    KernelInfo info;
    info.name = r.Str();
    uint64_t ntypes = r.Pod<uint64_t>();
    for (uint64_t j = 0; j < ntypes; ++j) {
      DLDataType t;
      t.code = r.Pod<uint8_t>();
      t.bits = r.Pod<uint8_t>();
      t.lanes = r.Pod<uint16_t>();
      info.arg_types.push_back(t);
    }
    uint64_t ntags = r.Pod<uint64_t>();
    for (uint64_t j = 0; j < ntags; ++j) info.launch_tags.push_back(r.Str());
    uint64_t nextra = r.Pod<uint64_t>();
    for (uint64_t j = 0; j < nextra; ++j) {
      if (r.Pod<int32_t>() != 0) Fail("webgpu module: kernel " + info.name + " uses argument tags it cannot pass");
    }
    infos.emplace(key, std::move(info));
  }
  std::unordered_map<std::string, std::string> sources;
  uint64_t nsrc = r.Pod<uint64_t>();
  for (uint64_t i = 0; i < nsrc; ++i) {
    std::string key = r.Str();
    sources[key] = r.Str();
  }
  for (const auto& kv : infos) {
    if (!sources.count(kv.first)) Fail("webgpu module: no WGSL for kernel " + kv.first);
  }
  return ffi::Module(ffi::make_object<WebGPUModuleNode>(std::move(blob), std::move(infos), std::move(sources)));
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def_packed("device_api.webgpu",
                  [](ffi::PackedArgs, ffi::Any* rv) {
                    *rv = static_cast<void*>(static_cast<DeviceAPI*>(WebGPUDeviceAPI::Global()));
                  })
      .def("ffi.Module.load_from_bytes.webgpu", LoadFromBytes)
      .def("gptbc.webgpu.adapters",
           []() {
             const auto& adapters = Runtime::Global()->Adapters();
             std::string out = "[";
             for (size_t i = 0; i < adapters.size(); ++i) out += (i ? ", " : "") + AdapterJson(adapters[i], i);
             return ffi::String(out + "]");
           })
      .def("gptbc.webgpu.device_info",
           [](int device_id) {
             Context* ctx = Runtime::Global()->Get(device_id);
             return ffi::String(AdapterJson(ctx->entry(), size_t(device_id)));
           })
      .def("gptbc.webgpu.stats", [](int device_id) {
        Context* ctx = Runtime::Global()->Get(device_id);
        std::lock_guard<std::recursive_mutex> lock(ctx->mu);
        return ffi::String(ctx->Stats());
      });
}

}  // namespace webgpu
}  // namespace gptbc
