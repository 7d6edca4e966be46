# The cubins are embedded with an assembler .incbin: ASM must be enabled at directory scope.
enable_language(ASM)

# serq_add_cuda_kernel(target): adds the CUDA kernel of SerqMatMul to `target` (see
# custom_ops/CMakeLists.txt). Sets SERQ_CUDA_INDEX (the embedded cubins' index, installed
# beside the library).

set(_SERQ_CUDA_SRC "${CMAKE_CURRENT_LIST_DIR}/../src")

function(serq_add_cuda_kernel target)
  set(_root "${PROJECT_SOURCE_DIR}")
  # The interpreter that runs the build: scikit-build-core passes Python_EXECUTABLE.
  if(NOT Python_EXECUTABLE)
    find_package(Python 3.9 COMPONENTS Interpreter)
    if(NOT Python_Interpreter_FOUND)
      message(FATAL_ERROR "serq_onnx: SERQ_BUILD_CUDA=ON needs a Python interpreter with triton "
                          "(pass -DPython_EXECUTABLE=...)")
    endif()
  endif()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
            "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'include'))"
    RESULT_VARIABLE _rc OUTPUT_VARIABLE _inc ERROR_VARIABLE _err OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0 OR NOT EXISTS "${_inc}/cuda.h")
    message(FATAL_ERROR
      "serq_onnx: SERQ_BUILD_CUDA=ON needs triton (with its bundled cuda.h) importable by "
      "${Python_EXECUTABLE}, to compile the kernels and for the driver API header.\n"
      "Install the gpu extra's triton into that environment and build without isolation "
      "(pip install --no-build-isolation '.[gpu]'), or build with SERQ_BUILD_CUDA=OFF.\n${_err}")
  endif()
  message(STATUS "serq_onnx: CUDA kernel on; cuda.h from ${_inc}")

  if(DEFINED ENV{SERQ_CACHE} AND NOT "$ENV{SERQ_CACHE}" STREQUAL "")
    set(_cache_default "$ENV{SERQ_CACHE}")
  else()
    set(_cache_default "${_root}/.cache")
  endif()
  set(SERQ_AOT_CACHE_DIR "${_cache_default}" CACHE PATH "Cache folder of the AOT cubin build (aot/<key>)")

  set(_aot "${CMAKE_CURRENT_BINARY_DIR}/aot")
  set(_gen "${CMAKE_CURRENT_BINARY_DIR}/cuda_gen")
  file(GLOB_RECURSE _kernel_sources CONFIGURE_DEPENDS "${_root}/kernels/*.py")
  add_custom_command(
    OUTPUT "${_aot}/manifest.json"
    COMMAND "${CMAKE_COMMAND}" -E env --unset=TRITON_INTERPRET
            "${Python_EXECUTABLE}" "${_root}/scripts/aot_cached.py"
            --root "${_root}" --cache "${SERQ_AOT_CACHE_DIR}" --out "${_aot}"
    DEPENDS ${_kernel_sources} "${_root}/serq_onnx/reference.py" "${_root}/scripts/aot_cached.py"
    WORKING_DIRECTORY "${_root}"
    COMMENT "AOT build of the Triton kernels (cubins for sm_80, sm_89, sm_90)"
    VERBATIM)
  add_custom_command(
    OUTPUT "${_gen}/serq_cuda_tables.cc" "${_gen}/serq_cuda_cubins.S" "${_gen}/serq_cuda_index.json"
    COMMAND "${Python_EXECUTABLE}" "${_root}/scripts/gen_cuda_embed.py"
            --manifest "${_aot}/manifest.json" --out "${_gen}"
    DEPENDS "${_aot}/manifest.json" "${_root}/scripts/gen_cuda_embed.py"
    COMMENT "Embedding the cubins and the launch plan"
    VERBATIM)

  set(_src "${_SERQ_CUDA_SRC}")
  target_sources(${target} PRIVATE
    "${_src}/cuda/driver.cc"
    "${_src}/cuda/launcher.cc"
    "${_src}/cuda/plan.cc"
    "${_src}/cuda/repack.cc"
    "${_src}/cuda/serq_matmul_cuda.cc"
    "${_gen}/serq_cuda_tables.cc"
    "${_gen}/serq_cuda_cubins.S")
  target_include_directories(${target} SYSTEM PRIVATE "${_inc}")
  target_compile_definitions(${target} PRIVATE SERQ_WITH_CUDA)
  # dlopen/dlsym of libcuda.so.1 (in libc itself on glibc >= 2.34).
  target_link_libraries(${target} PRIVATE ${CMAKE_DL_LIBS})
  install(FILES "${_gen}/serq_cuda_index.json" DESTINATION serq_onnx/lib RENAME serq_cuda_cubins.json)
endfunction()
