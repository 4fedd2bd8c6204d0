// A compiled gptbc model library with its converted weights, run through the Relax VM on the CPU: one
// sequence in a paged KV cache, prefilled in the library's chunks, then decoded a token at a time.
#pragma once

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <string>
#include <vector>

#include "json.h"
#include "manifest.h"
#include "safetensors.h"

namespace gptbc {

class Model {
 public:
  // Loads and checks everything up front: the library (is it a gptbc library for the CPU?) and the
  // weights (same scheme and tensors as the library?). Throws Error.
  // device: "cpu", or "vulkan[:N]" for a --target vulkan (WGSL) library on gptbc's WebGPU runtime.
  Model(const std::string& model_dir, const std::string& lib, const std::string& device = "cpu");

  // Create the KV cache for sequences 0..len(tokens)-1, with room for tokens[i] tokens (prompt + new tokens)
  // in sequence i: memory for what the requests need, not for the whole context window. A new call drops the
  // sequences of the last one.
  void start(const std::vector<int64_t>& tokens);
  void start(int64_t tokens) { start(std::vector<int64_t>{tokens}); }
  // Append `ids` to sequence `seq` (in prefill_chunk_size chunks); logits after the last, float32[vocab].
  const std::vector<float>& prefill(const std::vector<int32_t>& ids, int64_t seq = 0);
  // Append one token to sequence `seq`; logits for the next (the library's single-row decode).
  const std::vector<float>& decode(int32_t token, int64_t seq = 0);
  // Append tokens[i] to sequence seqs[i], all in one batch_decode call; logits float32[len(seqs) * vocab].
  const std::vector<float>& decode_batch(const std::vector<int64_t>& seqs, const std::vector<int32_t>& tokens);
  // Append `ids` to sequence `seq` in one call (the library's batch_verify: each row's logits come out the same
  // bits as decoding it); logits after each of them, float32[len(ids) * vocab]. Checks drafted tokens.
  const std::vector<float>& verify(const std::vector<int32_t>& ids, int64_t seq = 0);
  // Drop the newest `n` tokens of sequence `seq` from the KV cache (drafted tokens the verify rejected).
  void pop(int64_t n, int64_t seq = 0);
  bool batch_invariant() const { return meta_.batch_invariant; }
  const std::string& model_dir() const { return model_dir_; }

  int64_t max_batch_size() const { return max_batch_size_; }
  // "cpu", "cuda" or "vulkan": the device the library runs on.
  std::string device_kind() const;

  int64_t vocab_size() const { return vocab_size_; }
  int64_t context_window_size() const { return context_window_size_; }
  const std::vector<int32_t>& eos_ids() const { return eos_ids_; }
  // Weight bytes used in place from the memory-mapped files / copied into aligned memory.
  uint64_t mapped_bytes() const { return mapped_bytes_; }
  uint64_t copied_bytes() const { return copied_bytes_; }
  // Of the copied bytes, those in memory advised for transparent huge pages (the repacked int8 weights).
  uint64_t huge_page_bytes() const { return huge_page_bytes_; }

 private:
  void load_library(const std::string& lib);
  void open_device(const std::string& device);
  void open_vulkan(const std::string& device, int32_t index);
  void open_cuda(const std::string& device, int32_t index);
  void check_device_limits();
  void load_params(const manifest::Weights& weights);
  // One call of a forward function: rows[i] new tokens of seqs[i], `ids` all of them in order. prefill and
  // decode take embeds [1, n, n_embd], batch_decode [n, 1, n_embd] (batch_rows).
  // logit_rows: rows of logits it returns (one per sequence; every row for batch_verify).
  const std::vector<float>& forward(const tvm::ffi::Function& func, const std::vector<int64_t>& seqs,
                                   const std::vector<int64_t>& rows, const std::vector<int32_t>& ids,
                                   bool batch_rows, int64_t logit_rows);

  std::string model_dir_, lib_;
  DLDevice dev_{kDLCPU, 0};
  json::Object adapter_;  // the WebGPU adapter's description (device vulkan), as gptbc.webgpu.adapters gives it
  manifest::Library meta_;
  tvm::ffi::Optional<tvm::ffi::Module> library_;  // the loaded library (its compiled kernels by name)
  tvm::ffi::Optional<tvm::ffi::Module> vm_;  // the VM the functions below belong to
  tvm::ffi::Function embed_, prefill_, decode_, batch_decode_, begin_forward_, end_forward_, popn_;
  tvm::ffi::Optional<tvm::ffi::Function> verify_;  // batch_verify (libraries before it lack it)
  std::vector<SafetensorsFile> files_;  // mapped for as long as params in place point into them
  tvm::ffi::Array<tvm::ffi::Tensor> params_;
  tvm::ffi::Any kv_cache_;
  // From the library's manifest: sizes it was compiled for, its KV-cache page size, the alignment its kernels assume.
  int64_t vocab_size_ = 0, n_embd_ = 0, context_window_size_ = 0, prefill_chunk_size_ = 0, max_batch_size_ = 0;
  int64_t page_size_ = 0;
  size_t alignment_ = 0;
  std::vector<int32_t> eos_ids_;
  std::vector<float> logits_;
  uint64_t mapped_bytes_ = 0, copied_bytes_ = 0, huge_page_bytes_ = 0;
};

}  // namespace gptbc
