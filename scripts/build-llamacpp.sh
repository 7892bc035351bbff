#!/usr/bin/env bash
# llama.cpp, compiled once, for the GGUF evaluation runtime and the llama.cpp benchmarks:
#   - the shared libraries (libllama, libggml*) and the CLI tools llama-perplexity,
#     llama-quantize and llama-imatrix, built from the llama.cpp that llama-cpp-python's sdist
#     vendors (so the Python binding and the tools are the same llama.cpp commit);
#   - llama-cpp-python installed into the venv with LLAMA_BUILD=OFF (no second compile) and
#     those libraries copied into its llama_cpp/lib.
# Not run by CI: about 30-60 minutes on 2 shared cores. Idempotent: a finished step is skipped.
#
#   bash scripts/build-llamacpp.sh            # VENV=.venv, LLAMACPP_DIR=~/.cache/compress/llama.cpp
#   LLAMACPP_DIR=/work/llama.cpp-build VENV=/work/main/.venv bash scripts/build-llamacpp.sh
#
# Afterwards: $LLAMACPP_DIR/build/bin/llama-{perplexity,quantize,imatrix}, the converter
# $LLAMACPP_DIR/src/vendor/llama.cpp/convert_hf_to_gguf.py, and `import llama_cpp` in the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
DIR=${LLAMACPP_DIR:-$HOME/.cache/compress/llama.cpp}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
PIP="$VENV/bin/pip"
CONSTRAINTS=constraints.txt
[ -f "$CONSTRAINTS" ] || CONSTRAINTS=/work/main/constraints.txt

mkdir -p "$DIR"
SDIST="$DIR/llama_cpp_python-$VERSION.tar.gz"
SRC="$DIR/llama_cpp_python-$VERSION"
if [ ! -f "$SDIST" ]; then
  "$PIP" download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$DIR"
fi
if [ ! -d "$SRC" ]; then
  tar -xzf "$SDIST" -C "$DIR"
fi
ln -sfn "$SRC" "$DIR/src"

# One build of the vendored llama.cpp: shared libraries (the binding loads them) + three tools;
# no curl, tests, examples or server. GGML_NATIVE compiles for this CPU only, except on CPUs with
# AMX: there llama.cpp's AMX matmul (ggml_backend_amx_mul_mat) crashed with SIGSEGV on the first
# quantized matmul (SmolLM2 Q4_1 and tiny Q8_0 files, Xeon with amx_int8, 2026-12-06), so the
# ISA is listed from /proc/cpuinfo without AMX (LLAMACPP_AMX=1 keeps native, AMX included).
ISA=(-DGGML_NATIVE=ON)
if [ "$(uname -m)" = x86_64 ] && grep -qw amx_int8 /proc/cpuinfo && [ "${LLAMACPP_AMX:-0}" != 1 ]; then
  flags=$(grep -m1 '^flags' /proc/cpuinfo)
  has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
  ISA=(-DGGML_NATIVE=OFF -DGGML_SSE42="$(has sse4_2)" -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)"
       -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)" -DGGML_BMI2="$(has bmi2)" -DGGML_AVX_VNNI="$(has avx_vnni)"
       -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VBMI="$(has avx512vbmi)"
       -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16="$(has avx512_bf16)"
       -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
fi
nice -n 10 cmake -S "$SRC/vendor/llama.cpp" -B "$DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON "${ISA[@]}"
nice -n 10 cmake --build "$DIR/build" -j "$CMAKE_BUILD_PARALLEL_LEVEL" \
  --target llama llama-perplexity llama-quantize llama-imatrix

# The binding without its own compile (LLAMA_BUILD=OFF builds no library), then our libraries.
if ! "$PIP" show llama-cpp-python >/dev/null 2>&1; then
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PIP" install -c "$CONSTRAINTS" --no-build-isolation "$SRC" \
    || CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PIP" install -c "$CONSTRAINTS" "$SRC"
fi
LIB=$("$VENV/bin/python" - <<'EOF'
import importlib.util, pathlib
print(pathlib.Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib")
EOF
)
mkdir -p "$LIB"
rm -f "$LIB"/lib*.so*
cp -a "$DIR"/build/bin/lib*.so* "$LIB"/
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'system:', llama_cpp.llama_print_system_info().decode())"
ls -1 "$DIR"/build/bin/llama-perplexity "$DIR"/build/bin/llama-quantize "$DIR"/build/bin/llama-imatrix
