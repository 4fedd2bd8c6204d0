// gptbc_cpu: a collective communication library for TVM disco workers that are threads of one process
// (ThreadedSession) computing on the CPU. The wheel compiles no CCL in (and NCCL needs GPUs), so the
// tensor-parallel model runs and is tested on a CPU through this one.
//
// Registered as runtime.disco.gptbc_cpu.{init_ccl, init_ccl_per_worker, allreduce, allgather,
// broadcast_from_worker0, scatter_from_worker0, gather_to_worker0, sync_worker}: disco's builtins
// (runtime.disco.allreduce, the ops LegalizeOps makes of nn.op.ccl_allreduce) dispatch to
// runtime.disco.<the worker's ccl>.<op>. Loaded only when a tensor-parallel run asks for it
// (python/gptbc/runtime/disco_host.py).
//
// How: the workers of a session share a Group. Each collective publishes every rank's send pointer, meets at
// a barrier, lets each rank read what it needs from the others' buffers, and meets again before anyone
// returns (so no buffer is reused while another rank still reads it). Reductions add the ranks in rank
// order on every rank, into a scratch buffer first (recv may be send): all ranks get bit-identical results,
// which the replicated parts of the model (LayerNorms, the residual stream) rely on.
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/runtime/disco/builtin.h>
#include <tvm/runtime/disco/disco_worker.h>
#include <tvm/runtime/disco/session.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace gptbc {
namespace ccl {

using tvm::ffi::Optional;
using tvm::ffi::Tensor;
using tvm::runtime::DiscoWorker;
using tvm::runtime::ReduceKind;

constexpr const char* kName = "gptbc_cpu";

class Group {
 public:
  explicit Group(int size) : size_(size), slots_(size, nullptr) {}

  int size() const { return size_; }

  // Publishes this rank's pointer and waits until every rank has published theirs.
  void Publish(int rank, const void* data) {
    slots_[rank] = data;
    Barrier();
  }
  const void* Slot(int rank) const { return slots_[rank]; }

  void Barrier() {
    std::unique_lock<std::mutex> lock(mu_);
    int64_t generation = generation_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  const int size_;
  std::vector<const void*> slots_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  int64_t generation_ = 0;
};

// Groups by id: init_ccl (on the controller) makes one, each worker's init_ccl_per_worker picks it up.
std::mutex registry_mu;
std::map<int64_t, std::shared_ptr<Group>> registry;
std::atomic<int64_t> next_group{1};

struct WorkerState {
  std::shared_ptr<Group> group;
  int rank = 0;
};
thread_local WorkerState state;

WorkerState& Current() {
  TVM_FFI_CHECK(state.group != nullptr, RuntimeError)
      << kName << ": this thread has no CCL group (init_ccl was not called for its session)";
  return state;
}

char* Data(const Tensor& t) {
  const DLTensor* dl = t.GetDLTensorPtr();
  return static_cast<char*>(dl->data) + dl->byte_offset;
}

size_t Bytes(const Tensor& t, const char* what) {
  const DLTensor* dl = t.GetDLTensorPtr();
  TVM_FFI_CHECK(dl->device.device_type == kDLCPU, ValueError)
      << kName << ": " << what << " is on device type " << dl->device.device_type << "; this CCL is for CPU tensors";
  TVM_FFI_CHECK(t.IsContiguous(), ValueError) << kName << ": " << what << " is not contiguous";
  return tvm::ffi::GetDataSize(*dl);
}

// float16 <-> float32, round to nearest even (the reductions run in float32 for half-precision tensors).
float HalfToFloat(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while (!(mant & 0x400u));
    bits = sign | ((112 - e) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) return sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0);  // inf, nan
  if (absx >= 0x477ff000u) return sign | 0x7c00u;                                         // overflow
  if (absx < 0x38800000u) {  // a subnormal half (or zero): count units of 2^-24, rounded to nearest even
    float a;
    std::memcpy(&a, &absx, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.0f)));
  }
  uint32_t rounded = absx + 0xfffu + ((absx >> 13) & 1u);  // round to nearest even at bit 13
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

float Bf16ToFloat(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t FloatToBf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // nan stays nan
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

double Combine(ReduceKind kind, double acc, double v) {
  switch (kind) {
    case ReduceKind::kProd:
      return acc * v;
    case ReduceKind::kMin:
      return v < acc ? v : acc;
    case ReduceKind::kMax:
      return v > acc ? v : acc;
    default:  // kSum, kAvg
      return acc + v;
  }
}

// Reduces the ranks' buffers element by element, in rank order, with `load` / `store` for the dtype.
template <typename T, typename Acc, typename Load, typename Store>
void ReduceAs(const Group& g, size_t n, ReduceKind kind, T* out, Load load, Store store) {
  for (size_t i = 0; i < n; ++i) {
    Acc acc = load(static_cast<const T*>(g.Slot(0))[i]);
    for (int r = 1; r < g.size(); ++r) acc = Combine(kind, acc, load(static_cast<const T*>(g.Slot(r))[i]));
    if (kind == ReduceKind::kAvg) acc = acc / g.size();
    out[i] = store(acc);
  }
}

void Reduce(const Group& g, DLDataType dt, size_t n, ReduceKind kind, void* out) {
  auto same = [](auto v) { return v; };
  if (dt.code == kDLFloat && dt.bits == 32) {
    ReduceAs<float, float>(g, n, kind, static_cast<float*>(out), same, same);
  } else if (dt.code == kDLFloat && dt.bits == 64) {
    ReduceAs<double, double>(g, n, kind, static_cast<double*>(out), same, same);
  } else if (dt.code == kDLFloat && dt.bits == 16) {
    ReduceAs<uint16_t, float>(g, n, kind, static_cast<uint16_t*>(out), HalfToFloat, FloatToHalf);
  } else if (dt.code == kDLBfloat && dt.bits == 16) {
    ReduceAs<uint16_t, float>(g, n, kind, static_cast<uint16_t*>(out), Bf16ToFloat, FloatToBf16);
  } else if (dt.code == kDLInt && dt.bits == 32) {
    ReduceAs<int32_t, int64_t>(g, n, kind, static_cast<int32_t*>(out), same,
                               [](int64_t v) { return static_cast<int32_t>(v); });
  } else if (dt.code == kDLInt && dt.bits == 64) {
    ReduceAs<int64_t, int64_t>(g, n, kind, static_cast<int64_t*>(out), same, same);
  } else {
    TVM_FFI_THROW(ValueError) << kName << ": allreduce of dtype code " << static_cast<int>(dt.code) << " bits "
                              << static_cast<int>(dt.bits) << " is not supported";
  }
}

void InitCCL(tvm::runtime::Session sess, tvm::ffi::Shape device_ids) {
  int64_t id = next_group++;
  {
    std::lock_guard<std::mutex> lock(registry_mu);
    registry[id] = std::make_shared<Group>(static_cast<int>(sess->GetNumWorkers()));
  }
  sess->CallPacked(sess->GetGlobalFunc(std::string("runtime.disco.") + kName + ".init_ccl_per_worker"), device_ids,
                   id);
}

void InitCCLPerWorker(tvm::ffi::Shape /*device_ids: CPU workers share the host*/, int64_t group_id) {
  DiscoWorker* worker = DiscoWorker::ThreadLocal();
  TVM_FFI_CHECK(worker->num_groups == 1, ValueError) << kName << ": worker groups are not supported";
  std::lock_guard<std::mutex> lock(registry_mu);
  auto it = registry.find(group_id);
  TVM_FFI_CHECK(it != registry.end(), ValueError) << kName << ": no group " << group_id;
  TVM_FFI_CHECK(it->second->size() == worker->num_workers, ValueError)
      << kName << ": group of " << it->second->size() << " for " << worker->num_workers << " workers";
  state.group = it->second;
  state.rank = worker->worker_id;
  worker->ccl = kName;
}

void AllReduce(Tensor send, int kind, bool /*in_group*/, Tensor recv) {
  TVM_FFI_CHECK(0 <= kind && kind <= 4, ValueError) << kName << ": unknown reduce kind " << kind;
  WorkerState& s = Current();
  size_t bytes = Bytes(send, "allreduce input");
  TVM_FFI_CHECK(Bytes(recv, "allreduce output") == bytes, ValueError) << kName << ": allreduce sizes differ";
  DLDataType dtype = send.GetDLTensorPtr()->dtype;
  size_t n = bytes / ((dtype.bits * dtype.lanes + 7) / 8);
  std::vector<char> scratch(bytes);
  s.group->Publish(s.rank, Data(send));
  Reduce(*s.group, dtype, n, static_cast<ReduceKind>(kind), scratch.data());
  s.group->Barrier();  // every rank has read every send buffer: recv (maybe one of them) may be written
  std::memcpy(Data(recv), scratch.data(), bytes);
}

void AllGather(Tensor send, bool /*in_group*/, Tensor recv) {
  WorkerState& s = Current();
  size_t bytes = Bytes(send, "allgather input");
  TVM_FFI_CHECK(Bytes(recv, "allgather output") == bytes * s.group->size(), ValueError)
      << kName << ": allgather output is not world size x input";
  s.group->Publish(s.rank, Data(send));
  for (int r = 0; r < s.group->size(); ++r) std::memcpy(Data(recv) + r * bytes, s.group->Slot(r), bytes);
  s.group->Barrier();
}

void BroadcastFromWorker0(Optional<Tensor> send, bool /*in_group*/, Tensor recv) {
  WorkerState& s = Current();
  size_t bytes = Bytes(recv, "broadcast output");
  if (s.rank == 0) {
    TVM_FFI_CHECK(send.has_value(), ValueError) << kName << ": worker 0 has nothing to broadcast";
    TVM_FFI_CHECK(Bytes(send.value(), "broadcast input") == bytes, ValueError) << kName << ": broadcast sizes differ";
  }
  s.group->Publish(s.rank, s.rank == 0 ? Data(send.value()) : nullptr);
  if (s.group->Slot(0) != Data(recv)) std::memcpy(Data(recv), s.group->Slot(0), bytes);
  s.group->Barrier();
}

void ScatterFromWorker0(Optional<Tensor> send, bool /*in_group*/, Tensor recv) {
  WorkerState& s = Current();
  size_t bytes = Bytes(recv, "scatter output");
  if (s.rank == 0) {
    TVM_FFI_CHECK(send.has_value(), ValueError) << kName << ": worker 0 has nothing to scatter";
    TVM_FFI_CHECK(Bytes(send.value(), "scatter input") == bytes * s.group->size(), ValueError)
        << kName << ": scatter input is not world size x output";
  }
  s.group->Publish(s.rank, s.rank == 0 ? Data(send.value()) : nullptr);
  std::memcpy(Data(recv), static_cast<const char*>(s.group->Slot(0)) + s.rank * bytes, bytes);
  s.group->Barrier();
}

void GatherToWorker0(Tensor send, bool /*in_group*/, Optional<Tensor> recv) {
  WorkerState& s = Current();
  size_t bytes = Bytes(send, "gather input");
  if (s.rank == 0) {
    TVM_FFI_CHECK(recv.has_value(), ValueError) << kName << ": worker 0 has nowhere to gather to";
    TVM_FFI_CHECK(Bytes(recv.value(), "gather output") == bytes * s.group->size(), ValueError)
        << kName << ": gather output is not world size x input";
  }
  s.group->Publish(s.rank, Data(send));
  if (s.rank == 0) {
    for (int r = 0; r < s.group->size(); ++r) std::memcpy(Data(recv.value()) + r * bytes, s.group->Slot(r), bytes);
  }
  s.group->Barrier();
}

#define GPTBC_CCL_FUNC(op) "runtime.disco.gptbc_cpu." op  // kName, spelled out: the registry takes literals

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def(GPTBC_CCL_FUNC("init_ccl"), InitCCL)
      .def(GPTBC_CCL_FUNC("init_ccl_per_worker"), InitCCLPerWorker)
      .def(GPTBC_CCL_FUNC("allreduce"), AllReduce)
      .def(GPTBC_CCL_FUNC("allgather"), AllGather)
      .def(GPTBC_CCL_FUNC("broadcast_from_worker0"), BroadcastFromWorker0)
      .def(GPTBC_CCL_FUNC("scatter_from_worker0"), ScatterFromWorker0)
      .def(GPTBC_CCL_FUNC("gather_to_worker0"), GatherToWorker0)
      .def(GPTBC_CCL_FUNC("sync_worker"), []() {});  // CPU collectives are synchronous: nothing in flight
}

}  // namespace ccl
}  // namespace gptbc
