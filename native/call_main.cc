// gptbc-call: call one function of a compiled TVM library on tensors from a file, and write them back (for the
// tests: it runs kernels built for another architecture, e.g. aarch64 under qemu, where Python is not).
//
//   gptbc-call LIB FUNC TENSORS_IN TENSORS_OUT [FUNC TENSORS_IN TENSORS_OUT]...
//
// TENSORS_IN holds tensors named "0", "1", ... (tvm.runtime.save_param_dict_to_file): FUNC gets them in that
// order, outputs included, and TENSORS_OUT receives all of them after the call. More triples make more calls in
// the same process (under qemu, loading the TVM runtime is most of a small call's time). Failures: one line,
// status 1.
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

ffi::Function global(const char* name) {
  auto f = ffi::Function::GetGlobal(name);
  if (!f) throw std::runtime_error(std::string("the TVM runtime has no ") + name);
  return *f;
}

void call(const ffi::Module& lib, const std::string& name, const std::string& in, const std::string& out) {
  auto func = lib->GetFunction(name, true);
  if (!func) throw std::runtime_error("the library has no function " + name);
  auto tensors = global("runtime.LoadParamsFromFile")(in).cast<ffi::Map<ffi::String, ffi::Tensor>>();
  std::vector<ffi::AnyView> args;
  std::vector<ffi::Tensor> held;
  for (size_t i = 0; i < tensors.size(); ++i) {
    auto it = tensors.find(std::to_string(i));
    if (it == tensors.end()) throw std::runtime_error(in + ": no tensor " + std::to_string(i));
    held.push_back((*it).second);
  }
  for (const auto& t : held) args.emplace_back(t);
  ffi::Any result;
  func->CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
  global("runtime.SaveParamsToFile")(tensors, out);
}

int run(int argc, char** argv) {
  if (argc < 5 || (argc - 2) % 3 != 0) {
    std::fputs("usage: gptbc-call LIB FUNC TENSORS_IN TENSORS_OUT [FUNC TENSORS_IN TENSORS_OUT]...\n", stderr);
    return 2;
  }
  ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
  for (int i = 2; i < argc; i += 3) call(lib, argv[i], argv[i + 1], argv[i + 2]);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const ffi::Error& e) {
    std::string msg = e.message();
    std::fprintf(stderr, "error: TVM: %s\n", msg.substr(0, msg.find('\n')).c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
  }
  return 1;
}
