// gptbc_nccl: disco collectives for CUDA workers (one GPU each) over NCCL, the GPU counterpart of cpu_ccl.cc.
// The apache-tvm wheel registers no CCL (its `nccl` functions are not compiled in), so this one is built
// against PyPI's nvidia-nccl-cu12 (libnccl.so.2 + nccl.h) with the CUDA toolkit's nvcc:
//   cmake -S . -B build -DGPTBC_NCCL=ON -DNCCL_HOME=<site-packages>/nvidia/nccl && cmake --build build --target gptbc_ccl_nccl
// Registered as runtime.disco.gptbc_nccl.*; nothing loads it unless asked (built, not run here: no GPU).
//
// Every collective runs on the stream TVM launches the worker's kernels on (TVMFFIEnvGetStream), so it is
// ordered after the kernels that produced its input and before those that read its output.
#include <cuda_runtime.h>
#include <nccl.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>
#include <tvm/runtime/disco/disco_worker.h>
#include <tvm/runtime/disco/session.h>

#include <cstring>
#include <string>

namespace gptbc {
namespace nccl {

using tvm::ffi::Optional;
using tvm::ffi::Tensor;
using tvm::runtime::DiscoWorker;

#define GPTBC_CUDA(call)                                                                        \
  do {                                                                                          \
    cudaError_t gptbc_cuda_ = (call);                                                           \
    TVM_FFI_CHECK(gptbc_cuda_ == cudaSuccess, RuntimeError)                                     \
        << "gptbc_nccl: " #call ": " << cudaGetErrorString(gptbc_cuda_);                        \
  } while (0)
#define GPTBC_NCCL(call)                                                                        \
  do {                                                                                          \
    ncclResult_t gptbc_nccl_ = (call);                                                          \
    TVM_FFI_CHECK(gptbc_nccl_ == ncclSuccess, RuntimeError)                                     \
        << "gptbc_nccl: " #call ": " << ncclGetErrorString(gptbc_nccl_);                        \
  } while (0)

struct Context {
  ncclComm_t comm = nullptr;
  int device = -1;
  int rank = 0;
  int size = 1;
};
thread_local Context ctx;

Context& Current() {
  TVM_FFI_CHECK(ctx.comm != nullptr, RuntimeError) << "gptbc_nccl: init_ccl was not called for this worker";
  GPTBC_CUDA(cudaSetDevice(ctx.device));
  return ctx;
}

cudaStream_t Stream() { return static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, ctx.device)); }

const DLTensor* Checked(const Tensor& t, const char* what) {
  const DLTensor* dl = t.GetDLTensorPtr();
  TVM_FFI_CHECK(dl->device.device_type == kDLCUDA, ValueError) << "gptbc_nccl: " << what << " is not on a CUDA device";
  TVM_FFI_CHECK(t.IsContiguous(), ValueError) << "gptbc_nccl: " << what << " is not contiguous";
  return dl;
}

void* Data(const DLTensor* dl) { return static_cast<char*>(dl->data) + dl->byte_offset; }

size_t Count(const DLTensor* dl) {
  size_t n = 1;
  for (int i = 0; i < dl->ndim; ++i) n *= static_cast<size_t>(dl->shape[i]);
  return n;
}

ncclDataType_t Type(DLDataType t) {
  if (t.code == kDLFloat && t.bits == 32) return ncclFloat32;
  if (t.code == kDLFloat && t.bits == 16) return ncclFloat16;
  if (t.code == kDLFloat && t.bits == 64) return ncclFloat64;
  if (t.code == kDLBfloat && t.bits == 16) return ncclBfloat16;
  if (t.code == kDLInt && t.bits == 32) return ncclInt32;
  if (t.code == kDLInt && t.bits == 64) return ncclInt64;
  if (t.code == kDLInt && t.bits == 8) return ncclInt8;
  if (t.code == kDLUInt && t.bits == 8) return ncclUint8;
  TVM_FFI_THROW(ValueError) << "gptbc_nccl: dtype code " << static_cast<int>(t.code) << " bits "
                            << static_cast<int>(t.bits) << " is not supported";
  return ncclFloat32;  // not reached: the line above throws
}

ncclRedOp_t Op(int kind) {  // disco's ReduceKind: sum, prod, min, max, avg
  switch (kind) {
    case 0:
      return ncclSum;
    case 1:
      return ncclProd;
    case 2:
      return ncclMin;
    case 3:
      return ncclMax;
    case 4:
      return ncclAvg;
  }
  TVM_FFI_THROW(ValueError) << "gptbc_nccl: unknown reduce kind " << kind;
  return ncclSum;  // not reached: the line above throws
}

void InitCCL(tvm::runtime::Session sess, tvm::ffi::Shape device_ids) {
  ncclUniqueId id;
  GPTBC_NCCL(ncclGetUniqueId(&id));
  sess->CallPacked(sess->GetGlobalFunc("runtime.disco.gptbc_nccl.init_ccl_per_worker"), device_ids,
                   tvm::ffi::Bytes(id.internal, NCCL_UNIQUE_ID_BYTES));
}

void InitCCLPerWorker(tvm::ffi::Shape device_ids, tvm::ffi::Bytes unique_id) {
  DiscoWorker* worker = DiscoWorker::ThreadLocal();
  TVM_FFI_CHECK(worker->num_groups == 1, ValueError) << "gptbc_nccl: worker groups are not supported";
  TVM_FFI_CHECK(unique_id.size() == NCCL_UNIQUE_ID_BYTES, ValueError) << "gptbc_nccl: bad unique id";
  TVM_FFI_CHECK(static_cast<int>(device_ids.size()) == worker->num_workers, ValueError)
      << "gptbc_nccl: " << device_ids.size() << " device ids for " << worker->num_workers << " workers";
  ctx.device = static_cast<int>(device_ids[worker->local_worker_id]);
  ctx.rank = worker->worker_id;
  ctx.size = worker->num_workers;
  GPTBC_CUDA(cudaSetDevice(ctx.device));
  worker->default_device = DLDevice{kDLCUDA, ctx.device};
  worker->ccl = "gptbc_nccl";
  ncclUniqueId id;
  std::memcpy(id.internal, unique_id.data(), NCCL_UNIQUE_ID_BYTES);
  GPTBC_NCCL(ncclCommInitRank(&ctx.comm, ctx.size, id, ctx.rank));
}

void AllReduce(Tensor send, int kind, bool /*in_group*/, Tensor recv) {
  Context& c = Current();
  const DLTensor *s = Checked(send, "allreduce input"), *r = Checked(recv, "allreduce output");
  GPTBC_NCCL(ncclAllReduce(Data(s), Data(r), Count(s), Type(s->dtype), Op(kind), c.comm, Stream()));
}

void AllGather(Tensor send, bool /*in_group*/, Tensor recv) {
  Context& c = Current();
  const DLTensor *s = Checked(send, "allgather input"), *r = Checked(recv, "allgather output");
  GPTBC_NCCL(ncclAllGather(Data(s), Data(r), Count(s), Type(s->dtype), c.comm, Stream()));
}

void BroadcastFromWorker0(Optional<Tensor> send, bool /*in_group*/, Tensor recv) {
  Context& c = Current();
  const DLTensor* r = Checked(recv, "broadcast output");
  const void* from = c.rank == 0 ? Data(Checked(send.value(), "broadcast input")) : nullptr;
  GPTBC_NCCL(ncclBroadcast(from, Data(r), Count(r), Type(r->dtype), 0, c.comm, Stream()));
}

void ScatterFromWorker0(Optional<Tensor> send, bool /*in_group*/, Tensor recv) {
  Context& c = Current();
  const DLTensor* r = Checked(recv, "scatter output");
  size_t n = Count(r), bytes = n * ((r->dtype.bits * r->dtype.lanes + 7) / 8);
  GPTBC_NCCL(ncclGroupStart());
  if (c.rank == 0) {
    char* from = static_cast<char*>(Data(Checked(send.value(), "scatter input")));
    for (int peer = 0; peer < c.size; ++peer) {
      GPTBC_NCCL(ncclSend(from + peer * bytes, n, Type(r->dtype), peer, c.comm, Stream()));
    }
  }
  GPTBC_NCCL(ncclRecv(Data(r), n, Type(r->dtype), 0, c.comm, Stream()));
  GPTBC_NCCL(ncclGroupEnd());
}

void GatherToWorker0(Tensor send, bool /*in_group*/, Optional<Tensor> recv) {
  Context& c = Current();
  const DLTensor* s = Checked(send, "gather input");
  size_t n = Count(s), bytes = n * ((s->dtype.bits * s->dtype.lanes + 7) / 8);
  GPTBC_NCCL(ncclGroupStart());
  GPTBC_NCCL(ncclSend(Data(s), n, Type(s->dtype), 0, c.comm, Stream()));
  if (c.rank == 0) {
    char* to = static_cast<char*>(Data(Checked(recv.value(), "gather output")));
    for (int peer = 0; peer < c.size; ++peer) {
      GPTBC_NCCL(ncclRecv(to + peer * bytes, n, Type(s->dtype), peer, c.comm, Stream()));
    }
  }
  GPTBC_NCCL(ncclGroupEnd());
}

void SyncWorker() { GPTBC_CUDA(cudaStreamSynchronize(Stream())); }

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("runtime.disco.gptbc_nccl.init_ccl", InitCCL)
      .def("runtime.disco.gptbc_nccl.init_ccl_per_worker", InitCCLPerWorker)
      .def("runtime.disco.gptbc_nccl.allreduce", AllReduce)
      .def("runtime.disco.gptbc_nccl.allgather", AllGather)
      .def("runtime.disco.gptbc_nccl.broadcast_from_worker0", BroadcastFromWorker0)
      .def("runtime.disco.gptbc_nccl.scatter_from_worker0", ScatterFromWorker0)
      .def("runtime.disco.gptbc_nccl.gather_to_worker0", GatherToWorker0)
      .def("runtime.disco.gptbc_nccl.sync_worker", SyncWorker);
}

}  // namespace nccl
}  // namespace gptbc
