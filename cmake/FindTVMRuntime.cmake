# Finds the TVM runtime that gptbc-run links against: libtvm_runtime + libtvm_ffi and their headers
# (tvm/runtime, tvm/ffi, dlpack).
#
# Where it looks, in order:
#   1. TVM_HOME (CMake variable or environment variable): an installed `tvm` Python package directory,
#      a TVM install prefix, or a TVM source tree with a `build/` directory.
#   2. The `apache-tvm` wheel of the Python interpreter given as -DPython3_EXECUTABLE=... or, without
#      it, the first `python3` on PATH. The packages are located with importlib.util.find_spec, which
#      does not import tvm (importing it would take seconds and need its compiler library).
#
# Defines the imported target tvm::runtime and TVMRuntime_LIBRARY_DIRS (for the run-time search path).

set(_tvm_hints "")
set(_ffi_hints "")
if(NOT TVM_HOME AND DEFINED ENV{TVM_HOME})
  set(TVM_HOME "$ENV{TVM_HOME}")
endif()

if(TVM_HOME)
  set(_where "TVM_HOME=${TVM_HOME}")
  string(CONCAT _hint "Point TVM_HOME at a tvm Python package, a TVM install prefix or a TVM source tree "
                      "with a build/ directory, or unset it to use the apache-tvm wheel of python3 on PATH.")
  list(APPEND _tvm_hints "${TVM_HOME}" "${TVM_HOME}/build" "${TVM_HOME}/lib" "${TVM_HOME}/build/lib")
  # The tvm-ffi package sits next to the tvm package in a wheel install, and in 3rdparty/ in a source tree.
  list(APPEND _ffi_hints "${TVM_HOME}/../tvm_ffi" "${TVM_HOME}/3rdparty/tvm-ffi"
       "${TVM_HOME}/3rdparty/tvm-ffi/3rdparty/dlpack" "${TVM_HOME}")
else()
  if(NOT Python3_EXECUTABLE)
    find_program(Python3_EXECUTABLE NAMES python3 python NAMES_PER_DIR)
  endif()
  set(_where "the apache-tvm wheel of ${Python3_EXECUTABLE}")
  string(CONCAT _hint "Install it there (pip install apache-tvm==0.27.0.post1), name the Python that has it "
                      "(-DPython3_EXECUTABLE=/path/to/python), or set TVM_HOME to a TVM package, install "
                      "prefix or source tree.")
  if(Python3_EXECUTABLE)
    string(CONCAT _script "import importlib.util as u\n"
                          "for n in ('tvm', 'tvm_ffi'):\n"
                          "    s = u.find_spec(n)\n"
                          "    print(n + '=' + (s.submodule_search_locations[0] if s else ''))\n")
    execute_process(COMMAND "${Python3_EXECUTABLE}" -c "${_script}" OUTPUT_VARIABLE _out ERROR_QUIET)
    if(_out MATCHES "tvm=([^\n]*)\ntvm_ffi=([^\n]*)")
      set(_tvm_pkg "${CMAKE_MATCH_1}")
      set(_ffi_pkg "${CMAKE_MATCH_2}")
      if(_tvm_pkg)
        list(APPEND _tvm_hints "${_tvm_pkg}" "${_tvm_pkg}/lib")
      endif()
      if(_ffi_pkg)
        list(APPEND _ffi_hints "${_ffi_pkg}")
      endif()
    endif()
  endif()
endif()

find_path(TVMRuntime_INCLUDE_DIR tvm/runtime/c_backend_api.h HINTS ${_tvm_hints} PATH_SUFFIXES include NO_DEFAULT_PATH)
find_path(TVMRuntime_FFI_INCLUDE_DIR tvm/ffi/function.h HINTS ${_ffi_hints} ${_tvm_hints} PATH_SUFFIXES include
          NO_DEFAULT_PATH)
find_path(TVMRuntime_DLPACK_INCLUDE_DIR dlpack/dlpack.h HINTS ${_ffi_hints} ${_tvm_hints} PATH_SUFFIXES include
          NO_DEFAULT_PATH)
find_library(TVMRuntime_LIBRARY tvm_runtime HINTS ${_tvm_hints} PATH_SUFFIXES lib NO_DEFAULT_PATH)
find_library(TVMRuntime_FFI_LIBRARY tvm_ffi HINTS ${_ffi_hints} ${_tvm_hints} PATH_SUFFIXES lib NO_DEFAULT_PATH)

include(FindPackageHandleStandardArgs)
set(_missing "")
foreach(_v TVMRuntime_INCLUDE_DIR TVMRuntime_FFI_INCLUDE_DIR TVMRuntime_DLPACK_INCLUDE_DIR TVMRuntime_LIBRARY
           TVMRuntime_FFI_LIBRARY)
  if(NOT ${_v})
    list(APPEND _missing ${_v})
  endif()
endforeach()
if(_missing)
  string(REPLACE ";" ", " _missing "${_missing}")
  message(FATAL_ERROR
    "TVM runtime not found in ${_where} (missing: ${_missing}): gptbc-run needs the TVM runtime headers "
    "(tvm/runtime, tvm/ffi, dlpack) and libraries (libtvm_runtime, libtvm_ffi). " ${_hint})
endif()
find_package_handle_standard_args(TVMRuntime REQUIRED_VARS TVMRuntime_LIBRARY TVMRuntime_FFI_LIBRARY
                                  TVMRuntime_INCLUDE_DIR TVMRuntime_FFI_INCLUDE_DIR TVMRuntime_DLPACK_INCLUDE_DIR)

get_filename_component(_rt_dir "${TVMRuntime_LIBRARY}" DIRECTORY)
get_filename_component(_ffi_dir "${TVMRuntime_FFI_LIBRARY}" DIRECTORY)
set(TVMRuntime_LIBRARY_DIRS "${_rt_dir};${_ffi_dir}")
list(REMOVE_DUPLICATES TVMRuntime_LIBRARY_DIRS)

if(NOT TARGET tvm::runtime)
  add_library(tvm::runtime INTERFACE IMPORTED)
  # The headers are a dependency's: mark them SYSTEM so our warning flags do not apply to them.
  set_target_properties(tvm::runtime PROPERTIES
    INTERFACE_SYSTEM_INCLUDE_DIRECTORIES
      "${TVMRuntime_INCLUDE_DIR};${TVMRuntime_FFI_INCLUDE_DIR};${TVMRuntime_DLPACK_INCLUDE_DIR}"
    INTERFACE_INCLUDE_DIRECTORIES
      "${TVMRuntime_INCLUDE_DIR};${TVMRuntime_FFI_INCLUDE_DIR};${TVMRuntime_DLPACK_INCLUDE_DIR}"
    INTERFACE_LINK_LIBRARIES "${TVMRuntime_LIBRARY};${TVMRuntime_FFI_LIBRARY};${CMAKE_DL_LIBS}")
endif()
