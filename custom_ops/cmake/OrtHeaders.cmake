# Locates the onnxruntime C/C++ API headers (the op library never links libonnxruntime: the
# runtime hands its API table to RegisterCustomOps).
#
# Sets SERQ_ORT_INCLUDE_DIR (the folder holding onnxruntime_cxx_api.h) and SERQ_ORT_API_VERSION.
# Order: -DORT_INCLUDE_DIR= / $ENV{ORT_INCLUDE_DIR}; /usr/include/onnxruntime (Debian's
# libonnxruntime-dev); on a Debian-like machine, Debian 13's libonnxruntime-dev unpacked by
# scripts/fetch_ort_headers.sh (apt-get download, nothing installed; cached per user), so that a
# plain `pip install .` works where only the package registries are reachable; the official
# release archive, downloaded from GitHub into the build folder.

set(SERQ_ORT_RELEASE_VERSION "1.21.0" CACHE STRING
    "onnxruntime release whose headers are downloaded when none are found locally")
option(SERQ_ORT_DOWNLOAD "Download onnxruntime's release archive for its headers if none are found" ON)
option(SERQ_ORT_FETCH_DEBIAN "Unpack Debian 13's libonnxruntime-dev headers (apt-get download) if none are found" ON)
set(SERQ_ORT_MIN_API_VERSION 17)  # KernelContext_ParallelFor and KernelComputeV2

# A folder counts when it holds the header itself, or an onnxruntime/ or include/ folder that does
# (so the root of an extracted release or a system include prefix works too).
function(_serq_ort_probe root out_var)
  set(${out_var} "" PARENT_SCOPE)
  foreach(cand "${root}" "${root}/onnxruntime" "${root}/include" "${root}/include/onnxruntime")
    if(EXISTS "${cand}/onnxruntime_cxx_api.h" AND EXISTS "${cand}/onnxruntime_c_api.h")
      get_filename_component(cand "${cand}" ABSOLUTE)
      set(${out_var} "${cand}" PARENT_SCOPE)
      return()
    endif()
  endforeach()
endfunction()

# Debian 13's libonnxruntime-dev, fetched by scripts/fetch_ort_headers.sh into a per-user cache
# ($SERQ_ORT_HEADERS_CACHE, else $XDG_CACHE_HOME or ~/.cache, /serq-onnx/ort-headers).
function(_serq_ort_fetch_debian out_var)
  set(${out_var} "" PARENT_SCOPE)
  set(_script "${CMAKE_CURRENT_FUNCTION_LIST_DIR}/../../scripts/fetch_ort_headers.sh")
  find_program(_serq_apt apt-get)
  find_program(_serq_dpkg dpkg-deb)
  find_program(_serq_bash bash)
  if(NOT EXISTS "${_script}" OR NOT _serq_apt OR NOT _serq_dpkg OR NOT _serq_bash)
    return()
  endif()
  if(DEFINED ENV{SERQ_ORT_HEADERS_CACHE} AND NOT "$ENV{SERQ_ORT_HEADERS_CACHE}" STREQUAL "")
    set(_cache "$ENV{SERQ_ORT_HEADERS_CACHE}")
  elseif(DEFINED ENV{XDG_CACHE_HOME} AND NOT "$ENV{XDG_CACHE_HOME}" STREQUAL "")
    set(_cache "$ENV{XDG_CACHE_HOME}/serq-onnx/ort-headers")
  elseif(DEFINED ENV{HOME})
    set(_cache "$ENV{HOME}/.cache/serq-onnx/ort-headers")
  else()
    set(_cache "${CMAKE_BINARY_DIR}/_deps/ort-headers-debian")
  endif()
  message(STATUS "serq_onnx: fetching Debian 13's libonnxruntime-dev headers into ${_cache}")
  execute_process(COMMAND "${_serq_bash}" "${_script}" "${_cache}"
                  OUTPUT_VARIABLE _dir ERROR_VARIABLE _err RESULT_VARIABLE _rc
                  OUTPUT_STRIP_TRAILING_WHITESPACE TIMEOUT 300)
  if(NOT _rc EQUAL 0)
    string(REGEX REPLACE "\n$" "" _err "${_err}")
    string(REGEX MATCH "[^\n]*$" _last "${_err}")
    message(STATUS "serq_onnx: fetching the Debian headers failed (${_rc}): ${_last}")
    return()
  endif()
  _serq_ort_probe("${_dir}" _found)
  set(${out_var} "${_found}" PARENT_SCOPE)
endfunction()

function(_serq_ort_download out_var)
  set(${out_var} "" PARENT_SCOPE)
  if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(aarch64|arm64|ARM64)$")
    set(_arch "aarch64")
  else()
    set(_arch "x64")
  endif()
  set(_name "onnxruntime-linux-${_arch}-${SERQ_ORT_RELEASE_VERSION}")
  # A mirror (or a file:// URL) can stand in for GitHub; the archive must keep the release layout.
  set(SERQ_ORT_ARCHIVE_URL
      "https://github.com/microsoft/onnxruntime/releases/download/v${SERQ_ORT_RELEASE_VERSION}/${_name}.tgz"
      CACHE STRING "URL of the onnxruntime release archive downloaded for its headers")
  set(_url "${SERQ_ORT_ARCHIVE_URL}")
  set(_dir "${CMAKE_BINARY_DIR}/_deps/ort-headers")
  set(_archive "${_dir}/${_name}.tgz")

  _serq_ort_probe("${_dir}/${_name}" _found)
  if(_found)
    set(${out_var} "${_found}" PARENT_SCOPE)
    return()
  endif()

  # Set SERQ_ORT_ARCHIVE_SHA256 to pin the archive; without it the download is not verified.
  set(SERQ_ORT_ARCHIVE_SHA256 "" CACHE STRING "SHA256 of the downloaded onnxruntime release archive (optional)")
  set(_hash_args "")
  if(SERQ_ORT_ARCHIVE_SHA256)
    set(_hash_args EXPECTED_HASH "SHA256=${SERQ_ORT_ARCHIVE_SHA256}")
  else()
    message(STATUS "serq_onnx: downloading ${_url} WITHOUT hash verification "
                   "(set -DSERQ_ORT_ARCHIVE_SHA256=<sha256> to verify it)")
  endif()
  file(MAKE_DIRECTORY "${_dir}")
  file(DOWNLOAD "${_url}" "${_archive}" ${_hash_args} STATUS _status TLS_VERIFY ON TIMEOUT 300
       INACTIVITY_TIMEOUT 30)
  list(GET _status 0 _code)
  if(NOT _code EQUAL 0)
    list(GET _status 1 _msg)
    file(REMOVE "${_archive}")
    message(STATUS "serq_onnx: downloading ${_url} failed: ${_msg}")
    return()
  endif()
  file(ARCHIVE_EXTRACT INPUT "${_archive}" DESTINATION "${_dir}" PATTERNS "${_name}/include/*")
  _serq_ort_probe("${_dir}/${_name}" _found)
  set(${out_var} "${_found}" PARENT_SCOPE)
endfunction()

function(serq_find_ort_headers)
  set(ORT_INCLUDE_DIR "${ORT_INCLUDE_DIR}" CACHE PATH
      "Folder holding onnxruntime_cxx_api.h (the onnxruntime C/C++ API headers)")
  set(_explicit "${ORT_INCLUDE_DIR}")
  set(_origin "-DORT_INCLUDE_DIR")
  if(NOT _explicit AND DEFINED ENV{ORT_INCLUDE_DIR} AND NOT "$ENV{ORT_INCLUDE_DIR}" STREQUAL "")
    set(_explicit "$ENV{ORT_INCLUDE_DIR}")
    set(_origin "the environment variable ORT_INCLUDE_DIR")
  endif()

  set(_inc "")
  if(_explicit)
    # An explicit choice that does not work is an error, not a reason to look elsewhere.
    _serq_ort_probe("${_explicit}" _inc)
    if(NOT _inc)
      message(FATAL_ERROR "serq_onnx: ${_origin}=${_explicit} does not contain onnxruntime_cxx_api.h "
                          "and onnxruntime_c_api.h")
    endif()
    set(_how "${_origin}")
  else()
    _serq_ort_probe("/usr/include/onnxruntime" _inc)
    set(_how "the system (libonnxruntime-dev)")
    if(NOT _inc AND SERQ_ORT_FETCH_DEBIAN)
      _serq_ort_fetch_debian(_inc)
      set(_how "Debian 13's libonnxruntime-dev (scripts/fetch_ort_headers.sh)")
    endif()
    if(NOT _inc AND SERQ_ORT_DOWNLOAD)
      _serq_ort_download(_inc)
      set(_how "the onnxruntime ${SERQ_ORT_RELEASE_VERSION} release archive")
    endif()
  endif()

  if(NOT _inc)
    message(FATAL_ERROR
      "serq_onnx: the onnxruntime C/C++ API headers (onnxruntime_cxx_api.h) were not found\n"
      "(looked in ORT_INCLUDE_DIR, /usr/include/onnxruntime, Debian 13's libonnxruntime-dev via\n"
      "apt-get, and the onnxruntime ${SERQ_ORT_RELEASE_VERSION} release archive on github.com).\n"
      "Unpack onnxruntime's release archive (or any folder holding onnxruntime_cxx_api.h) and run\n"
      "  ORT_INCLUDE_DIR=<that folder>/include pip install .")
  endif()

  file(STRINGS "${_inc}/onnxruntime_c_api.h" _ver_line REGEX "^#define ORT_API_VERSION [0-9]+")
  string(REGEX REPLACE "^#define ORT_API_VERSION ([0-9]+).*$" "\\1" _ver "${_ver_line}")
  if(NOT _ver MATCHES "^[0-9]+$")
    message(FATAL_ERROR "serq_onnx: cannot read ORT_API_VERSION from ${_inc}/onnxruntime_c_api.h")
  endif()
  if(_ver LESS SERQ_ORT_MIN_API_VERSION)
    message(FATAL_ERROR "serq_onnx: the onnxruntime headers in ${_inc} have API version ${_ver}; "
                        "version ${SERQ_ORT_MIN_API_VERSION} (onnxruntime 1.17) or newer is needed")
  endif()
  message(STATUS "serq_onnx: onnxruntime headers (API ${_ver}) from ${_how}: ${_inc}")
  set(SERQ_ORT_INCLUDE_DIR "${_inc}" PARENT_SCOPE)
  set(SERQ_ORT_API_VERSION "${_ver}" PARENT_SCOPE)
endfunction()
