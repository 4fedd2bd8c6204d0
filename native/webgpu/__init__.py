"""C++ sources of gptbc's WebGPU/Vulkan runtime (webgpu_runtime.cc, CMakeLists.txt), shipped with the package so
`gptbc.runtime.webgpu` can build libgptbc_webgpu on first use. Nothing to import here."""
