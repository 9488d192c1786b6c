# Run by `cmake --install` after the libraries are installed (and stripped): writes manifest.json beside them
# with each library's file name, size and SHA-256, and the reason for each library not built.
# The loader (src/seqjax/backends/_library.py) refuses a file whose size or hash differs, before ctypes opens it.
# Inputs (set by the install(CODE) rule of CMakeLists.txt): SEQJAX_MANIFEST_DIR, SEQJAX_FILES ("name=file" list),
# SEQJAX_SKIPPED ("name=reason" list), SEQJAX_JAX_VERSION, SEQJAX_DNNL_VERSION, SEQJAX_CXX, SEQJAX_CUDA_VERSION,
# SEQJAX_PROCESSOR.
set(_dir "$ENV{DESTDIR}${SEQJAX_MANIFEST_DIR}")

function(_json_string out value)
  string(REPLACE "\\" "\\\\" value "${value}")
  string(REPLACE "\"" "\\\"" value "${value}")
  set(${out} "\"${value}\"" PARENT_SCOPE)
endfunction()

set(_libs "")
foreach(_entry IN LISTS SEQJAX_FILES)
  string(REPLACE "=" ";" _pair "${_entry}")
  list(GET _pair 0 _name)
  list(GET _pair 1 _file)
  if(NOT EXISTS "${_dir}/${_file}")
    message(FATAL_ERROR "seqjax: ${_dir}/${_file} was not installed")
  endif()
  file(SIZE "${_dir}/${_file}" _size)
  file(SHA256 "${_dir}/${_file}" _sha)
  if(_libs)
    string(APPEND _libs ",\n")
  endif()
  string(APPEND _libs "    \"${_name}\": {\"file\": \"${_file}\", \"size\": ${_size}, \"sha256\": \"${_sha}\"}")
endforeach()

set(_skipped "")
foreach(_entry IN LISTS SEQJAX_SKIPPED)
  if(NOT _entry)
    continue()
  endif()
  string(FIND "${_entry}" "=" _at)
  string(SUBSTRING "${_entry}" 0 ${_at} _name)
  math(EXPR _at "${_at} + 1")
  string(SUBSTRING "${_entry}" ${_at} -1 _reason)
  _json_string(_reason "${_reason}")
  if(_skipped)
    string(APPEND _skipped ",\n")
  endif()
  string(APPEND _skipped "    \"${_name}\": ${_reason}")
endforeach()

_json_string(_jax "${SEQJAX_JAX_VERSION}")
_json_string(_dnnl "${SEQJAX_DNNL_VERSION}")
_json_string(_cxx "${SEQJAX_CXX}")
_json_string(_cuda "${SEQJAX_CUDA_VERSION}")
_json_string(_proc "${SEQJAX_PROCESSOR}")
file(MAKE_DIRECTORY "${_dir}")
file(WRITE "${_dir}/manifest.json" "{
  \"format\": 1,
  \"processor\": ${_proc},
  \"jax\": ${_jax},
  \"cxx\": ${_cxx},
  \"onednn\": ${_dnnl},
  \"nvcc\": ${_cuda},
  \"libraries\": {
${_libs}
  },
  \"skipped\": {
${_skipped}
  }
}
")
message(STATUS "seqjax: wrote ${_dir}/manifest.json")
